"""The `gptq` quantizer stage: GPTQ, true-sequential inside each decoder layer (q/k/v, then o, then gate/up, then
down), each group seeing the inputs of the already quantized ones; Linears sharing an input run one column loop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from qwenquant.distributed import World
from qwenquant.quant import gptq as gptqq
from qwenquant.stages.context import LayerContext
from qwenquant.stages.int_weights import (check_clip_fields, check_group_size, check_int_fields, clip_key, int_label,
                                          int_probe_quantize, int_record_bytes, int_serving_scheme, int_tag,
                                          resolve_clip)
from qwenquant.stages.observe import clip_report, quantized_names, store_int
from qwenquant.stages.per_layer_search import layer_clips
from qwenquant.stages.spec import ROUGH_TIME_NOTE, StageSpec
from qwenquant.validation import choice, positive


@dataclass
class GPTQStage(gptqq.GPTQConfig):
    """The GPTQ math's settings (`qwenquant.quant.gptq.GPTQConfig`, the one home of their defaults) plus the
    stage's per-Linear clip ratios. Act-order defaults to static here (the math's default is none)."""

    actorder: str = "static"  # static | group | none
    clip: dict = field(default_factory=dict)
    clip_search: bool = False

    def __post_init__(self) -> None:
        check_int_fields("gptq", self)
        check_clip_fields("gptq", self)
        choice("gptq.actorder", self.actorder, gptqq.ACTORDERS)
        if not 0.0 <= self.dampening_frac < 1.0:
            raise ValueError(f"gptq.dampening_frac: must be in [0, 1), got {self.dampening_frac}")
        positive("gptq.block_size", self.block_size)
        super().__post_init__()


def gptq_layer(ctx: LayerContext, cfg: GPTQStage) -> dict:
    """GPTQ on the INT grid of `cfg`, true-sequential (`sequential_gptq`), with the stage's per-Linear clip ratios."""
    clips, search = layer_clips(ctx, cfg, clip_key("gptq"), quantized_names(ctx, ctx.adapter.linears))  # before any Linear changes

    def solve(group: list[str], weights: list[torch.Tensor], H: torch.Tensor) -> list[tuple[gptqq.GPTQResult, dict]]:
        results = solve_shared(ctx.world, weights, H, cfg, [clips[n] for n in group])
        return [(res, clip_report(clips[n], search.get(n))) for n, res in zip(group, results)]

    return sequential_gptq(ctx, solve)


def solve_shared(world: World, weights: list[torch.Tensor], H: torch.Tensor, cfg: GPTQStage,
                 clip_ratios: list[float]) -> list[gptqq.GPTQResult]:
    """`quantize_weights_shared` on the INT grid; in a distributed world weight-parallel: GPTQ solves each output
    row on its own, so each rank solves a contiguous share of the stacked rows (`World.shard`) and the ranks
    exchange their rows' codes, scales, zero points, losses and pre-rounding weights (`World.gather_rows_of`, one
    exchange per solve)."""
    dtype = weights[0].dtype
    if not world.distributed:
        return gptqq.quantize_weights_shared(weights, H, cfg, scale_dtype=dtype, clip_ratios=clip_ratios)
    W, clip = gptqq.stack_rows(weights, clip_ratios)
    mine = world.shard(W.shape[0])
    part = gptqq.quantize_rows(W[mine], H, cfg, dtype, clip[mine].to(H.device) if torch.is_tensor(clip) else clip)
    counts = world.counts(W.shape[0])
    rec = part.record
    mine_out = [rec.q, rec.scale, part.loss, part.pre_rounding] + ([rec.zero_point] if rec.zero_point is not None else [])
    q, scale, loss, pre, *zero = world.gather_rows_of(mine_out, counts)  # one exchange
    record = dataclasses.replace(rec, q=q, scale=scale, zero_point=zero[0] if zero else None)
    return gptqq.split_shared(weights, gptqq.RowsResult(record, loss, pre))


