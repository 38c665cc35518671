"""What a distributed run (torchrun / --nproc, qwenquant/distributed.py) adds to `run_recipe`: the refusals before
any work, the check that every rank runs the same recipe on the same files, and the report's `ranks` section.

Every rank resolves, loads the model and builds the same calibration samples; each quantizes with its shard of
them (the layer loop and the stages combine statistics over the ranks). Each rank journals its shard of the
propagated activations; rank 0 alone journals the rest, evaluates, exports, verifies and reports; the other ranks
stop after the last decoder layer. `--resume` needs the same number of ranks (`check_resume`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwenquant import __version__, safe_store
from qwenquant.distributed import World, inputs_hash
from qwenquant.errors import BadInputError
from qwenquant.journal import JOURNAL_DIR, Journal, inputs_name, layers_done_in, read_journal
from qwenquant.pipeline import CALIBRATION_BATCH
from qwenquant.stages.registry import spec_of


def check_ranks(world: World, recipe, weight_files, streamed: bool) -> None:
    """Refuse (on every rank, one line, before any weight is loaded) what a distributed run cannot do, then check
    that the ranks agree on the recipe, qwenquant's version and the source files. Every rank reaches the same
    refusal from the same command; `World.refuse` lets rank 0 print it and exit first (no second line from the
    launcher about another rank's exit)."""
    if not world.distributed:
        return
    what = f"a distributed run ({world.size} ranks)"
    if streamed:
        world.refuse(f"{what} splits calibration data; this recipe uses none (it streams tensor by tensor): "
                     "run it without torchrun / --nproc")
    unsupported = [spec_of(cfg).name for cfg in recipe.stages if not spec_of(cfg).data_parallel(cfg)]
    if unsupported:
        world.refuse(f"stage {', '.join(unsupported)} does not run on several ranks yet (--keep-sensitive is "
                     "single-process); run it without torchrun / --nproc")
    world.all_same("recipe, qwenquant version or source files", inputs_hash(recipe.to_yaml(), weight_files,
                                                                            __version__))


def check_shardable(world: World, calib: torch.Tensor | None) -> None:
    """Every rank needs at least one calibration sample (every rank builds the same samples, so all refuse)."""
    if world.distributed and calib is not None and calib.shape[0] < world.size:
        world.refuse(f"{world.size} ranks but only {calib.shape[0]} calibration samples: use at most "
                     f"{calib.shape[0]} ranks or more --num-samples")


def check_resume(world: World, out_tmp: Path, fingerprint: str) -> None:
    """--resume: refuse, before any weight is loaded and on every rank alike (one line, exit 2), a journal in
    `out_tmp` that this run cannot continue: another recipe or source files (rank 0 compares the fingerprint),
    another number of ranks, or a rank that does not see the journal rank 0 sees or lacks its own shard of the
    last finished layer's activations. Every rank reads the journal itself; the ranks exchange their verdicts, so
    they stop together (each with the first rank's reason, which rank 0 prints) instead of some waiting for the
    others."""
    verdict, done = None, 0
    try:
        done = layers_done_in(out_tmp, fingerprint if world.main else None, world.size)
        if world.distributed and done and (read_journal(out_tmp) or {}).get("inputs"):
            shard = Path(out_tmp) / JOURNAL_DIR / inputs_name(done - 1, world)
            if not safe_store.exists(shard):
                verdict = (f"the interrupted run's journal has no {shard.name} (rank {world.rank}'s activations); "
                           "run without --resume to start over")
    except BadInputError as err:
        verdict = str(err)
    answers = world.gather_objects((verdict, done))
    first = next((v for v, _ in answers if v is not None), None)
    if first is not None:
        world.refuse(first)
    differ = [r for r, (_, d) in enumerate(answers) if d != answers[0][1]]
    if differ:
        world.refuse(f"ranks {differ} see another journal in {out_tmp} than rank 0 ({answers[0][1]} layers done): "
                     "--resume needs the output folder on a file system every rank sees")


def share_journal(world: World, journal: Journal | None) -> Journal:
    """The journal of every rank: rank 0 passes the one it opened (after clearing a stale folder, or keeping it
    for --resume); the other ranks pass None and get theirs, in rank 0's folder with rank 0's fingerprint, only
    once rank 0's is ready (a collective: no rank writes into the folder before rank 0 has cleared it)."""
    folder, fingerprint = world.gather_objects((str(journal.folder.parent), journal.fingerprint)
                                               if world.main else None)[0]
    return journal if world.main else Journal(Path(folder), fingerprint, world)


def ranks_section(world: World, samples: int, peaks: list[int]) -> dict:
    """The report's `ranks` section: world size, backend, samples per rank, each rank's peak host memory while
    quantizing."""
    return {"world_size": world.size, "backend": world.backend, "samples_per_rank": world.counts(samples, CALIBRATION_BATCH),
            "peak_host_bytes_per_rank": peaks,
            "note": "each rank calibrated on its shard of the samples; rank 0 evaluated, exported and verified"}
