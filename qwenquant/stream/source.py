"""The source checkpoint as raw safetensors files: headers checked against the files, tensors read by offset.

A safetensors file is `u64 header length N | N bytes of JSON | data`; each tensor's JSON entry gives its dtype,
shape and `data_offsets [begin, end)` relative to the data start. `read_headers` checks every entry before anything
is read (known dtype, begin <= end, end - begin == numel * itemsize, end inside the file), so a truncated download or
a header that lies about its sizes is a one-line error before any output exists. `SourceFiles.read` then fills a
tensor (or some of its rows) with `os.preadv`: no memory map, no GIL held while the disk works.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenquant.errors import BadInputError

DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes are: `file`, absolute byte `offset`, `nbytes`; and what they hold."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _fail(path: Path, what: str) -> BadInputError:
    return BadInputError(f"{path}: {what}; the file is truncated or corrupt, re-download it")


def read_header(path: Path) -> dict[str, Entry]:
    """Every tensor entry of one safetensors file, checked against the file's size (see the module doc)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"{size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise _fail(path, f"header length {n} does not fit the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _fail(path, f"unreadable header ({err})") from err
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = DTYPES.get(info["dtype"]), tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise _fail(path, f"malformed header entry for {name}") from err
        if dtype is None:
            raise BadInputError(f"{path}: tensor {name} has dtype {info['dtype']}, which qwenquant does not read; "
                                "convert the checkpoint to bf16/fp16/fp32")
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if not 0 <= begin <= end or end - begin != nbytes:
            raise _fail(path, f"header gives {name} {end - begin} bytes at [{begin}, {end}) but its shape "
                              f"{list(shape)} x {info['dtype']} needs {nbytes}")
        if 8 + n + end > size:
            raise _fail(path, f"header places {name} up to byte {8 + n + end} but the file has {size} bytes")
        entries[name] = Entry(path, 8 + n + begin, nbytes, dtype, shape)
    return entries


class SourceFiles:
    """The tensors of a set of safetensors files by name; open file descriptors until `close`."""

    def __init__(self, files: list[Path]):
        self.entries: dict[str, Entry] = {}
        for f in files:
            self.entries.update(read_header(Path(f)))
        self._fds = {Path(f): os.open(f, os.O_RDONLY) for f in files}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """A fresh tensor with `name`'s bytes (dtype and shape from the header), or with rows [start, stop) of its
        first dimension."""
        e = self.entries[name]
        rows = e.shape[0] if e.shape else 1
        stop = rows if stop is None else stop
        row_bytes = e.nbytes // rows if rows else 0
        nbytes, offset = (stop - start) * row_bytes, e.offset + start * row_bytes
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < nbytes:
            got = os.preadv(self._fds[e.file], [view[done:]], offset + done)
            if got == 0:
                raise _fail(e.file, f"ended while reading {name}")
            done += got
        shape = e.shape if not e.shape else (stop - start, *e.shape[1:])
        return buf.view(e.dtype).reshape(shape)
