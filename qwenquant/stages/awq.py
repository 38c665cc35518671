"""The `awq` quantizer stage: activation-aware per-channel scales searched per smoothing mapping and folded, then a
clipping search per weight group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenquant.distributed import World
from qwenquant.quant import awq as awqq
from qwenquant.stages.context import LayerContext
from qwenquant.stages.fold import fold_mapping
from qwenquant.stages.int_weights import (check_group_size, check_int_fields, int_label, int_probe_quantize,
                                          int_record_bytes, int_serving_scheme, int_tag)
from qwenquant.stages.observe import quantized_names, sample_inputs, store_int
from qwenquant.stages.spec import StageSpec
from qwenquant.validation import boolean, positive

MAX_AWQ_TOKENS = 8192  # calibration tokens kept per input for AWQ's searches (bounds memory)
CLIP_ROW_BATCH = 64  # output rows per step of the clip search (bounds memory; the unit ranks split rows in)


@dataclass
class AWQStage:
    bits: int = 4
    group_size: int = 128  # -1 = per output channel
    symmetric: bool = False
    n_grid: int = 20
    clip: bool = True
    norm_mappings: bool = True  # input_layernorm -> q/k/v (measured on Qwen3, see benchmarks)

    def __post_init__(self) -> None:
        check_int_fields("awq", self)
        positive("awq.n_grid", self.n_grid)
        boolean("awq.clip", self.clip)
        boolean("awq.norm_mappings", self.norm_mappings)


def awq_layer(ctx: LayerContext, cfg: AWQStage) -> dict:
    """AWQ: per smoothing group, search the activation-aware scale, fold it, then search clipping per group.

    v_proj -> o_proj is skipped under GQA (one v channel feeds several heads, so no exact per-channel fold).
    In a distributed world the ranks share the alpha grids and the clip searches' rows (`search_scales_shared`,
    `search_clip_shared`): the same choices as a single process, each rank computing a share of them.
    """
    mc = ctx.model_config
    gqa = mc.num_attention_heads != mc.num_key_value_heads
    mappings = [m for m in ctx.adapter.smooth_mappings
                if not (m.gqa and gqa) and (cfg.norm_mappings or m.kind != "norm" or m.smooth != "input_layernorm")
                and quantized_names(ctx, m.balance)]  # no scale search for a kept (unquantized) balance group
    inputs = sorted({g[0] for g in ctx.adapter.sequential_groups})
    xs = sample_inputs(ctx, inputs, MAX_AWQ_TOKENS)
    input_of = {n: g[0] for g in ctx.adapter.sequential_groups for n in g}
    report: dict = {"scales": {}}
    for m in mappings:
        balance = [ctx.linear(b) for b in m.balance]
        x = xs[input_of[m.balance[0]]]
        dtype = balance[0].weight.dtype
        res = search_scales_shared(ctx.world, x, [b.weight.data for b in balance], cfg, dtype)
        s = res.scales.to(ctx.device)
        s = fold_mapping(ctx, m, s)
        xs[input_of[m.balance[0]]] = x / s.to(x.device)
        report["scales"][m.smooth] = {"alpha": res.ratio, "best_error": min(res.errors), "rtn_error": res.errors[0]}
    for name in quantized_names(ctx, ctx.adapter.linears):
        w = ctx.linear(name).weight.data
        clip = None
        if cfg.clip:
            clip = search_clip_shared(ctx.world, w.float(), xs[input_of[name]].to(w.device), cfg, w.dtype)
        qw = awqq.quantize_weight(w.float(), clip, cfg.bits, cfg.group_size, cfg.symmetric, scale_dtype=w.dtype)
        store_int(ctx, name, qw, report, {"mean_clip": float(clip.mean()) if clip is not None else 1.0})
    return report


def search_scales_shared(world: World, x: torch.Tensor, weights: list[torch.Tensor], cfg: AWQStage,
                         dtype: torch.dtype) -> awqq.AWQScaleResult:
    """`awqq.search_scales`; in a distributed world weight-parallel: every rank holds the same sampled inputs x,
    evaluates a contiguous share of the alpha grid (`World.shard`) and the ranks exchange their errors, so every
    rank picks the single process's alpha (the first smallest error) and computes the same scales."""
    grid = awqq.alpha_grid(cfg.n_grid)
    mine = grid[world.shard(len(grid))]
    errors = awqq.scale_errors(x, weights, mine, None, cfg.bits, cfg.group_size, cfg.symmetric, dtype)
    if world.distributed:
        errors = [e for part in world.gather_objects(errors) for e in part]  # rank order = grid order
    return awqq.best_scale(x, grid, errors)


