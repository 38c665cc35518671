"""What every qwenquant report file shares: the header fields its JSON starts with, the versions of the libraries it
was made with, and the atomic write (a temporary file in the same folder, fsynced, then renamed onto the target),
so that a reader finds the previous file or the complete new one, never part of one.

Header fields, in this order: schema_version, kind (only in reports that name their kind), qwenquant_version,
created (UTC, when the work started, `YYYY-MM-DDTHH:MM:SSZ`), command (the command line as typed).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from qwenquant import __version__
from qwenquant.errors import BadInputError


def command_line(argv: list[str]) -> str:
    """The `command` header field: `qwenquant` and the arguments, quoted as a shell would need them."""
    return "qwenquant " + " ".join(shlex.quote(str(a)) for a in argv)


def utc_timestamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def report_header(schema_version: int, *, command: str, started: float, kind: str | None = None,
                  version: str = __version__) -> dict:
    """The fields every JSON report starts with (see the module docstring)."""
    header: dict = {"schema_version": schema_version}
    if kind is not None:
        header["kind"] = kind
    return header | {"qwenquant_version": version, "created": utc_timestamp(started), "command": command}


def environment_versions() -> dict:
    """The `environment` section: torch, transformers, compressed_tensors (None when absent), python, platform."""
    import transformers  # heavy: only when a report is built

    try:
        import compressed_tensors

        ct = compressed_tensors.__version__
    except ImportError:  # optional at report time
        ct = None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed_tensors": ct,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged_files(*paths: Path) -> Iterator[list[Path]]:
    """Temporary paths (`.partial-<pid>-<name>`, beside each target) to write into; when the block ends without an
    error each is fsynced and then renamed onto its target. On an error no target changes and the temporaries are
    removed."""
    targets = [Path(p) for p in paths]
    staged = [p.with_name(f".partial-{os.getpid()}-{p.name}") for p in targets]
    try:
        yield staged
        for tmp in staged:
            _fsync(tmp)
        for tmp, target in zip(staged, targets):
            os.replace(tmp, target)
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file in the same folder."""
    with staged_files(path) as (tmp,):
        tmp.write_text(text, encoding="utf-8")


def json_text(data: dict, **options) -> str:
    """A report's JSON file content: indented by 2, one trailing newline; `options` go to `json.dumps`."""
    return json.dumps(data, indent=2, **options) + "\n"


def write_json(path: Path, data: dict, **options) -> None:
    write_atomic(path, json_text(data, **options))


def read_json(path: Path) -> dict:
    """A report file written by `write_json`; one-line BadInputError when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BadInputError(f"{path}: not valid JSON ({err.msg}); run the command that wrote it again") from err
