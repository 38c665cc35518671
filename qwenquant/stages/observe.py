"""Helpers the stages share: statistics of Linear inputs gathered with hooks, and storing a quantized Linear."""

from __future__ import annotations

import torch

from qwenquant.stages.context import LayerContext


def collect_channel_absmax(ctx: LayerContext, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each listed Linear over all calibration tokens."""
    stats: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        stats[name] = torch.maximum(stats[name], m) if name in stats else m

    with ctx.observe_inputs(names, observe):
        ctx.forward()
    if ctx.world.distributed:  # the max over every rank's tokens (in name order: the ranks' collectives pair up)
        for name in sorted(names):
            k = ctx.linear(name).weight.shape[1]
            stats[name] = ctx.world.max_(stats.get(name, torch.zeros(k, device=ctx.device)).contiguous())
    return stats


def sample_inputs(ctx: LayerContext, names: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """Up to `max_tokens` input rows [T, K] per listed Linear, evenly strided over the calibration set.

    Distributed, the stride is the whole set's and the ranks' rows are gathered in rank order: with shards of
    whole batches (`World.shard`) these are the rows a single process samples (the stride restarts per batch)."""
    stride = max(1, ctx.world.total(ctx.cache.num_tokens) // max_tokens)
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def observe(name: str, x: torch.Tensor) -> None:
        xs[name].append(x.reshape(-1, x.shape[-1])[::stride].float())

    with ctx.observe_inputs(names, observe):
        ctx.forward()
    if ctx.world.distributed:
        mine = {n: torch.cat(v) for n, v in xs.items()}
        counts = ctx.world.gather_objects({n: int(x.shape[0]) for n, x in mine.items()})
        return {n: ctx.world.gather_rows(mine[n], [c[n] for c in counts])[:max_tokens] for n in sorted(mine)}
    return {n: torch.cat(v)[:max_tokens] for n, v in xs.items()}


def quantized_names(ctx: LayerContext, names) -> list[str]:
    """`names` (relative to the layer) minus the Linears a mixed_precision stage keeps in the source dtype."""
    return [n for n in names if ctx.full_name(n) not in ctx.state.keep]


def to_cpu(qw):
    """The record with its tensors on the CPU (records outlive the layer's time on the compute device)."""
    for f in ("q", "scale", "zero_point", "g_idx"):
        t = getattr(qw, f)
        if t is not None:
            setattr(qw, f, t.to("cpu"))
    return qw


def store_int(ctx: LayerContext, name: str, qw, report: dict, extra: dict | None = None) -> None:
    """Record an INT result and make the live module compute with the dequantized weight."""
    lin = ctx.linear(name)
    w = lin.weight.data
    dtype = w.dtype
    deq = qw.dequantize()
    report[name] = {"weight_rel_error": float((w.float() - deq).norm() / w.float().norm().clamp(min=1e-12))} | (extra or {})
    lin.weight.data = deq.to(dtype)
    ctx.state.records[ctx.full_name(name)] = to_cpu(qw)


def clip_report(clip: float, search: dict | None) -> dict:
    return ({"clip": clip} if clip != 1.0 or search else {}) | ({"clip_search": search} if search else {})