def combined_hessian(ctx: LayerContext, name: str, S: torch.Tensor | None, n: int) -> torch.Tensor:
    """The Hessian H = 2 S / n (float32) of Linear `name`'s input over every rank's calibration tokens, from this
    rank's float64 sum S = sum_b X_b^T X_b over its n tokens (`gptqq.accumulate_hessian_sum`; None: no tokens).
    In a distributed world S and n are all-reduced (float64 sums, S in place) first; then `gptqq.hessian_from_sum`
    rounds to float32 once, as a single process does. The ranks hold whole calibration batches, so the float32
    batch products are the single process's; only the float64 association of the per-rank partial sums differs,
    which is exact (bit-identical H) unless an entry's terms span more than ~2^29 in magnitude, and then flips the
    float32 rounding of about 2e-9 of such entries (`hessian_from_sum`)."""
    if S is None:
        k = ctx.linear(name).weight.shape[1]
        S = torch.zeros(k, k, dtype=torch.float64, device=ctx.device)
    if ctx.world.distributed:
        tokens = torch.tensor([float(n)], dtype=torch.float64, device=S.device)
        ctx.world.sum_(S)
        ctx.world.sum_(tokens)
        n = int(tokens.item())
    return gptqq.hessian_from_sum(S, n)


def sequential_gptq(ctx: LayerContext, solve) -> dict:
    """GPTQ, true-sequential: each group (q/k/v, o, gate/up, down) sees inputs of the already quantized ones.
    `solve(group, weights, H) -> [(GPTQResult, report extras)]` quantizes one group of Linears sharing an input
    (names relative to the layer, their weights, the Hessian of that input): the grid is the caller's.

    Forwards: one per observation wave, each stopping at the Linears it observes. A submodule whose Linears are all
    final is frozen (computed once per batch, then reused). When the calibration activations live on the compute
    device (CPU runs), the inputs of a submodule's single-Linear group (o_proj, down_proj) are kept while observed,
    so the frozen submodule (self_attn, then mlp for the propagation) is that Linear applied to them: one matmul
    instead of recomputing the attention or gate/up (`LayerContext.linear_output_shortcut`, which checks on the
    first batch that the submodule returns exactly that)."""
    report: dict = {}
    done: set[str] = set()
    ctx.float32_matmuls(list(ctx.adapter.linears))
    kept_inputs: dict[str, dict[int, torch.Tensor]] = {}  # Linear -> batch -> its observed input (see docstring)
    keep_inputs = ctx.device == ctx.cache.store_device

    def freeze(submodule: str) -> None:
        inside = [name for name in kept_inputs if name.startswith(submodule + ".")]
        ctx.freeze_outputs(submodule, ctx.linear_output_shortcut(inside[0], kept_inputs.pop(inside[0]))
                           if len(inside) == 1 else None)

    for wave in observation_waves(ctx.adapter):
        for submodule, linears in ctx.adapter.output_determined_by:  # final already: reuse its outputs
            if done.issuperset(linears):
                freeze(submodule)
        done.update(n for group in wave for n in group)
        groups = [g for g in (quantized_names(ctx, group) for group in wave) if g]
        if not groups:
            continue
        hessians: dict[str, dict] = {g[0]: {"S": None, "n": 0} for g in groups}  # float64 sums of X_b^T X_b
        if keep_inputs:
            kept_inputs.update({g[0]: {} for g in groups if len(g) == 1 and _submodule_of(g[0]) is not None})

        def observe(name: str, x: torch.Tensor) -> None:
            h = hessians[name]
            h["S"] = gptqq.accumulate_hessian_sum(h["S"], x)
            h["n"] += x.reshape(-1, x.shape[-1]).shape[0]
            if name in kept_inputs:
                kept_inputs[name][ctx.batch] = x

        with ctx.observe_inputs([g[0] for g in groups], observe):  # members of a group share one input
            ctx.forward()
        for group in groups:
            weights = [ctx.linear(name).weight.data for name in group]
            h = hessians.pop(group[0])  # the float64 sum is freed before the solve
            H = combined_hessian(ctx, group[0], h["S"], h["n"])
            del h
            for name, (res, extra) in zip(group, solve(list(group), weights, H)):
                store_int(ctx, name, res.record, report, {"gptq_loss": res.loss} | extra)
                ctx.pre_rounding[name] = res.pre_rounding  # a later compensate stage tunes the rounding from here
    # every Linear is final now: the propagation forward reuses the last kept inputs (mlp = down_proj(its input))
    for submodule in {_submodule_of(name) for name in kept_inputs}:
        freeze(submodule)
    return report


def _submodule_of(linear: str) -> str | None:
    """The direct child of the decoder layer holding `linear` directly (`mlp` for `mlp.down_proj`), else None (an
    expert's Linear sits deeper, and a routed expert sees only some tokens)."""
    parts = linear.split(".")
    return parts[0] if len(parts) == 2 else None


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


