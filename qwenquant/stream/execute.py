"""Carry out a stream plan: quantize jobs run on worker threads (torch and the reads release the GIL), and this
thread writes every tensor in plan order as its job finishes, so the output equals the in-memory path's.

Memory is bounded by the jobs in flight: at most `workers + LOOKAHEAD` jobs are submitted and not yet written,
each holding one fused group's source weights and outputs; copied tensors go through in pieces of at most
COPY_CHUNK_BYTES. Every quantized scale and copied floating-point tensor is checked finite on the way (a broken
checkpoint is bad input, refused in one line before the output folder is renamed into place).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from qwenquant.errors import BadInputError
from qwenquant.export.registry import FORMATS
from qwenquant.stages.registry import spec_of
from qwenquant.stream.plan import Item, StreamPlan
from qwenquant.stream.shards import SpillingShardWriter
from qwenquant.stream.source import SourceFiles

COPY_CHUNK_BYTES = 64 * 2**20
LOOKAHEAD = 2


def _broken(reference: str, name: str) -> BadInputError:
    return BadInputError(f"--model {reference}: weight {name} contains NaN or Inf; the checkpoint is broken, "
                         "re-download or re-export it")


def quantize_job(job: tuple[str, ...], shared: bool, source: SourceFiles, dtype: torch.dtype, recipe,
                 reference: str) -> dict[str, dict[str, torch.Tensor]]:
    """The format tensors (local names) of each Linear of `job`: read in the model dtype, quantized by the stage's
    data-free quantizer, laid out by the export format. `shared`: the Linears share one scale (their fused group)."""
    cfg = recipe.quantizer_config
    spec, fmt = spec_of(cfg), FORMATS[recipe.export.format]
    weights = {n: source.read(n + ".weight").to(dtype) for n in job}
    absmax = {n: float(w.abs().amax()) for n, w in weights.items()} if shared else None
    out = {}
    for name in job:
        qw = spec.quantize_weight(cfg, name, weights.pop(name), absmax)
        if not bool(torch.isfinite(qw.scale).all()):
            raise _broken(reference, name + ".weight")
        out[name] = fmt.linear_tensors(qw, cfg, name, None)
    return out


def copy_pieces(source: SourceFiles, key: str, dtype: torch.dtype, reference: str):
    """`key`'s tensor in row pieces of at most COPY_CHUNK_BYTES, converted to `dtype`, each checked finite."""
    e = source.entries[key]
    rows = e.shape[0] if e.shape else 1
    step = max(1, COPY_CHUNK_BYTES // max(1, e.nbytes // max(rows, 1)))
    for start in range(0, rows, step):
        piece = source.read(key, start, min(rows, start + step)) if e.shape else source.read(key)
        if piece.is_floating_point() and not bool(torch.isfinite(piece).all()):
            raise _broken(reference, key)
        yield piece.to(dtype) if piece.dtype != dtype else piece


def stream_plan(plan: StreamPlan, source: SourceFiles, writer: SpillingShardWriter, recipe, reference: str,
                workers: int, on_item: Callable[[Item], None] | None = None) -> None:
    """Write every item of `plan` through `writer`, quantize jobs on `workers` threads (see the module doc)."""
    shared = spec_of(recipe.quantizer_config).shares_scale(recipe.quantizer_config)
    jobs = list(dict.fromkeys(item.job for item in plan.items if item.kind == "quantize"))
    dtype_of = {item.linear: item.dtype for item in plan.items if item.kind == "quantize"}
    futures: dict[tuple[str, ...], Future] = {}
    left: dict[tuple[str, ...], int] = {}  # Linears of a submitted job not yet written
    submitted = 0
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="qwenquant-stream") as pool:

        def top_up() -> None:
            nonlocal submitted
            while submitted < len(jobs) and len(futures) < workers + LOOKAHEAD:
                job = jobs[submitted]
                futures[job] = pool.submit(quantize_job, job, shared and len(job) > 1, source, dtype_of[job[0]],
                                           recipe, reference)
                left[job] = len(job)
                submitted += 1

        try:
            for item in plan.items:
                top_up()
                if item.kind == "quantize":
                    tensors = futures[item.job].result()[item.linear]
                    for local, t in tensors.items():
                        writer.add(f"{item.linear}.{local}", t)
                    left[item.job] -= 1
                    if not left[item.job]:
                        del futures[item.job], left[item.job]
                else:
                    e = source.entries[item.key]
                    writer.add_chunks(item.key, item.dtype, e.shape, copy_pieces(source, item.key, item.dtype, reference))
                if on_item is not None:
                    on_item(item)
        except BaseException:
            for f in futures.values():
                f.cancel()
            raise
