"""Per-layer stage glue: gather statistics with hooks, call the pure algorithms, write weights back.

Each `make_*` returns a Stage: a function of a LayerContext returning a small JSON-able report for that layer.
"""

from __future__ import annotations

import torch

from qwenquant.pipeline import ActivationSpec, LayerContext, Stage
from qwenquant.quant import fp8 as fp8q
from qwenquant.quant import smooth as sq
from qwenquant.recipe import FP8Stage, SmoothStage


def collect_channel_absmax(ctx: LayerContext, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each listed Linear over all calibration tokens."""
    stats: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        stats[name] = torch.maximum(stats[name], m) if name in stats else m

    with ctx.observe_inputs(names, observe):
        ctx.forward()
    return stats


def smooth_layer(ctx: LayerContext, cfg: SmoothStage) -> dict:
    """Fold SmoothQuant factors into each mapping of the adapter; the layer's function is unchanged."""
    mappings = [m for m in ctx.adapter.smooth_mappings if cfg.mappings == "all" or m.kind == "norm"]
    absmax = collect_channel_absmax(ctx, [m.balance[0] for m in mappings])
    report = {}
    mc = ctx.model_config
    for m in mappings:
        balance = [ctx.linear(b) for b in m.balance]
        s = sq.smoothing_factors(absmax[m.balance[0]], [b.weight for b in balance], cfg.alpha)
        smooth_mod = ctx.layer.get_submodule(m.smooth)
        if m.gqa:
            heads, kv, hd = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
            s_kv = sq.tie_over_kv_groups(s, heads, kv, hd)
            s = sq.expand_kv_to_heads(s_kv, heads, kv, hd)
            smooth_mod.weight.data = sq.fold_into_output_rows(smooth_mod.weight.data, s_kv)
        elif m.kind == "linear":
            smooth_mod.weight.data = sq.fold_into_output_rows(smooth_mod.weight.data, s)
        else:
            smooth_mod.weight.data = sq.fold_into_norm(smooth_mod.weight.data, s)
        for b in balance:
            b.weight.data = sq.fold_into_input_columns(b.weight.data, s)
        report[m.smooth] = {"factor_min": float(s.min()), "factor_max": float(s.max())}
    return report


def make_smooth(cfg: SmoothStage) -> Stage:
    return lambda ctx: smooth_layer(ctx, cfg)


def fp8_layer(ctx: LayerContext, cfg: FP8Stage) -> dict:
    """Quantize every Linear of the layer to FP8 and register how its activations are quantized."""
    names = list(ctx.adapter.linears)
    dtype = next(ctx.layer.parameters()).dtype
    input_absmax = {}
    if cfg.activations == "static":
        input_absmax = {n: a.amax() for n, a in collect_channel_absmax(ctx, names).items()}
    shared_scale: dict[str, torch.Tensor] = {}
    if cfg.weights == "tensor":
        # vLLM fuses q/k/v and gate/up and would requantize shards to their max scale: share it up front.
        for group in ctx.adapter.fused_groups:
            absmax = max(float(ctx.linear(n).weight.float().abs().amax()) for n in group)
            for n in group:
                shared_scale[n] = torch.tensor([absmax / fp8q.FP8_MAX], dtype=dtype).clamp(min=fp8q.MIN_SCALE)
    report = {}
    for name in names:
        lin = ctx.linear(name)
        w = lin.weight.data
        qw = fp8q.quantize_fp8(w, cfg.weights, cfg.block_size, scale_dtype=dtype, scale=shared_scale.get(name))
        report[name] = {"weight_rel_error": fp8q.weight_error(w, qw)}
        lin.weight.data = qw.dequantize(dtype)
        full = ctx.full_name(name)
        ctx.state.records[full] = _to_cpu(qw)
        if cfg.activations == "dynamic":
            mode = "group" if cfg.weights == "block" else "token"
            ctx.state.activations[full] = ActivationSpec(mode, group_size=cfg.block_size)
        elif cfg.activations == "static":
            scale = fp8q.static_input_scale(input_absmax[name], dtype)
            ctx.state.activations[full] = ActivationSpec("tensor", input_scale=scale)
            report[name]["input_scale"] = float(scale)
    return report


def make_fp8(cfg: FP8Stage) -> Stage:
    return lambda ctx: fp8_layer(ctx, cfg)


def _to_cpu(qw):
    for f in ("q", "scale", "zero_point", "g_idx"):
        t = getattr(qw, f)
        if t is not None:
            setattr(qw, f, t.to("cpu"))
    return qw


STAGE_FACTORIES = {"smooth": make_smooth, "fp8": make_fp8}


def build_stages(recipe) -> list[tuple[str, Stage]]:
    """Stages of the recipe in order, each bound to its config."""
    from qwenquant.recipe import stage_name

    out = []
    for cfg in recipe.stages:
        name = stage_name(cfg)
        if name not in STAGE_FACTORIES:
            raise NotImplementedError(f"stage {name!r} is not available in this build")
        out.append((name, STAGE_FACTORIES[name](cfg)))
    return out
