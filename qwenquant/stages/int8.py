"""The `int8` quantizer stage: INT8 W8A8, the scheme vLLM serves on GPUs without FP8 (Turing, Ampere).

Weights symmetric INT8 per output channel, rounded to nearest or with GPTQ (the `gptq` stage's true-sequential
loop with 8 bits and one group per row); activations INT8 symmetric per token, dynamic (quantized by the engine at
run time: nothing is calibrated for them here). The math: `qwenquant.quant.int8`. A recipe puts a `smooth` stage
before it (`qwenquant int8` does, with each layer's alpha searched by this scheme's own output error), since INT8
activations lose far more to outlier channels than FP8 ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenquant.quant import int8 as int8q
from qwenquant.stages import gptq
from qwenquant.stages.context import LayerContext
from qwenquant.stages.int_weights import int_record_bytes
from qwenquant.stages.observe import quantized_names, store_int
from qwenquant.stages.spec import StageSpec
from qwenquant.state import ActivationSpec
from qwenquant.validation import choice

METHODS = ("gptq", "rtn")


@dataclass
class Int8Stage:
    """INT8 W8A8: per-channel symmetric INT8 weights (`method` gptq | rtn), dynamic per-token INT8 activations."""

    method: str = "gptq"
    group_size: int = -1  # one scale per output channel: the only layout vLLM's INT8 W8A8 kernels read

    def __post_init__(self) -> None:
        choice("int8.method", self.method, METHODS)
        if self.group_size != -1:
            raise ValueError(f"int8.group_size: {self.group_size!r} is not allowed; INT8 W8A8 stores one scale per "
                             "output channel (-1): vLLM's INT8 kernels have no group scales (use qwenquant gptq "
                             "--bits 8 for grouped weight-only INT8)")

    def search_rounding(self, dtype: torch.dtype):
        """How this scheme rounds, for searches measuring its output error (smooth.alpha_search): weights to
        nearest per channel (GPTQ then works inside that grid), inputs per token; (w -> w_hat float32,
        (x, s, a_max) -> x_hat), the factors and calibration absmax unused (dynamic scales)."""

        def quantize_weight(w: torch.Tensor) -> torch.Tensor:
            return int8q.quantize_weight(w, dtype).dequantize()

        def quantize_input(x: torch.Tensor, _s: torch.Tensor, _a_max: torch.Tensor) -> torch.Tensor:
            return int8q.fake_quantize_tokens(x)

        return quantize_weight, quantize_input


def gptq_config(cfg: Int8Stage) -> gptq.GPTQStage:
    """The gptq stage's config that produces this scheme's weights: 8 bits, per channel, symmetric."""
    return gptq.GPTQStage(bits=int8q.BITS, group_size=-1, symmetric=True)


def int8_layer(ctx: LayerContext, cfg: Int8Stage) -> dict:
    """Quantize every Linear of the layer to INT8 (per channel) and register its dynamic per-token INT8 inputs."""
    names = quantized_names(ctx, ctx.adapter.linears)
    if cfg.method == "gptq":
        report = gptq.gptq_layer(ctx, gptq_config(cfg))
    else:
        report = {}
        for name in names:
            w = ctx.linear(name).weight.data
            store_int(ctx, name, int8q.quantize_weight(w, w.dtype), report)
    for name in names:
        full = ctx.full_name(name)
        ctx.state.records[full] = int8q.as_int8_record(ctx.state.records[full])
        ctx.state.activations[full] = _activation_spec(cfg, full)
    return report


def _activation_spec(_cfg: Int8Stage, _name: str) -> ActivationSpec:
    return ActivationSpec("token", dtype="int8")


def quantize_weight(cfg: Int8Stage, name: str, w: torch.Tensor, group_absmax=None):
    """The data-free path's quantizer (method rtn) for one Linear: the values `int8_layer` records for it."""
    del cfg, name, group_absmax  # per-channel scales: nothing shared, nothing configured per Linear
    return int8q.quantize_weight(w, w.dtype)


# -- the estimator's cost model (StageSpec cost fields; qwenquant/estimate/) ----------------------------------------


def _host_bytes(cfg: Int8Stage, need) -> tuple[int, str]:
    if cfg.method == "gptq":
        return gptq.SPEC.host_bytes(gptq_config(cfg), need)
    return need.weight_copies()


def _seconds(cfg: Int8Stage, need) -> tuple[float, str]:
    """GPTQ's cost with 8 bits per channel, or one round-to-nearest pass."""
    if cfg.method == "gptq":
        return gptq.SPEC.seconds(gptq_config(cfg), need)
    return need.quant_pass, ""


def _record_bytes(cfg: Int8Stage, n: int, k: int, dtype_bytes: int) -> int:
    return int_record_bytes(gptq_config(cfg), n, k, dtype_bytes)


def _probe_quantize(cfg: Int8Stage, w: torch.Tensor, dtype: torch.dtype):
    qw = int8q.quantize_weight(w, dtype)
    float((w.float() - qw.dequantize()).norm())
    return qw


def _probe(cfg: Int8Stage, kit) -> dict[str, float]:
    """GPTQ's column-loop rates (method gptq) and the seconds per input element of the INT8 activation simulation
    installed for propagation and evaluation."""
    rates = gptq.SPEC.probe(gptq_config(cfg), kit) if cfg.method == "gptq" else {}
    x = torch.randn(max(16, min(2048, kit.elements_cap // kit.widest_input)), kit.widest_input,
                    device=kit.device).to(kit.dtype)
    seconds = kit.time(lambda: int8q.fake_quantize_tokens(x))
    return rates | {"act_quant_s_per_element": seconds / x.numel()}


SPEC = StageSpec("int8", Int8Stage, "quantizer", int8_layer, record_kind=int8q.KIND,
                 uses_calibration=lambda cfg: cfg.method == "gptq", host_bytes=_host_bytes, seconds=_seconds,
                 record_bytes=_record_bytes, label=lambda cfg: f"w8a8 int8 {cfg.method} (channel weights, token acts)",
                 probe_quantize=_probe_quantize, probe=_probe, data_free=lambda cfg: cfg.method == "rtn",
                 quantize_weight=quantize_weight, activation_spec=_activation_spec,
                 tag=lambda cfg: "RTN" if cfg.method == "rtn" else "", serving_scheme=lambda cfg: "int8-w8a8",
                 data_parallel=lambda _cfg: True)
