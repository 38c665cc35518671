"""What a distributed run (torchrun / --nproc, qwenquant/distributed.py) adds to `run_recipe`: the refusals before
any work, the check that every rank runs the same recipe on the same files, and the report's `ranks` section.

Every rank resolves, loads the model and builds the same calibration samples; each quantizes with its shard of
them (the layer loop and the stages combine statistics over the ranks). Rank 0 alone journals, evaluates, exports,
verifies and reports; the other ranks stop after the last decoder layer.
"""

from __future__ import annotations

import torch

from qwenquant import __version__
from qwenquant.distributed import World, inputs_hash
from qwenquant.errors import BadInputError
from qwenquant.pipeline import CALIBRATION_BATCH
from qwenquant.stages.registry import spec_of


def check_ranks(world: World, recipe, options, weight_files, streamed: bool) -> None:
    """Refuse (on every rank, one line, before any weight is loaded) what a distributed run cannot do, then check
    that the ranks agree on the recipe, qwenquant's version and the source files."""
    if not world.distributed:
        return
    what = f"a distributed run ({world.size} ranks)"
    if streamed:
        raise BadInputError(f"{what} splits calibration data; this recipe uses none (it streams tensor by tensor): "
                            "run it without torchrun / --nproc")
    if options.resume:
        raise BadInputError(f"--resume is not supported for {what}: rank 0 journals only its own shard of the "
                            "calibration activations; run without --resume (or resume with one process)")
    if options.offload_dir is not None:
        raise BadInputError(f"--offload-dir is not supported for {what}; drop it")
    unsupported = [spec_of(cfg).name for cfg in recipe.stages if not spec_of(cfg).data_parallel(cfg)]
    if unsupported:
        raise BadInputError(f"stage {', '.join(unsupported)} does not run on several ranks yet (--keep-sensitive is "
                            "single-process); run it without torchrun / --nproc")
    world.all_same("recipe, qwenquant version or source files", inputs_hash(recipe.to_yaml(), weight_files,
                                                                            __version__))


def check_shardable(world: World, calib: torch.Tensor | None) -> None:
    """Every rank needs at least one calibration sample."""
    if world.distributed and calib is not None and calib.shape[0] < world.size:
        raise BadInputError(f"{world.size} ranks but only {calib.shape[0]} calibration samples: use at most "
                            f"{calib.shape[0]} ranks or more --num-samples")


def ranks_section(world: World, samples: int, peaks: list[int]) -> dict:
    """The report's `ranks` section: world size, backend, samples per rank, each rank's peak host memory while
    quantizing."""
    return {"world_size": world.size, "backend": world.backend, "samples_per_rank": world.counts(samples, CALIBRATION_BATCH),
            "peak_host_bytes_per_rank": peaks,
            "note": "each rank calibrated on its shard of the samples; rank 0 evaluated, exported and verified"}
