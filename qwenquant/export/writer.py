"""Writing an output folder safely: a temporary sibling renamed into place, sharded safetensors with an index."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from qwenquant.errors import BadInputError, InterruptedRun, ResourceError, ResumableError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless --overwrite; refuse a path that is a file."""
    if out.exists():
        if out.is_file():
            raise BadInputError(f"--out {out}: is a file; choose a folder path")
        if not overwrite:
            raise BadInputError(f"--out {out}: already exists; pass --overwrite to replace it or choose another --out")
        if any(out.iterdir()) and not (out / "qwenquant_report.json").is_file():
            raise BadInputError(f"--out {out}: exists and is not a qwenquant output folder; "
                                "refusing to replace it even with --overwrite, choose another --out")
    parent = out.resolve().parent
    while not parent.exists():  # missing parents are created at write time; check the first existing one
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise BadInputError(f"--out {out}: {parent} is not a writable folder; choose another --out")


def partial_dir(out: Path) -> Path:
    """The hidden sibling a run writes into before renaming it to `out` (also where --resume looks)."""
    return Path(out).resolve().parent / f".{Path(out).name}.partial"


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool, resume: bool = False,
                      keep_on_interrupt: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `out` only if the block succeeds, else delete it.

    `resume`: reuse the folder an interrupted run left (else it is replaced). On Ctrl-C / SIGTERM, or a
    `ResumableError` (a lost rank), the folder is kept when `keep_on_interrupt(tmp)` says it holds resumable
    progress, and the user is told how to resume."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(out)
    if tmp.exists() and not resume:
        shutil.rmtree(tmp)
    tmp.mkdir(exist_ok=True)
    try:
        yield tmp
        if out.exists():
            old = out.resolve().parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "disk full" if err.errno == errno.ENOSPC else "disk quota exceeded"
            raise ResourceError(f"{what} while writing {out}; free space or choose another --out") from err
        raise
    except KeyboardInterrupt as err:
        if keep_on_interrupt is not None and keep_on_interrupt(tmp):
            raise InterruptedRun(f"interrupted; progress kept in {tmp}: rerun the same command with --resume "
                                 "to continue") from err
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except ResumableError as err:  # e.g. a lost rank: the layers journaled so far are still right
        if keep_on_interrupt is not None and keep_on_interrupt(tmp):
            raise type(err)(f"{err}; progress kept in {tmp}: rerun the same command with --resume to "
                            "continue") from err
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ShardWriter:
    """Accumulate tensors and write `model-0000i-of-0000n.safetensors` shards of at most `max_bytes`."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        fname = f"shard-{len(self.shards):05d}.safetensors"
        try:
            save_file(self.pending, str(self.folder / fname), metadata={"format": "pt"})
        except OSError:
            raise
        except Exception as err:  # safetensors reports I/O failures as SafetensorError "... (os error 28)"
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), f"{os.strerror(int(code.group(1)))}: {self.folder / fname}") from err
        # safetensors 0.8 creates its file with mode 0600 whatever the umask; give the weights the same
        # permissions as every other file in the folder, or an engine running as another user cannot read them.
        os.chmod(self.folder / fname, 0o666 & ~_umask())
        self.shards.append((fname, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Rename shards to their final names; write the index when there is more than one."""
        self.flush()
        return final_shard_names(self.folder, self.shards, self.total_bytes)


def final_shard_names(folder: Path, shards: list[tuple[str, list[str]]], total_bytes: int) -> list[str]:
    """Rename written shards (temporary file name, tensor names) to `model.safetensors` or
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`; the final file names."""
    folder = Path(folder)
    n = len(shards)
    if n == 1:
        (folder / shards[0][0]).rename(folder / "model.safetensors")
        return ["model.safetensors"]
    weight_map, names = {}, []
    for i, (fname, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (folder / fname).rename(folder / final)
        names.append(final)
        weight_map.update({k: final for k in keys})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names
