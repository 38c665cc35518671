"""The `nvfp4` quantizer stage: FP4 E2M1 weights in groups of 16 with FP8 E4M3 group scales and one FP32 global
scale per tensor (quant/nvfp4.py), rounded to nearest or with GPTQ on the NVFP4 grid, in two forms: weight-only
(NVFP4A16, `activations: none`) and W4A4 with FP4 activations (`activations: dynamic`: per token and group of 16,
group scales at run time, the global input scale calibrated here from the max |x| of each Linear's input).

The Linears of a vLLM fused group (q/k/v, gate/up) share one weight global scale (their joint max |w|), and the
Linears reading one input share its input global scale, as vLLM runs each fused module with one of each."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenquant.quant import gptq as gptqq
from qwenquant.quant import nvfp4 as nvq
from qwenquant.stages.context import LayerContext
from qwenquant.stages.gptq import GPTQStage, sequential_gptq
from qwenquant.stages.gptq import SPEC as GPTQ_SPEC
from qwenquant.stages.observe import collect_channel_absmax, quantized_names, store_int
from qwenquant.stages.spec import StageSpec
from qwenquant.state import ActivationSpec
from qwenquant.validation import choice, positive

METHODS = ("rtn", "gptq")
ACTIVATIONS = ("dynamic", "none")


@dataclass
class NVFP4Stage:
    """NVFP4 weights (`method` rtn | gptq), FP4 activations (`activations` dynamic) or none (weight-only).
    `group_size` is the format's, 16; GPTQ's own settings (`actorder` static | none, `dampening_frac`,
    `block_size`) have the gptq stage's defaults."""

    method: str = "rtn"
    activations: str = "dynamic"
    group_size: int = nvq.GROUP_SIZE
    actorder: str = GPTQStage.actorder
    dampening_frac: float = GPTQStage.dampening_frac
    block_size: int = GPTQStage.block_size

    def __post_init__(self) -> None:
        choice("nvfp4.method", self.method, METHODS)
        choice("nvfp4.activations", self.activations, ACTIVATIONS)
        if self.group_size != nvq.GROUP_SIZE:
            raise ValueError(f"nvfp4.group_size: NVFP4 stores one E4M3 scale per {nvq.GROUP_SIZE} weights; "
                             f"{self.group_size!r} is not allowed")
        choice("nvfp4.actorder", self.actorder, ("static", "none"))  # a column permutation (group) is not storable
        if not (isinstance(self.dampening_frac, (int, float)) and 0.0 <= self.dampening_frac < 1.0):
            raise ValueError(f"nvfp4.dampening_frac: must be in [0, 1), got {self.dampening_frac!r}")
        positive("nvfp4.block_size", self.block_size)

    def gptq_config(self) -> gptqq.GPTQConfig:
        """The GPTQ column loop's settings (4 bits, groups of 16: the NVFP4 grid's)."""
        return gptqq.GPTQConfig(bits=4, group_size=nvq.GROUP_SIZE, actorder=self.actorder,
                                dampening_frac=self.dampening_frac, block_size=self.block_size)

    def gptq_costs(self) -> GPTQStage:
        """The gptq stage's config whose cost model (host bytes, seconds, probe) is this stage's with GPTQ."""
        return GPTQStage(actorder=self.actorder, dampening_frac=self.dampening_frac, block_size=self.block_size)


def _weight_global_scales(ctx: LayerContext, names: list[str]) -> dict[str, torch.Tensor]:
    """Each Linear's weight global scale: one per fused group, from the group's joint max |w|."""
    out: dict[str, torch.Tensor] = {}
    for group in ctx.adapter.fused_groups:
        members = [n for n in group if n in names]
        if members:
            g = nvq.global_scale(max(float(ctx.linear(n).weight.float().abs().amax()) for n in members))
            out.update({n: g for n in members})
    for n in names:
        if n not in out:
            out[n] = nvq.global_scale(float(ctx.linear(n).weight.float().abs().amax()))
    return out


def _input_global_scales(ctx: LayerContext, names: list[str]) -> dict[str, torch.Tensor]:
    """Each Linear's input global scale from the max |x| over the calibration tokens (shared by the Linears of an
    input-scale group: the engine uses one)."""
    absmax = {n: float(a.amax()) for n, a in collect_channel_absmax(ctx, names).items()}
    for group in ctx.adapter.input_scale_groups:
        members = [n for n in group if n in absmax]
        shared = max((absmax[n] for n in members), default=None)
        absmax.update({n: shared for n in members})
    return {n: nvq.global_scale(a) for n, a in absmax.items()}


