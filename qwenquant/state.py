"""What a run produces, shared by the loop, the exporters, evaluation and the journal (so none of them imports the
loop): per-Linear quantized records, how each quantized Linear's input is quantized at inference, per-layer reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwenquant.quant import int8 as int8q
from qwenquant.quant import nvfp4 as nvfp4q
from qwenquant.quant.fp8 import fake_quantize_activation
from qwenquant.quant.records import QuantizedWeight


@dataclass
class ActivationSpec:
    """How a quantized Linear's input is quantized at inference: mode token | group | tensor, into `dtype` fp8
    (E4M3), int8 (symmetric, dynamic per token only) or nvfp4 (mode group, 16 wide, dynamic E4M3 group scales under
    the static global scale `input_scale`, quant/nvfp4.py)."""

    mode: str
    input_scale: torch.Tensor | None = None
    group_size: int = 128
    dtype: str = "fp8"

    def __post_init__(self) -> None:
        if self.dtype not in ("fp8", "int8", "nvfp4") or (self.dtype == "int8" and self.mode != "token") or (
                self.dtype == "nvfp4" and (self.mode != "group" or self.input_scale is None)):
            raise ValueError(f"activation spec: {self.dtype} {self.mode} activations are not simulated")

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x as the engine's kernel sees it after quantizing it (simulated in float32, returned in x's dtype)."""
        if self.dtype == "int8":
            return int8q.fake_quantize_tokens(x)
        if self.dtype == "nvfp4":
            return nvfp4q.fake_quantize_activation(x, self.input_scale)
        return fake_quantize_activation(x, self.mode, self.input_scale, self.group_size)


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
    # --kv-cache fp8: attention module (full name) -> (k_scale, v_scale), [1] or [kv_heads, 1, 1] in the model dtype
    kv_scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def add_time(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
