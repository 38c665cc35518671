"""The `fp8` quantizer stage: E4M3 weights (per channel, per tensor or in blocks), with optional FP8 activations
(dynamic per token / per group, or a static per-tensor input scale calibrated here)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from qwenquant.quant import fp8 as fp8q
from qwenquant.stages.context import LayerContext
from qwenquant.stages.observe import collect_channel_absmax, quantized_names, to_cpu
from qwenquant.stages.per_layer_search import (FP8_CLIP_KEY, FP8_GRANULARITY_KEY, MAX_SEARCH_TOKENS, layer_clips,
                                               layer_granularity)
from qwenquant.stages.spec import ROUGH_TIME_NOTE, StageSpec
from qwenquant.state import ActivationSpec
from qwenquant.validation import choice, positive, ratio_map


@dataclass
class FP8Stage:
    """E4M3 weights (+ optional FP8 activations)."""

    weights: str = "channel"  # tensor | channel | block
    activations: str = "dynamic"  # dynamic | static | none
    block_size: int = 128
    clip: dict[str, float] = field(default_factory=dict)  # Linear (full name) -> weight clipping ratio; else 1.0
    clip_search: bool = False  # choose each Linear's clipping ratio by its output error (scale search)
    # per-Linear weight granularity overriding `weights` (full name -> channel | block), or chosen per vLLM fused
    # group by output error (`granularity_search`, with channel weights and dynamic activations; compressed-tensors
    # stores both in one checkpoint as two config groups)
    granularity: dict[str, str] = field(default_factory=dict)
    granularity_search: bool = False

    def weights_for(self, name: str) -> str:
        """The weight granularity of one Linear (full name)."""
        return self.granularity.get(name, self.weights)

    def search_rounding(self, dtype: torch.dtype):
        """How this config rounds, for searches measuring its output error (smooth.alpha_search): (w [N, K] ->
        w_hat float32, (x, s, a_max) -> x_hat) with x the smoothed inputs x / s, s the smoothing factors and a_max
        the per-channel calibration absmax (a static input scale is calibrated from a_max / s)."""
        mode = {"dynamic": "group" if self.weights == "block" else "token", "static": "tensor"}.get(self.activations)

        def quantize_weight(w: torch.Tensor) -> torch.Tensor:
            return fp8q.quantize_fp8(w, self.weights, self.block_size, scale_dtype=dtype).dequantize()

        def quantize_input(x: torch.Tensor, s: torch.Tensor, a_max: torch.Tensor) -> torch.Tensor:
            if mode is None:
                return x
            scale = fp8q.static_input_scale((a_max.to(s.device) / s).amax(), dtype) if mode == "tensor" else None
            return fp8q.fake_quantize_activation(x, mode, scale, self.block_size)

        return quantize_weight, quantize_input

    def __post_init__(self) -> None:
        choice("fp8.weights", self.weights, ("tensor", "channel", "block"))
        for name, g in self.granularity.items():
            choice(f"fp8.granularity.{name}", g, ("channel", "block"))
        if (self.granularity_search or self.granularity) and (self.weights != "channel" or self.activations != "dynamic"):
            raise ValueError("fp8.granularity: per-Linear channel/block choice needs weights: channel and "
                             "activations: dynamic (block weights pair with dynamic group activations)")
        if self.granularity_search and self.granularity:
            raise ValueError("fp8.granularity: set either granularity_search or per-Linear granularity, not both")
        choice("fp8.activations", self.activations, ("dynamic", "static", "none"))
        positive("fp8.block_size", self.block_size)
        if self.weights == "block" and self.activations == "static":
            raise ValueError("fp8: block weights pair with dynamic group activations; use activations: dynamic")
        ratio_map("fp8.clip", self.clip, str, 0.0, exclusive_low=True)
        if self.clip_search and self.clip:
            raise ValueError("fp8.clip: set either clip_search or per-Linear clip ratios, not both")


def fp8_layer(ctx: LayerContext, cfg: FP8Stage) -> dict:
    """Quantize every Linear of the layer to FP8 and register how its activations are quantized."""
    names = quantized_names(ctx, ctx.adapter.linears)
    dtype = next(ctx.layer.parameters()).dtype
    input_absmax = {}
    if cfg.activations == "static":
        input_absmax = {n: a.amax() for n, a in collect_channel_absmax(ctx, names).items()}
        for group in ctx.adapter.input_scale_groups:  # the engine uses one (the max) input scale for these
            members = [n for n in group if n in input_absmax]
            shared = max((input_absmax[n] for n in members), default=None)
            input_absmax.update({n: shared for n in members})
    shared_scale: dict[str, torch.Tensor] = {}
    gran, gran_search = layer_granularity(ctx, cfg, names)  # channel | block | tensor per Linear
    clips, clip_search = layer_clips(ctx, cfg, FP8_CLIP_KEY, names, gran)  # weight clipping ratio per Linear (1.0: absmax)
    if cfg.weights == "tensor":
        # vLLM fuses q/k/v and gate/up and would requantize shards to their max scale: share it up front.
        for group in ctx.adapter.fused_groups:
            absmax = max(float(ctx.linear(n).weight.float().abs().amax()) for n in group)
            for n in group:
                shared_scale[n] = fp8q.shared_tensor_scale(absmax, min(clips.get(m, 1.0) for m in group), dtype)
    report = {}
    for name in names:
        lin = ctx.linear(name)
        w = lin.weight.data
        qw = fp8q.quantize_fp8(w, gran[name], cfg.block_size, clip_ratio=clips[name], scale_dtype=dtype,
                               scale=shared_scale.get(name))
        report[name] = {"weight_rel_error": fp8q.weight_error(w, qw)}
        if name in gran_search:
            report[name]["granularity_search"] = gran_search[name]
        if clips[name] != 1.0 or name in clip_search:
            report[name]["clip"] = clips[name]
            report[name] |= {"clip_search": clip_search[name]} if name in clip_search else {}
        lin.weight.data = qw.dequantize(dtype)
        full = ctx.full_name(name)
        ctx.state.records[full] = to_cpu(qw)
        if cfg.activations == "dynamic":
            ctx.state.activations[full] = dynamic_activation(cfg, gran[name])
        elif cfg.activations == "static":
            scale = fp8q.static_input_scale(input_absmax[name], dtype)
            ctx.state.activations[full] = ActivationSpec("tensor", input_scale=scale)
            report[name]["input_scale"] = float(scale)
    return report


def dynamic_activation(cfg: FP8Stage, granularity: str) -> ActivationSpec:
    """Dynamic FP8 inputs: per token, or per token and group of `block_size` channels beside block weights."""
    return ActivationSpec("group" if granularity == "block" else "token", group_size=cfg.block_size)


def _activation_spec(cfg: FP8Stage, name: str) -> ActivationSpec | None:
    """A data-free config's input quantization of Linear `name`: dynamic, or none (weight-only)."""
    return dynamic_activation(cfg, cfg.weights_for(name)) if cfg.activations == "dynamic" else None


