"""Per-layer stage glue: gather statistics with hooks, call the pure algorithms, write weights back.

Each `*_layer(ctx, cfg)` runs one stage on one decoder layer and returns a small JSON-able report for it.
"""

from __future__ import annotations

from functools import partial

import torch

from qwenquant.pipeline import ActivationSpec, LayerContext, Stage
from qwenquant.quant import fp8 as fp8q
from qwenquant.quant import smooth as sq
from qwenquant.quant import awq as awqq
from qwenquant.quant import gptq as gptqq
from qwenquant.quant import intq
from qwenquant.recipe import AWQStage, FP8Stage, GPTQStage, RTNStage, SmoothStage
from qwenquant.recipe import MixedPrecisionStage
from qwenquant.compensation import compensate_layer
from qwenquant.search import layer_alpha, layer_clips, layer_granularity

MAX_AWQ_TOKENS = 8192  # calibration tokens kept per input for AWQ's searches (bounds memory)


def collect_channel_absmax(ctx: LayerContext, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each listed Linear over all calibration tokens."""
    stats: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        stats[name] = torch.maximum(stats[name], m) if name in stats else m

    with ctx.observe_inputs(names, observe):
        ctx.forward()
    return stats


def fold_mapping(ctx: LayerContext, m, s: torch.Tensor) -> torch.Tensor:
    """Divide what `m.smooth` emits by s and multiply the balance Linears' input columns by s (exact in float).

    Under GQA (v_proj -> o_proj) s is first tied over the query heads sharing a v head; returns the s applied.
    """
    smooth_mod = ctx.layer.get_submodule(m.smooth)
    if m.gqa:
        mc = ctx.model_config
        heads, kv, hd = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
        s_kv = sq.tie_over_kv_groups(s, heads, kv, hd)
        s = sq.expand_kv_to_heads(s_kv, heads, kv, hd)
        smooth_mod.weight.data = sq.fold_into_output_rows(smooth_mod.weight.data, s_kv)
    elif m.kind == "linear":
        smooth_mod.weight.data = sq.fold_into_output_rows(smooth_mod.weight.data, s)
    else:
        smooth_mod.weight.data = sq.fold_into_norm(smooth_mod.weight.data, s)
    for name in m.balance + m.passthrough:  # passthrough: unquantized readers (MoE router) keep the function exact
        lin = ctx.linear(name)
        lin.weight.data = sq.fold_into_input_columns(lin.weight.data, s)
    return s


def smooth_layer(ctx: LayerContext, cfg: SmoothStage, quantizer: FP8Stage | None = None) -> dict:
    """Fold SmoothQuant factors into each mapping of the adapter; the layer's function is unchanged.
    With `cfg.alpha_search` the layer's alpha is chosen by the error of `quantizer` (qwenquant/search.py)."""
    mappings = [m for m in ctx.adapter.smooth_mappings if cfg.mappings == "all" or m.kind == "norm"]
    absmax = collect_channel_absmax(ctx, [m.balance[0] for m in mappings])
    report = {}
    alpha, alpha_report = layer_alpha(ctx, cfg, quantizer, mappings, absmax)
    if alpha_report:
        report["alpha_search"] = alpha_report
    for m in mappings:
        balance = [ctx.linear(b) for b in m.balance]
        s = sq.smoothing_factors(absmax[m.balance[0]], [b.weight for b in balance], alpha)
        s = fold_mapping(ctx, m, s)
        report[m.smooth] = {"factor_min": float(s.min()), "factor_max": float(s.max())}
    return report


def quantized_names(ctx: LayerContext, names) -> list[str]:
    """`names` (relative to the layer) minus the Linears a mixed_precision stage keeps in the source dtype."""
    return [n for n in names if ctx.full_name(n) not in ctx.state.keep]


def mixed_precision_layer(ctx: LayerContext, cfg: MixedPrecisionStage) -> dict:
    """Mark this layer's Linears listed in `cfg.keep` as kept: later stages leave them unquantized (no record, so
    the exporter writes them in the source dtype and lists them in `ignore`)."""
    if cfg.keep is None:
        raise ValueError("mixed_precision: the keep list is not resolved (run it through qwenquant.run.run_recipe)")
    kept = [n for n in ctx.adapter.linears if ctx.full_name(n) in cfg.keep]
    ctx.state.keep.update(ctx.full_name(n) for n in kept)
    return {"kept": kept}


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
    clips, clip_search = layer_clips(ctx, cfg, names, gran)  # weight clipping ratio per Linear (1.0: absmax)
    if cfg.weights == "tensor":
        # vLLM fuses q/k/v and gate/up and would requantize shards to their max scale: share it up front.
        for group in ctx.adapter.fused_groups:
            absmax = max(float(ctx.linear(n).weight.float().abs().amax()) for n in group)
            absmax *= min(clips.get(n, 1.0) for n in group)
            for n in group:
                shared_scale[n] = torch.tensor([absmax / fp8q.FP8_MAX], dtype=dtype).clamp(min=fp8q.MIN_SCALE)
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
        ctx.state.records[full] = _to_cpu(qw)
        if cfg.activations == "dynamic":
            mode = "group" if gran[name] == "block" else "token"
            ctx.state.activations[full] = ActivationSpec(mode, group_size=cfg.block_size)
        elif cfg.activations == "static":
            scale = fp8q.static_input_scale(input_absmax[name], dtype)
            ctx.state.activations[full] = ActivationSpec("tensor", input_scale=scale)
            report[name]["input_scale"] = float(scale)
    return report


def _store_int(ctx: LayerContext, name: str, qw, report: dict, extra: dict | None = None) -> None:
    """Record an INT result and make the live module compute with the dequantized weight."""
    lin = ctx.linear(name)
    w = lin.weight.data
    dtype = w.dtype
    deq = qw.dequantize()
    report[name] = {"weight_rel_error": float((w.float() - deq).norm() / w.float().norm().clamp(min=1e-12))} | (extra or {})
    lin.weight.data = deq.to(dtype)
    ctx.state.records[ctx.full_name(name)] = _to_cpu(qw)


def rtn_layer(ctx: LayerContext, cfg: RTNStage) -> dict:
    """Round-to-nearest with the same group layout: the baseline every INT benchmark reports."""
    report: dict = {}
    names = quantized_names(ctx, ctx.adapter.linears)
    clips, search = layer_clips(ctx, cfg, names)  # 1.0 unless clip ratios are given or searched
    for name in names:
        w = ctx.linear(name).weight.data
        qw = intq.quantize_rtn(w.float(), cfg.bits, cfg.group_size, cfg.symmetric, clips[name], scale_dtype=w.dtype)
        _store_int(ctx, name, qw, report, _clip_report(clips[name], search.get(name)))
    return report


def _clip_report(clip: float, search: dict | None) -> dict:
    return ({"clip": clip} if clip != 1.0 or search else {}) | ({"clip_search": search} if search else {})


def gptq_layer(ctx: LayerContext, cfg: GPTQStage) -> dict:
    """GPTQ, true-sequential: each group (q/k/v, o, gate/up, down) sees inputs of the already quantized ones."""
    gcfg = gptqq.GPTQConfig(
        bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric,
        actorder=None if cfg.actorder == "none" else cfg.actorder,
        dampening_frac=cfg.dampening_frac, block_size=cfg.block_size,
    )
    report: dict = {}
    done: set[str] = set()
    clips, search = layer_clips(ctx, cfg, quantized_names(ctx, ctx.adapter.linears))  # before any Linear changes
    for wave in observation_waves(ctx.adapter):
        for submodule, linears in ctx.adapter.output_determined_by:  # final already: reuse its outputs
            if done.issuperset(linears):
                ctx.freeze_outputs(submodule)
        done.update(n for group in wave for n in group)
        groups = [g for g in (quantized_names(ctx, group) for group in wave) if g]
        if not groups:
            continue
        hessians: dict[str, dict] = {g[0]: {"H": None, "n": 0} for g in groups}

        def observe(name: str, x: torch.Tensor) -> None:
            h = hessians[name]
            h["H"], h["n"] = gptqq.accumulate_hessian(h["H"], x, h["n"])

        with ctx.observe_inputs([g[0] for g in groups], observe):  # members of a group share one input
            ctx.forward()
        for group in groups:
            weights = [ctx.linear(name).weight.data for name in group]
            results = gptqq.quantize_weights_shared(weights, hessians[group[0]]["H"], gcfg, scale_dtype=weights[0].dtype,
                                                    clip_ratios=[clips[n] for n in group])
            for name, res in zip(group, results):
                _store_int(ctx, name, res.record, report,
                           {"gptq_loss": res.loss} | _clip_report(clips[name], search.get(name)))
                ctx.pre_rounding[name] = res.pre_rounding  # a later compensate stage tunes the rounding from here
    return report


def observation_waves(adapter) -> list[list[tuple[str, ...]]]:
    """The sequential groups in order, consecutive groups the adapter marks as independent merged into one wave
    (observed in one forward)."""
    together = {first: i for i, firsts in enumerate(adapter.observed_together) for first in firsts}
    waves: list[list[tuple[str, ...]]] = []
    last = None
    for group in adapter.sequential_groups:
        key = together.get(group[0])
        if key is not None and key == last:
            waves[-1].append(group)
        else:
            waves.append([group])
        last = key
    return waves


def _sample_inputs(ctx: LayerContext, names: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """Up to `max_tokens` input rows [T, K] per listed Linear, evenly strided over the calibration set."""
    stride = max(1, ctx.cache.num_tokens // max_tokens)
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def observe(name: str, x: torch.Tensor) -> None:
        xs[name].append(x.reshape(-1, x.shape[-1])[::stride].float())

    with ctx.observe_inputs(names, observe):
        ctx.forward()
    return {n: torch.cat(v)[:max_tokens] for n, v in xs.items()}


def awq_layer(ctx: LayerContext, cfg: AWQStage) -> dict:
    """AWQ: per smoothing group, search the activation-aware scale, fold it, then search clipping per group.

    v_proj -> o_proj is skipped under GQA (one v channel feeds several heads, so no exact per-channel fold).
    """
    mc = ctx.model_config
    gqa = mc.num_attention_heads != mc.num_key_value_heads
    mappings = [m for m in ctx.adapter.smooth_mappings
                if not (m.gqa and gqa) and (cfg.norm_mappings or m.kind != "norm" or m.smooth != "input_layernorm")
                and quantized_names(ctx, m.balance)]  # no scale search for a kept (unquantized) balance group
    inputs = sorted({g[0] for g in ctx.adapter.sequential_groups})
    xs = _sample_inputs(ctx, inputs, MAX_AWQ_TOKENS)
    input_of = {n: g[0] for g in ctx.adapter.sequential_groups for n in g}
    report: dict = {"scales": {}}
    for m in mappings:
        balance = [ctx.linear(b) for b in m.balance]
        x = xs[input_of[m.balance[0]]]
        dtype = balance[0].weight.dtype
        res = awqq.search_scales(x, [b.weight.data for b in balance], None, cfg.bits, cfg.group_size, cfg.symmetric,
                                 cfg.n_grid, scale_dtype=dtype)
        s = res.scales.to(ctx.device)
        s = fold_mapping(ctx, m, s)
        xs[input_of[m.balance[0]]] = x / s.to(x.device)
        report["scales"][m.smooth] = {"alpha": res.ratio, "best_error": min(res.errors), "rtn_error": res.errors[0]}
    for name in quantized_names(ctx, ctx.adapter.linears):
        w = ctx.linear(name).weight.data
        clip = None
        if cfg.clip:
            clip = awqq.search_clip(w.float(), xs[input_of[name]].to(w.device), cfg.bits, cfg.group_size, cfg.symmetric,
                                    scale_dtype=w.dtype)
        qw = awqq.quantize_weight(w.float(), clip, cfg.bits, cfg.group_size, cfg.symmetric, scale_dtype=w.dtype)
        _store_int(ctx, name, qw, report, {"mean_clip": float(clip.mean()) if clip is not None else 1.0})
    return report


def _to_cpu(qw):
    for f in ("q", "scale", "zero_point", "g_idx"):
        t = getattr(qw, f)
        if t is not None:
            setattr(qw, f, t.to("cpu"))
    return qw


LAYER_STAGES = {
    "smooth": smooth_layer,
    "fp8": fp8_layer,
    "rtn": rtn_layer,
    "gptq": gptq_layer,
    "awq": awq_layer,
    "mixed_precision": mixed_precision_layer,
    "compensate": compensate_layer,
}


def build_stages(recipe) -> list[tuple[str, Stage]]:
    """Stages of the recipe in order, each bound to its config (a smooth stage also to the FP8 quantizer whose
    error its alpha search measures)."""
    from qwenquant.recipe import stage_name

    def bind(cfg) -> Stage:
        extra = {"quantizer": recipe.stage("fp8")} if stage_name(cfg) == "smooth" else {}
        return partial(LAYER_STAGES[stage_name(cfg)], cfg=cfg, **extra)

    return [(stage_name(cfg), bind(cfg)) for cfg in recipe.stages]
