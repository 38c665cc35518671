"""Per-layer glue of the scale search (`--scale-search`): per-Linear weight clipping ratios for the fp8, rtn and
gptq stages, the FP8 weight granularity per vLLM fused group, and a per-layer SmoothQuant alpha for the smooth
stage (measured with the recipe's fp8 or int8 quantizer), each chosen by the output error it causes on calibration
inputs (the math: `qwenquant.quant.scale_search`).
Choices go to the layer report and to `state.searched` under the keys below; each stage's `resolve` writes them
into the recipe saved with the output, which then replays them without searching.

Sensitivity decides the grid: within a layer, Linears whose error at clip 1.0 is above the layer's median get the
fine clip grid; a layer whose error at the configured alpha is above the mean of the earlier layers' (layer 0: no
reference) gets the fine alpha grid.
"""

from __future__ import annotations

import statistics

import torch

from qwenquant.quant import fp8 as fp8q
from qwenquant.quant import intq
from qwenquant.quant import scale_search as ss
from qwenquant.quant import smooth as sq
from qwenquant.stages.context import LayerContext
from qwenquant.stages.observe import sample_inputs

MAX_SEARCH_TOKENS = 4096  # calibration tokens per Linear input used by the searches (evenly strided)
# `QuantState.searched` keys (also in the run journal)
FP8_CLIP_KEY, FP8_GRANULARITY_KEY = "fp8.clip", "fp8.granularity"
SMOOTH_ALPHA_KEY, SMOOTH_BASELINE_KEY = "smooth.layer_alpha", "smooth.baseline_error"
ALPHA_SEARCH_QUANTIZERS = ("fp8", "int8")  # quantizer stages whose configs define `search_rounding(dtype)`


@torch.no_grad()
def layer_granularity(ctx: LayerContext, cfg, names: list[str]) -> tuple[dict[str, str], dict[str, dict]]:
    """FP8 weight granularity per Linear (names relative to the layer) and, when searching, the search record.

    The search compares, per vLLM fused group (one scheme per fused module), channel weights with per-token
    activations against 128x128-block weights with per-group activations by the relative output error of the
    group's Linears on calibration inputs (weights and activations quantized as the engine will); channel wins
    ties. Linears whose input width the block size does not divide stay channel."""
    if not cfg.granularity_search:
        return {n: cfg.weights_for(ctx.full_name(n)) for n in names}, {}
    dtype = next(ctx.layer.parameters()).dtype
    units = [[n for n in g if n in names] for g in ctx.adapter.fused_groups]
    units = [u for u in units if u]
    grouped = {n for u in units for n in u}
    units += [[n] for n in names if n not in grouped]
    input_of = {n: g[0] for g in ctx.adapter.sequential_groups for n in g}
    xs = sample_inputs(ctx, sorted({input_of[n] for n in names}), MAX_SEARCH_TOKENS)
    choice, details = {}, {}

    def unit_errors(u: list[str]) -> dict[str, float]:
        errors = {}
        for g, mode in (("channel", "token"), ("block", "group")):
            if g == "block" and any(ctx.linear(n).weight.shape[1] % cfg.block_size for n in u):
                continue
            num = den = 0.0
            for n in u:
                w = ctx.linear(n).weight.data.float()
                x = xs[input_of[n]].to(ctx.device)
                wq = fp8q.quantize_fp8(w, g, cfg.block_size, scale_dtype=dtype).dequantize()
                xq = fp8q.fake_quantize_activation(x, mode, None, cfg.block_size)
                ref = x @ w.T
                num += float((xq @ wq.T - ref).pow(2).sum())
                den += float(ref.pow(2).sum())
            errors[g] = num / max(den, 1e-30)
        return errors

    for u, errors in zip(units, ctx.world.map(unit_errors, units)):  # the ranks share the units
        best = min(errors, key=lambda g: (errors[g], g != "channel"))
        for n in u:
            choice[n] = best
            details[n] = {"granularity": best, "errors": errors}
    ctx.state.searched.setdefault(FP8_GRANULARITY_KEY, {}).update({ctx.full_name(n): g for n, g in choice.items()})
    return choice, details


