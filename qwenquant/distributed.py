"""Runs spread over processes with torch.distributed: one process (rank) per device, launched by torchrun (or by
`--nproc N`, which re-launches the command through torch.distributed.run). Gloo on the CPU, NCCL on CUDA.

A `World` is passed to what needs it (the run, the layer loop, the stages through `LayerContext.world`); there is
no module state. Its collectives are the only ones the stages use:
- `sum_` / `max_`: in-place all-reduce of a statistic (GPTQ's float64 X^T X sums and token counts, activation maxima);
- `gather_rows` / `gather_rows_of`: every rank's rows of a tensor (of several, in one exchange), concatenated in
  rank order (weight-parallel GPTQ: each rank solves some output rows of a Linear group);
- `map`: a function over a list of items (per-unit searches), each rank computing a share, results exchanged;
- `all_same`: the ranks' answers to one question (recipe and source hash) compared before any work;
- `barrier`: every rank got here (the run journal: a layer is counted as done once every rank wrote its share).
A collective that fails (a rank died: the connection to it broke; or stalled past --dist-timeout) raises
`RankLost`, which keeps the journaled layers for --resume (qwenquant/export/writer.py).
A world of size 1 runs none of them: a run without torchrun executes exactly the single-process code.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator, NoReturn

import torch

from qwenquant.errors import BadInputError, QwenquantError, ResumableError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCHED_MARKERS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE")


class RankFailed(QwenquantError):
    """A rank of a --nproc run died or failed, so the launcher stopped the others."""

    exit_code = 1


class RankLost(ResumableError):
    """A collective of this rank failed: another rank died or stalled longer than --dist-timeout."""


def _ignore_sigterm() -> None:
    """From here on this rank's run is over: ignore the launcher's SIGTERM so the error report can finish."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