def nvfp4_layer(ctx: LayerContext, cfg: NVFP4Stage) -> dict:
    """Quantize every Linear of the layer to NVFP4 and register how its inputs are quantized."""
    names = quantized_names(ctx, ctx.adapter.linears)
    input_g = _input_global_scales(ctx, names) if cfg.activations == "dynamic" else {}
    weight_g = _weight_global_scales(ctx, names)
    report: dict = {}
    if cfg.method == "gptq":
        gptq_cfg = cfg.gptq_config()

        def solve(group: list[str], weights: list[torch.Tensor], H: torch.Tensor):
            grid = nvq.gptq_grid(weight_g[group[0]])  # a fused group shares its global scale
            return [(res, {}) for res in gptqq.quantize_weights_shared(weights, H, gptq_cfg, grid=grid)]

        report = sequential_gptq(ctx, solve)
    else:
        for name in names:
            store_int(ctx, name, nvq.quantize_nvfp4(ctx.linear(name).weight.data, weight_g[name]), report)
    for name in names:
        report[name]["weight_global_scale"] = float(weight_g[name])
        if name in input_g:
            ctx.state.activations[ctx.full_name(name)] = activation(input_g[name])
            report[name]["input_global_scale"] = float(input_g[name])
    return report


def activation(input_global_scale: torch.Tensor) -> ActivationSpec:
    """FP4 inputs in groups of 16 along the input features, dynamic group scales under a static global scale."""
    return ActivationSpec("group", input_scale=input_global_scale, group_size=nvq.GROUP_SIZE, dtype="nvfp4")


def quantize_weight(cfg: NVFP4Stage, name: str, w: torch.Tensor, group_absmax: dict[str, float] | None):
    """The data-free path (round-to-nearest weight-only): the values `nvfp4_layer` records for Linear `name`, its
    fused group's Linears (`group_absmax`: their max |w|) sharing one global scale."""
    absmax = max(group_absmax.values()) if group_absmax else float(w.float().abs().amax())
    return nvq.quantize_nvfp4(w, nvq.global_scale(absmax))


def _data_free(cfg: NVFP4Stage) -> bool:
    return cfg.method == "rtn" and cfg.activations == "none"


def _check_linear(cfg: NVFP4Stage, name: str, n: int, k: int) -> str | None:
    if k % nvq.GROUP_SIZE:
        return (f"{name} has {k} input features, not a multiple of {nvq.GROUP_SIZE} (NVFP4's group); keep it in "
                "bf16 by listing it under mixed_precision: keep in a recipe (qwenquant run)")
    return None


# -- the estimator's cost model (StageSpec cost fields; qwenquant/estimate/) ----------------------------------------


def _host_bytes(cfg: NVFP4Stage, need) -> tuple[int, str]:
    return GPTQ_SPEC.host_bytes(cfg.gptq_costs(), need) if cfg.method == "gptq" else need.weight_copies()


def _seconds(cfg: NVFP4Stage, need) -> tuple[float, str]:
    """GPTQ's model (its column loop timed on the INT grid: the E2M1 rounding costs a few more elementwise ops), or
    one quantizer pass; W4A4 adds a forward for the input global scales."""
    t, note = GPTQ_SPEC.seconds(cfg.gptq_costs(), need) if cfg.method == "gptq" else (need.quant_pass, "")
    return t + (need.calibration_forwards() if cfg.activations == "dynamic" else 0.0), note


def _record_bytes(cfg: NVFP4Stage, n: int, k: int, dtype_bytes: int) -> int:
    """uint8 codes (one per weight, unpacked), E4M3 scales, the float32 global scale."""
    return n * k + n * (k // nvq.GROUP_SIZE) + 4


def _probe_quantize(cfg: NVFP4Stage, w: torch.Tensor, dtype: torch.dtype):
    qw = nvq.quantize_nvfp4(w.to(dtype))
    nvq.weight_error(w, qw)
    return qw


def _probe(cfg: NVFP4Stage, kit) -> dict[str, float]:
    """GPTQ's column-loop rates (method gptq) and the seconds per input element of the FP4 activation simulation."""
    rates = GPTQ_SPEC.probe(cfg.gptq_costs(), kit) if cfg.method == "gptq" else {}
    if cfg.activations == "none":
        return rates | {"act_quant_s_per_element": 0.0}
    k = max(nvq.GROUP_SIZE, kit.widest_input - kit.widest_input % nvq.GROUP_SIZE)
    x = torch.randn(max(16, min(2048, kit.elements_cap // k)), k, device=kit.device).to(kit.dtype)
    g = nvq.global_scale(float(x.float().abs().amax()))
    return rates | {"act_quant_s_per_element": kit.time(lambda: nvq.fake_quantize_activation(x, g)) / x.numel()}


def _label(cfg: NVFP4Stage) -> str:
    return f"{cfg.method} activations={cfg.activations}"


def _tag(cfg: NVFP4Stage) -> str:
    """The command's scheme names the form (NVFP4 / NVFP4A16); GPTQ is added."""
    return "GPTQ" if cfg.method == "gptq" else ""


SPEC = StageSpec("nvfp4", NVFP4Stage, "quantizer", nvfp4_layer, record_kind="nvfp4", check_linear=_check_linear,
                 uses_calibration=lambda cfg: not _data_free(cfg), host_bytes=_host_bytes, seconds=_seconds,
                 record_bytes=_record_bytes, label=_label, probe_quantize=_probe_quantize, probe=_probe,
                 data_free=_data_free, quantize_weight=quantize_weight, shares_scale=lambda cfg: True,
                 activation_spec=lambda cfg, name: None, tag=_tag,
                 serving_scheme=lambda cfg: "nvfp4a16" if cfg.activations == "none" else "nvfp4",
                 data_parallel=lambda _cfg: True)