def layer_clips(ctx: LayerContext, cfg, key: str, names: list[str],
                granularity: dict[str, str] | None = None) -> tuple[dict[str, float], dict[str, dict]]:
    """Clip ratio per Linear (names relative to the layer) and, when searching, the search record per Linear.

    `cfg` is an fp8, rtn or gptq stage config; the choices go to `ctx.state.searched[key]`. Without `cfg.clip_search` the ratios come from `cfg.clip` (full names; 1.0 when absent). FP8 per-tensor weights
    search per vLLM fused group, whose members share one scale. INT ratios are judged by the round-to-nearest
    output error (for GPTQ a cheap proxy: its error feedback then works inside the chosen range).
    """
    if not cfg.clip_search:
        return {n: float(cfg.clip.get(ctx.full_name(n), 1.0)) for n in names}, {}
    fp8 = key == FP8_CLIP_KEY
    units = ([[n for n in g if n in names] for g in ctx.adapter.fused_groups] if fp8 and cfg.weights == "tensor" else [])
    units = [u for u in units if u]
    grouped = {n for u in units for n in u}
    units += [[n] for n in names if n not in grouped]
    input_of = {n: g[0] for g in ctx.adapter.sequential_groups for n in g}
    xs = sample_inputs(ctx, sorted({input_of[n] for n in names}), MAX_SEARCH_TOKENS)
    dtype = next(ctx.layer.parameters()).dtype

    def quantizer(unit) -> callable:
        g = (granularity or {}).get(unit[0], getattr(cfg, "weights", None))  # a fused unit shares one granularity

        def quantize(w: torch.Tensor, ratio: float) -> torch.Tensor:
            if fp8:
                return fp8q.quantize_fp8(w, g, cfg.block_size, clip_ratio=ratio, scale_dtype=dtype).dequantize()
            return intq.quantize_rtn(w, cfg.bits, cfg.group_size, cfg.symmetric, ratio, dtype).dequantize()

        return quantize

    weights = {tuple(u): torch.cat([ctx.linear(n).weight.data.float() for n in u]) for u in units}
    x_of = {u: xs[input_of[u[0]]].to(ctx.device) for u in weights}
    # the ranks share the units (`World.map`): each unit's search runs on one rank, from the same inputs
    baseline = dict(zip(weights, ctx.world.map(
        lambda u: ss.search_clip(weights[u], x_of[u], (1.0,), quantizer(u)).best_error, list(weights))))
    reference = statistics.median(baseline.values())
    grids = {u: ss.choose_grid(baseline[u], reference, ss.CLIP_GRID_COARSE, ss.CLIP_GRID_FINE) for u in weights}
    results = ctx.world.map(lambda u: ss.search_clip(weights[u], x_of[u], grids[u], quantizer(u)), list(weights))
    clips, details = {}, {}
    for u, res in zip(weights, results):
        grid = grids[u]
        for n in u:
            clips[n] = res.best
            details[n] = {"clip": res.best, "error_at_1": baseline[u], "error": res.best_error,
                          "grid": "fine" if len(grid) == len(ss.CLIP_GRID_FINE) else "coarse"}
    ctx.state.searched.setdefault(key, {}).update({ctx.full_name(n): c for n, c in clips.items()})
    return clips, details


def layer_alpha(ctx: LayerContext, cfg, quantizer, mappings, absmax) -> tuple[float, dict]:
    """This layer's smoothing alpha (`cfg`: a smooth stage config) and, when searching, the search record of the
    output error of `quantizer` (the recipe's quantizer config, one of ALPHA_SEARCH_QUANTIZERS): its
    `search_rounding(dtype)` says how it rounds weights and inputs."""
    if not cfg.alpha_search:
        return cfg.alpha_for(ctx.index), {}
    if not hasattr(quantizer, "search_rounding"):
        raise ValueError(f"smooth.alpha_search: needs a {' or '.join(ALPHA_SEARCH_QUANTIZERS)} quantizer stage whose "
                         "error it measures")
    mc, dtype = ctx.model_config, next(ctx.layer.parameters()).dtype
    xs = sample_inputs(ctx, sorted({m.balance[0] for m in mappings}), MAX_SEARCH_TOKENS)
    quantize_weight, quantize_input = quantizer.search_rounding(dtype)

    def errors(grid) -> list[list[float]]:
        """Per mapping (the ranks share the mappings: `World.map`), the output error at each alpha of `grid`."""

        def mapping_errors(m) -> list[float]:
            a_max = absmax[m.balance[0]]
            ws = [ctx.linear(b).weight.data for b in m.balance]

            def factors(alpha: float, m=m, a_max=a_max, ws=ws) -> torch.Tensor:
                s = sq.smoothing_factors(a_max, ws, alpha)
                if m.gqa:
                    heads, kv, hd = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
                    s = sq.expand_kv_to_heads(sq.tie_over_kv_groups(s, heads, kv, hd), heads, kv, hd)
                return s

            def rounded_input(x: torch.Tensor, s: torch.Tensor, a_max=a_max) -> torch.Tensor:
                return quantize_input(x, s, a_max)

            return ss.alpha_errors(xs[m.balance[0]], ws, grid, factors, quantize_weight, rounded_input)

        return ctx.world.map(mapping_errors, list(mappings))

    base_errors = errors([cfg.alpha])
    baseline = sum(e[0] for e in base_errors)
    history = ctx.state.searched.setdefault(SMOOTH_BASELINE_KEY, {})
    reference = statistics.mean(history.values()) if history else None
    history[ctx.index] = baseline
    grid = ss.choose_grid(baseline, reference, ss.ALPHA_GRID_COARSE, ss.ALPHA_GRID_FINE)
    grid = (float(cfg.alpha), *[g for g in grid if g != cfg.alpha])  # the configured alpha first: it wins ties
    rest = errors(grid[1:])
    res = ss.search_alpha(grid, [[b[0], *r] for b, r in zip(base_errors, rest)])
    ctx.state.searched.setdefault(SMOOTH_ALPHA_KEY, {})[ctx.index] = res.best
    return res.best, {"alpha": res.best, "error_at_default": baseline, "error": res.best_error,
                      "grid": "fine" if len(grid) >= len(ss.ALPHA_GRID_FINE) else "coarse",
                      "errors": dict(zip(grid, res.errors))}