def search_clip_shared(world: World, w: torch.Tensor, x: torch.Tensor, cfg: AWQStage,
                       dtype: torch.dtype) -> torch.Tensor:
    """`awqq.search_clip` [N, n_groups]; in a distributed world weight-parallel: each rank searches a contiguous
    share of the output rows, cut at multiples of the search's row batch (so every batch is the single process's:
    the same bits), and the ranks exchange their rows' ratios. Fewer batches than ranks: every rank searches all."""
    batch = CLIP_ROW_BATCH
    if not world.distributed or -(-w.shape[0] // batch) < world.size:
        return awqq.search_clip(w, x, cfg.bits, cfg.group_size, cfg.symmetric, batch_size=batch, scale_dtype=dtype)
    mine = world.shard(w.shape[0], batch)
    part = awqq.search_clip(w[mine], x, cfg.bits, cfg.group_size, cfg.symmetric, batch_size=batch, scale_dtype=dtype)
    return world.gather_rows(part, world.counts(w.shape[0], batch))


# -- the estimator's cost model (StageSpec cost fields; qwenquant/estimate/) ----------------------------------------

# the smoothing mappings' balance Linears (Qwen3's), for the scale search's time
AWQ_MAPPINGS = (("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("gate_up", ("mlp.gate_proj", "mlp.up_proj")), ("down", ("mlp.down_proj",)))


def _host_bytes(cfg: AWQStage, need) -> tuple[int, str]:
    """The sampled inputs (float32, one per distinct input) and the search's outputs of the layer's Linears."""
    copies, _ = need.weight_copies()
    tokens = min(MAX_AWQ_TOKENS, need.calib_tokens)
    inputs = sum({l.local: l.k for l in need.layer_linears(0)}.values())
    outputs = sum(l.n for l in need.layer_linears(0))
    return copies + 4 * tokens * inputs + 2 * 4 * tokens * outputs, "AWQ sampled inputs and search outputs"


def _seconds(cfg: AWQStage, need) -> tuple[float, str]:
    """A forward for the inputs; per mapping `n_grid` candidate scales, each quantizing and running its Linears on
    the sampled tokens; the clip search per weight; a quantizer pass."""
    probe, flops = need.probe, need.fp32_flops
    tokens = min(MAX_AWQ_TOKENS, need.calib_tokens)
    mappings = list(AWQ_MAPPINGS if cfg.norm_mappings else AWQ_MAPPINGS[1:])
    if need.config.get("num_attention_heads") == need.config.get("num_key_value_heads"):  # v -> o only without GQA
        mappings.append(("o", ("self_attn.o_proj",)))
    by_local = {(l.layer, l.local): l for l in need.linears}
    search = 0.0
    for i in range(need.layers):
        for _, members in mappings:
            ls = [by_local[(i, m)] for m in members if (i, m) in by_local]
            search += cfg.n_grid * sum(2 * tokens * l.n * l.k / flops + l.n * l.k * probe.quant_s_per_weight
                                       + probe.quant_s_per_linear for l in ls)
    clip = need.weights * probe.awq_clip_s_per_weight if cfg.clip else 0.0
    return need.calibration_forwards() + search + clip + need.quant_pass, ""


def _repeated_seconds(cfg: AWQStage, need) -> float:
    """What every rank of a distributed run repeats in full: the quantizer pass over every weight (the forwards, the
    alpha grid and the clip search's rows are split over the ranks)."""
    return need.quant_pass


def _probe(cfg: AWQStage, kit) -> dict[str, float]:
    """The clip search per weight, on one batch of 64 output rows (search_clip works in such batches)."""
    xs = torch.randn(min(512, max(kit.tokens, 1)), kit.weight.shape[1], device=kit.device)
    ws = kit.weight[:64].float()
    t = kit.time(lambda: awqq.search_clip(ws, xs, cfg.bits, cfg.group_size, cfg.symmetric, scale_dtype=kit.dtype),
                 max_calls=1)
    return {"awq_clip_s_per_weight": t / ws.numel()}


def _tag(cfg: AWQStage) -> str:
    return "-".join(filter(None, [int_tag(default_symmetric=False)(cfg), "" if cfg.clip else "NOCLIP"]))


SPEC = StageSpec("awq", AWQStage, "quantizer", awq_layer, record_kind="int", check_linear=check_group_size,
                 host_bytes=_host_bytes, seconds=_seconds, repeated_seconds=_repeated_seconds,
                 record_bytes=int_record_bytes, label=int_label,
                 probe_quantize=int_probe_quantize, probe=_probe, tag=_tag,
                 serving_scheme=int_serving_scheme, data_parallel=lambda _cfg: True)