def _data_free(cfg: FP8Stage) -> bool:
    """Weights alone decide every value unless activations are calibrated or anything is searched."""
    return cfg.activations != "static" and not cfg.clip_search and not cfg.granularity_search


def quantize_weight(cfg: FP8Stage, name: str, w: torch.Tensor, group_absmax: dict[str, float] | None):
    """The data-free path's FP8 quantizer for one Linear (full `name`), the values `fp8_layer` records for it:
    `group_absmax` (per-tensor weights) holds max |w| of each Linear of its fused group, which share one scale."""
    clip = float(cfg.clip.get(name, 1.0))
    scale = None
    if group_absmax:
        scale = fp8q.shared_tensor_scale(max(group_absmax.values()),
                                         min(float(cfg.clip.get(n, 1.0)) for n in group_absmax), w.dtype)
    return fp8q.quantize_fp8(w, cfg.weights_for(name), cfg.block_size, clip_ratio=clip, scale_dtype=w.dtype,
                             scale=scale)


def _resolve(cfg: FP8Stage, searched: dict) -> FP8Stage:
    clip, granularity = searched.get(FP8_CLIP_KEY), searched.get(FP8_GRANULARITY_KEY)
    if cfg.clip_search and clip is not None:
        cfg = dataclasses.replace(cfg, clip_search=False, clip=dict(clip))
    if cfg.granularity_search and granularity is not None:
        cfg = dataclasses.replace(cfg, granularity_search=False, granularity=dict(granularity))
    return cfg


