"""What a run produces, shared by the loop, the exporters, evaluation and the journal (so none of them imports the
loop): per-Linear quantized records, how each quantized Linear's input is quantized at inference, per-layer reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwenquant.quant.records import QuantizedWeight


@dataclass
class ActivationSpec:
    """How a quantized Linear's input is quantized at inference: mode token | group | tensor."""

    mode: str
    input_scale: torch.Tensor | None = None
    group_size: int = 128


@dataclass
class QuantState:
    """Everything the run produced per Linear (full dotted names), plus per-layer reports."""

    records: dict[str, QuantizedWeight] = field(default_factory=dict)
    activations: dict[str, ActivationSpec] = field(default_factory=dict)
    layer_reports: list[dict] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    peak_device_bytes: int = 0
    keep: set[str] = field(default_factory=set)  # Linears the quantizer stages must skip (mixed precision)
    searched: dict[str, dict] = field(default_factory=dict)  # scale search choices, e.g. {"fp8.clip": {name: r}}

    def add_time(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
