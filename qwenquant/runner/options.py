"""How and where a run is carried out, apart from what it computes (the recipe): the output folder, whether to
replace or resume it, where layers are offloaded, and the command line recorded in the report. None of these
changes a single output tensor, so they are not part of the recipe or of its fingerprint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunOptions:
    out: Path
    overwrite: bool = False  # replace an existing output folder
    resume: bool = False  # continue an interrupted run from its journal (qwenquant/journal.py)
    offload_dir: Path | None = None  # keep decoder layers not in use on disk under this folder (model/offload.py)
    stream: bool = True  # data-free recipes stream tensor by tensor (qwenquant/stream/); False: the in-memory path
    command: str = ""  # the command line, for the report and model card
    dist_timeout_s: float = 1800.0  # distributed runs: how long a rank waits in a collective before giving up

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.offload_dir is not None:
            self.offload_dir = Path(self.offload_dir)