@contextmanager
def _collective(world: World, what: str) -> Iterator[None]:
    """Turn a failed collective (gloo: RuntimeError "Connection reset by peer" / "Timed out"; NCCL:
    DistBackendError) into RankLost, one line. The run is over then: the launcher's SIGTERM, which follows at once,
    is ignored so that it cannot cut the error report (or the keeping of the journal) short."""
    try:
        yield
    except RuntimeError as err:
        _ignore_sigterm()
        first = re.sub(r"^\[[^\]]*\]\s*", "", (str(err).strip().splitlines() or [""])[0]).split(". This")[0][:200]
        raise RankLost(f"rank {world.rank} of {world.size} lost contact with the other ranks in {what} (another rank "
                       f"died, or stalled longer than --dist-timeout): {first}") from err


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    backend: str = "none"  # gloo | nccl | none (a single process)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the rank that journals, evaluates, exports, verifies and reports."""
        return self.rank == 0

    def shard(self, n: int, unit: int = 1) -> slice:
        """This rank's contiguous part of n items, cut at multiples of `unit` items when there are at least as
        many units as ranks (so each rank's batches of `unit` are the batches a single process forms), else at
        single items; shares differ by at most one unit (or item)."""
        step = unit if -(-n // unit) >= self.size else 1
        units = -(-n // step)
        lo, hi = units * self.rank // self.size, units * (self.rank + 1) // self.size
        return slice(min(lo * step, n), min(hi * step, n))

    def counts(self, n: int, unit: int = 1) -> list[int]:
        """How many of n items each rank's `shard` holds, in rank order."""
        return [len(range(n)[World(r, self.size).shard(n, unit)]) for r in range(self.size)]

    def total(self, n: int) -> int:
        """The integer n summed over the ranks."""
        if not self.distributed:
            return n
        return sum(self.gather_objects(int(n)))

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks, in place (returned for chaining)."""
        if self.distributed:
            with _collective(self, "a sum"):
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """`t`'s elementwise maximum over the ranks, in place."""
        if self.distributed:
            with _collective(self, "a maximum"):
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t

    def gather_rows(self, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each rank's `t` [counts[rank], ...] concatenated along dim 0 in rank order (padded for the exchange)."""
        return self.gather_rows_of([t], counts)[0]

    def gather_rows_of(self, tensors: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
        """`gather_rows` of several tensors with the same rows [counts[rank], ...] (any dtypes), in one exchange:
        each row's bytes of every tensor side by side as uint8 [rows, bytes] (bit-exact: nothing is converted)."""
        if not self.distributed:
            return list(tensors)
        rows = tensors[0].shape[0]
        raw = [t.contiguous().view(rows, -1).view(torch.uint8) if t.numel() else
               torch.empty(rows, 0, dtype=torch.uint8, device=t.device) for t in tensors]
        packed = torch.cat(raw, dim=1)
        width = max(counts)
        pad = torch.zeros((width - rows, packed.shape[1]), dtype=torch.uint8, device=packed.device)
        parts = [torch.empty((width, packed.shape[1]), dtype=torch.uint8, device=packed.device) for _ in range(self.size)]
        with _collective(self, "an exchange of rows"):
            torch.distributed.all_gather(parts, torch.cat([packed, pad]).contiguous())
        whole = torch.cat([p[:c] for p, c in zip(parts, counts)])  # [sum(counts), bytes]
        out, start = [], 0
        for t, r in zip(tensors, raw):
            cols = whole[:, start:start + r.shape[1]].contiguous()
            out.append(cols.view(t.dtype).reshape(whole.shape[0], *t.shape[1:]))
            start += r.shape[1]
        return out

    def map(self, fn, items: list) -> list:
        """[fn(item) for item in items] with each rank computing a contiguous share of the items (`shard`) and the
        ranks exchanging their (small, picklable) results in rank order: weight-parallel per-unit searches. Every
        item is computed by one rank from the same inputs as in a single process, so the results are its."""
        mine = [fn(item) for item in items[self.shard(len(items))]]
        if not self.distributed:
            return mine
        return [r for part in self.gather_objects(mine) for r in part]

    def gather_objects(self, obj) -> list:
        """Every rank's `obj` (small, picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.size
        with _collective(self, "an exchange of values"):
            torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self, what: str) -> None:
        """Wait until every rank got here (`what`: where, for the error when a rank does not)."""
        if self.distributed:
            with _collective(self, what):
                torch.distributed.barrier()

    def leave(self) -> None:
        """End this process's membership after the last collective (rank 0 then evaluates, exports and verifies as
        a single process: transformers' loader must not see a process group)."""
        if self.distributed and torch.distributed.is_initialized():
            self.barrier("the end of the layer loop")
            torch.distributed.destroy_process_group()

    def all_same(self, what: str, value: str) -> None:
        """Raise BadInputError (on every rank) unless every rank has the same `value` (a hash of `what`)."""
        values = self.gather_objects(value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            self.refuse(f"ranks {differ} see a different {what} than rank 0; launch every rank with the same "
                        "command, recipe and model files")

    def refuse(self, message: str) -> NoReturn:
        """Raise BadInputError(message) on every rank, for a refusal all ranks reached together (rank 0 prints
        it). The other ranks first wait until rank 0 has exited (their barrier then fails), so that the launcher
        sees rank 0's exit status, not another rank's with rank 0 stopped before it could print."""
        if self.distributed and self.main:
            _ignore_sigterm()  # the others exit once rank 0 leaves the group: the launcher's SIGTERM must not cut
            # rank 0's error line (or its exit status 2) short
        if self.distributed and not self.main and torch.distributed.is_initialized():
            try:
                torch.distributed.barrier()
            except RuntimeError:
                pass
        raise BadInputError(message)


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables)."""
    return any(v in os.environ for v in LAUNCHED_MARKERS)


def env_rank() -> int:
    """This process's rank per torchrun's variables (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0") or 0)


def check_env() -> None:
    """Refuse a half-set torchrun environment (e.g. WORLD_SIZE without MASTER_ADDR) in one line."""
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise BadInputError(f"a distributed run needs torchrun's variables; {', '.join(missing)} not set: launch "
                            "with `torchrun --nproc-per-node N qwenquant ...` or `qwenquant ... --nproc N`")
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError as err:
        raise BadInputError(f"RANK and WORLD_SIZE must be integers: {err}") from err
    if not 0 <= rank < size:
        raise BadInputError(f"RANK {rank} is not in [0, WORLD_SIZE={size}); launch with torchrun")


@contextmanager
def join_world(device: torch.device, timeout_s: float) -> Iterator[World]:
    """The World of this process for the duration of the block: a single process without torchrun's variables,
    else the process group torchrun describes (gloo on the CPU, NCCL on CUDA, every collective bounded by
    `timeout_s`, so a rank that dies or stalls ends the others with an error instead of a hang)."""
    if not launched():
        yield World()
        return
    check_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield World(torch.distributed.get_rank(), torch.distributed.get_world_size(), backend)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: `cuda` means the GPU torchrun's LOCAL_RANK names."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def inputs_hash(recipe_yaml: str, weight_files: list[Path], version: str) -> str:
    """What every rank must agree on before any work: the recipe, qwenquant's version and the source weights
    (file names, sizes and safetensors headers: not modification times, which differ between nodes)."""
    h = hashlib.sha256(recipe_yaml.encode() + version.encode())
    for f in sorted(Path(p) for p in weight_files):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) == 8:
                h.update(fh.read(min(struct.unpack("<Q", head)[0], 100_000_000)))
    return h.hexdigest()


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `qwenquant argv` in `nproc` processes on this machine through torch.distributed.run (torchrun's
    standalone rendezvous); returns rank 0's exit status (each rank prints its own errors)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if launched():
        raise BadInputError("--nproc launches its own ranks; under torchrun (RANK/WORLD_SIZE set) drop --nproc")
    saved = dict(os.environ)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # the ranks import the qwenquant this process runs, wherever the working folder is
    here = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--module", "qwenquant",
                                         *argv])
    import logging

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR + 10)  # qwenquant's one line says it
    try:
        run(args)
    except ChildFailedError as err:
        failed = {f.local_rank: f.exitcode for f in err.failures.values()}
        killed = {r: c for r, c in failed.items() if r and c < 0 and c != -signal.SIGTERM}
        # rank 0 failed on its own (its one-line error is above), or refused bad input, which every rank refuses
        # together: another rank's death after that (gloo can abort a process whose peer is gone) is a consequence
        if failed.get(0, 0) > 0 and (not killed or failed[0] == BadInputError.exit_code):
            return failed[0]
        # the rank that failed first: one killed by a signal, not one the launcher then stopped with SIGTERM
        rank, code = min(killed.items() or failed.items(), key=lambda rc: (rc[1] == -signal.SIGTERM, rc[0]))
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        raise RankFailed(f"rank {rank} {how}; the other ranks were stopped and no output folder was finished (rerun "
                         "the same command with --resume to continue from the layers journaled so far; a rank's own "
                         "error, if it printed one, is above)") from err
    finally:  # the ranks' environment, not this process's
        os.environ.clear()
        os.environ.update(saved)
    return 0