def _check_linear(cfg: FP8Stage, name: str, n: int, k: int) -> str | None:
    if cfg.weights == "block" and k % cfg.block_size:
        return (f"{name} has {k} input features, not a multiple of --block-size {cfg.block_size} "
                "(block activations are grouped by it); use a divisor of it or --weights channel")
    return None


# -- the estimator's cost model (StageSpec cost fields; qwenquant/estimate/) ----------------------------------------


def _host_bytes(cfg: FP8Stage, need) -> tuple[int, str]:
    return need.weight_copies()


def _seconds(cfg: FP8Stage, need) -> tuple[float, str]:
    """A quantizer pass; static activations add a forward for the input scales; a clip search a forward for the
    inputs, then ~9 candidate ratios per Linear on at most MAX_SEARCH_TOKENS tokens."""
    t = need.quant_pass
    if cfg.activations == "static":
        t += need.calibration_forwards()
    if cfg.clip_search:
        tokens = min(need.calib_tokens, MAX_SEARCH_TOKENS)
        t += need.calibration_forwards() + 9 * (need.quant_pass + 2 * tokens * need.weights / need.fp32_flops)
    return t, ROUGH_TIME_NOTE if cfg.clip_search else ""


def _record_bytes(cfg: FP8Stage, n: int, k: int, dtype_bytes: int) -> int:
    """FP8 codes (1 B per weight) and the scales in the model dtype."""
    blocks = math.ceil(n / cfg.block_size) * math.ceil(k / cfg.block_size)
    return n * k + {"tensor": 1, "channel": n, "block": blocks}[cfg.weights] * dtype_bytes


def _label(cfg: FP8Stage) -> str:
    return f"weights={cfg.weights} activations={cfg.activations}"


def _tag(cfg: FP8Stage) -> str:
    parts = [cfg.weights.upper()] if cfg.weights != "channel" else []
    parts += {"static": ["STATIC"], "none": ["WEIGHT-ONLY"]}.get(cfg.activations, [])
    return "-".join(parts + (["SEARCH"] if cfg.clip_search else []))


def _probe_quantize(cfg: FP8Stage, w: torch.Tensor, dtype: torch.dtype):
    qw = fp8q.quantize_fp8(w, cfg.weights, cfg.block_size, scale_dtype=dtype)
    qw.dequantize(dtype)
    fp8q.weight_error(w, qw)
    return qw


def _probe(cfg: FP8Stage, kit) -> dict[str, float]:
    """Seconds per input element of the activation simulation installed for propagation and evaluation."""
    if cfg.activations == "none":
        return {"act_quant_s_per_element": 0.0}
    mode = {"dynamic": "group" if cfg.weights == "block" else "token", "static": "tensor"}[cfg.activations]
    k = kit.widest_input
    k = k - k % cfg.block_size if mode == "group" and k >= cfg.block_size else k
    x = torch.randn(max(16, min(2048, kit.elements_cap // k)), k, device=kit.device).to(kit.dtype)
    scale = torch.tensor([0.01], dtype=kit.dtype, device=kit.device)
    seconds = kit.time(lambda: fp8q.fake_quantize_activation(x, mode, scale, cfg.block_size))
    return {"act_quant_s_per_element": seconds / x.numel()}


SPEC = StageSpec("fp8", FP8Stage, "quantizer", fp8_layer, record_kind="fp8", check_linear=_check_linear,
                 resolve=_resolve, host_bytes=_host_bytes, seconds=_seconds, record_bytes=_record_bytes, label=_label,
                 probe_quantize=_probe_quantize, probe=_probe, uses_calibration=lambda cfg: not _data_free(cfg),
                 data_free=_data_free, quantize_weight=quantize_weight,
                 shares_scale=lambda cfg: cfg.weights == "tensor", activation_spec=_activation_spec, tag=_tag,
                 serving_scheme=lambda cfg: "fp8-w8a16" if cfg.activations == "none" else "fp8-w8a8",
                 data_parallel=lambda _cfg: True)