# -- the estimator's cost model (StageSpec cost fields; qwenquant/estimate/) ----------------------------------------


def _host_bytes(cfg: GPTQStage, need) -> tuple[int, str]:
    """For the widest input (K features), the larger of the accumulation (the float64 sum S of X_b^T X_b and its
    next value, 2 x 8 K^2 bytes; then S and the float32 H formed from it, 12 K^2) and the solve (S freed: H, damped
    H, its factors and inverse, 5 x 4 K^2), plus (CPU runs) the widest Linear's inputs over the calibration set,
    kept from its observation to the propagation (gptq_layer; not kept on CUDA, where this over-counts). Not
    counted: MoE experts observed together keep one float64 sum each (8 K_expert^2 bytes per expert)."""
    copies, _ = need.weight_copies()
    kept = need.calib_tokens * need.widest_input * need.dtype_bytes
    hessian = max(2 * 8, 8 + 4, 5 * 4) * need.widest_input**2
    return copies + hessian + kept, "GPTQ Hessian (float64 sum) and Cholesky factors, kept Linear inputs"


def _seconds(cfg: GPTQStage, need) -> tuple[float, str]:
    """Per group of Linears sharing an input (q/k/v, o, gate/up, down): a Hessian over the calibration tokens (its
    upper triangle), one factorisation, one column loop over the stacked rows and the lazy block updates; the
    observation forwards stop early and reuse attention outputs: about one layer forward in all (in float32 matmuls
    on a CPU without native bf16 ones, faster than the probe's forward in the model dtype: an over-estimate there)."""
    probe, tokens, flops = need.probe, need.calib_tokens, need.fp32_flops
    t = need.calibration_forwards() + need.quant_pass
    for g in need.groups:
        k, rows = g[0].k, sum(l.n for l in g)
        t += tokens * k * (k + gptqq.HESSIAN_PANEL) / flops + (1.3 * k**3 + rows * k * k) / flops
        t += k * (probe.gptq_s_per_column + probe.gptq_s_per_column_row * rows)
    return t, ROUGH_TIME_NOTE if cfg.clip_search else ""


def _repeated_seconds(cfg: GPTQStage, need) -> float:
    """The part of `_seconds` every rank repeats in a distributed run: each group's factorization (1.3 K^3) and the
    column loop's per-column steps (the ranks split the rows, not the columns)."""
    return sum(1.3 * g[0].k**3 / need.fp32_flops + g[0].k * need.probe.gptq_s_per_column for g in need.groups)


def _record_bytes(cfg: GPTQStage, n: int, k: int, dtype_bytes: int) -> int:
    """An INT record, with the [K] int32 group index of act-order `group`."""
    return int_record_bytes(cfg, n, k, dtype_bytes) + (4 * k if cfg.actorder == "group" else 0)


def _probe(cfg: GPTQStage, kit) -> dict[str, float]:
    """The column loop's cost grows with the rows (strided column reads and writes of [N, K] arrays): time 128
    columns (a group needs >= 128) at 256 and 2048 rows."""
    kp = 128
    x = torch.randn(1024, kp, device=kit.device)
    H = 2 * x.T @ x / x.shape[0]
    times = []
    for rows in (256, 2048):
        wp = torch.randn(rows, kp, device=kit.device) * 0.02
        times.append(kit.time(lambda wp=wp: gptqq.quantize_weight(wp, H, cfg, scale_dtype=kit.dtype), budget_s=0.5,
                              max_calls=3))
    # a two-point slope is fragile on a shared machine (one slow call flattens it): at least half of the 2048-row
    # time is per-row work (about 70% on a quiet 2-core box)
    per_row = max((times[1] - times[0]) / (kp * (2048 - 256)), 0.5 * times[1] / (kp * 2048))
    return {"gptq_s_per_column_row": per_row, "gptq_s_per_column": max(times[0] / kp - per_row * 256, 0.0)}


SPEC = StageSpec("gptq", GPTQStage, "quantizer", gptq_layer, record_kind="int", check_linear=check_group_size, resolve=resolve_clip("gptq"),
                 host_bytes=_host_bytes, seconds=_seconds, repeated_seconds=_repeated_seconds,
                 record_bytes=_record_bytes, label=int_label,
                 probe_quantize=int_probe_quantize, probe=_probe, tag=int_tag(default_symmetric=True),
                 serving_scheme=int_serving_scheme, data_parallel=lambda _cfg: True)
