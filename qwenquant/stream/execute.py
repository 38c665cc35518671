"""Carry out a stream plan: every output tensor is computed and written in place by worker threads (reads,
torch's kernels and `os.pwrite` release the GIL), into the shard layout made up front (qwenquant/stream/shards.py).

Jobs run in plan order, at most `workers` at a time; a job holds one fused group's source weights and outputs (a
quantize job, admitted only while the jobs in flight fit WORK_BUDGET_BYTES together) or one piece of at most
COPY_CHUNK_BYTES of a copied tensor, so memory is bounded whatever the model's size. Every source tensor is
checked finite on the way (a broken checkpoint is bad input, refused in one line; the output folder is never
renamed into place).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable

import torch

from qwenquant.errors import BadInputError
from qwenquant.export.format_spec import UnstorableRecord
from qwenquant.export.registry import FORMATS
from qwenquant.stages.registry import spec_of
from qwenquant.stream.plan import Item, StreamPlan
from qwenquant.stream.shards import ShardLayout
from qwenquant.stream.source import SourceFiles

COPY_CHUNK_BYTES = 64 * 2**20
# Working memory the jobs in flight may use together: a quantize job holds about WORK_FACTOR times its source bytes
# (the weights in the model dtype, a float32 copy, the float32 quotient, codes and outputs); jobs wait until their
# estimate fits, and a job larger than the whole budget runs alone.
WORK_BUDGET_BYTES = 1280 * 2**20
WORK_FACTOR = 6


class WorkBudget:
    """Bytes of working memory shared by the worker threads (see WORK_BUDGET_BYTES)."""

    def __init__(self, total: int):
        self.total, self.free = total, total
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, n: int):
        n = min(n, self.total)
        with self._cond:
            self._cond.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            with self._cond:
                self.free += n
                self._cond.notify_all()


def _broken(reference: str, name: str) -> BadInputError:
    return BadInputError(f"--model {reference}: weight {name} contains NaN or Inf; the checkpoint is broken, "
                         "re-download or re-export it")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`: a float32-accumulated sum is finite exactly when every element is, unless finite
    values overflow it (then the elementwise check decides); half the time of `isfinite(t).all()` on bf16."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def quantize_job(job: tuple[str, ...], shared: bool, budget: WorkBudget, source: SourceFiles, layout: ShardLayout,
                 dtype: torch.dtype, recipe, reference: str) -> None:
    """Read each Linear of `job` in the model dtype, quantize it with the stage's data-free quantizer, lay it out
    in the export format and write its tensors. `shared`: the Linears share one scale (their fused group)."""
    need = WORK_FACTOR * sum(source.entries[n + ".weight"].nbytes for n in job)
    with budget.hold(need):
        _quantize(job, shared, source, layout, dtype, recipe, reference)


def _quantize(job: tuple[str, ...], shared: bool, source: SourceFiles, layout: ShardLayout, dtype: torch.dtype,
              recipe, reference: str) -> None:
    cfg = recipe.quantizer_config
    spec, fmt = spec_of(cfg), FORMATS[recipe.export.format]
    weights = {n: source.read(n + ".weight").to(dtype) for n in job}
    for name, w in weights.items():
        if not all_finite(w):
            raise _broken(reference, name + ".weight")
    absmax = {n: float(w.abs().amax()) for n, w in weights.items()} if shared else None
    for name in job:
        qw = spec.quantize_weight(cfg, name, weights.pop(name), absmax)
        try:
            tensors = fmt.linear_tensors(qw, cfg, name, None)
        except UnstorableRecord as err:  # values the format cannot store (GPTQ v1 zero point 0): the data's
            raise BadInputError(f"export to {recipe.export.format} failed: {name}: {err}") from err
        for local, t in tensors.items():
            layout.write(f"{name}.{local}", t)


def copy_job(key: str, start: int, stop: int, source: SourceFiles, layout: ShardLayout, dtype: torch.dtype,
             reference: str) -> None:
    """Rows [start, stop) of tensor `key`, checked finite and converted to `dtype`, into their place."""
    e = source.entries[key]
    piece = source.read(key, start, stop) if e.shape else source.read(key)
    if piece.is_floating_point() and not all_finite(piece):
        raise _broken(reference, key)
    piece = piece.to(dtype) if piece.dtype != dtype else piece
    row_bytes = piece.element_size() * (piece.numel() // max(1, stop - start)) if e.shape else 0
    layout.write(key, piece, at=start * row_bytes)


def _jobs(plan: StreamPlan, source: SourceFiles, shared: bool, budget: WorkBudget | None = None
          ) -> list[tuple[Item, Callable, tuple]]:
    """(item it completes or None, function, arguments) for every job, in plan order."""
    jobs, submitted = [], set()
    for item in plan.items:
        if item.kind == "quantize":
            if item.job not in submitted:
                submitted.add(item.job)
                jobs.append((item, quantize_job, (item.job, shared and len(item.job) > 1, budget)))
            continue
        e = source.entries[item.key]
        rows = e.shape[0] if e.shape else 1
        step = max(1, COPY_CHUNK_BYTES // max(1, e.nbytes // max(rows, 1)))
        for start in range(0, max(rows, 1), step):
            jobs.append((item, copy_job, (item.key, start, min(rows, start + step))))
    return jobs


def stream_plan(plan: StreamPlan, source: SourceFiles, layout: ShardLayout, recipe, reference: str,
                workers: int, on_job: Callable[[], None] | None = None) -> int:
    """Write every output tensor of `plan` into `layout` (created) on `workers` threads; the number of jobs."""
    shared = spec_of(recipe.quantizer_config).shares_scale(recipe.quantizer_config)
    jobs = _jobs(plan, source, shared, WorkBudget(WORK_BUDGET_BYTES))
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="qwenquant-stream") as pool:
        futures: list[Future] = []
        for item, fn, args in jobs:
            rest = (source, layout, item.dtype, recipe, reference) if fn is quantize_job else (source, layout, item.dtype, reference)
            futures.append(pool.submit(fn, *args, *rest))
        try:
            for f in futures:
                f.result()
                if on_job is not None:
                    on_job()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return len(jobs)


def count_jobs(plan: StreamPlan, source: SourceFiles) -> int:
    """How many jobs `stream_plan` runs (for a progress bar)."""
    return len(_jobs(plan, source, False))
