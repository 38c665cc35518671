"""Output shards laid out before any tensor is computed, then filled in place by whichever worker finishes first.

`ShardWriter` (qwenquant/export/writer.py) keeps a shard's tensors until the shard is full, then hands them to
safetensors, which sorts them (its dtype order, then name) behind a JSON header. A shard of a big model is
gigabytes, so the streaming path cannot hold one. Instead `ShardLayout` takes every output tensor's name, dtype and
shape in write order (qwenquant/stream/plan.py knows them up front), cuts shards exactly where `ShardWriter` would,
and builds each shard's header as safetensors builds it; `create` writes the headers and sizes the files, and
`write` puts a tensor's bytes (or a piece of them) at their final offset with `os.pwrite`, which releases the GIL,
so worker threads write in parallel and every byte is written once. The files, their names and the index equal
`ShardWriter`'s for the same tensors in the same order (tests/stream/test_shards.py compares whole files).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from qwenquant.export.writer import _umask, final_shard_names
from qwenquant.stream.source import DTYPE_NAMES


def safetensors_dtype_order() -> list[torch.dtype]:
    """The dtypes in the order safetensors lays them out (its sort key), read from a file it writes."""
    probe = {f"t{i:02d}": torch.zeros(1, dtype=d) for i, d in enumerate(DTYPE_NAMES)}
    data = save(probe)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return [probe[k].dtype for k in header if k != "__metadata__"]


def nbytes_of(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True)
class Slot:
    """Where one tensor goes: shard index and absolute byte offset in the shard file."""

    shard: int
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class ShardLayout:
    """Shards, headers and every tensor's slot (see the module doc)."""

    def __init__(self, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int):
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = []
        pending = 0
        for name, dtype, shape in tensors:  # ShardWriter.add's rule
            size = nbytes_of(dtype, shape)
            if not shards or (shards[-1] and pending + size > max_bytes):
                shards.append([])
                pending = 0
            shards[-1].append((name, dtype, tuple(shape)))
            pending += size
        rank = {d: i for i, d in enumerate(safetensors_dtype_order())}
        self.slots: dict[str, Slot] = {}
        self.headers: list[bytes] = []
        self.sizes: list[int] = []
        self.keys: list[list[str]] = [[n for n, _, _ in shard] for shard in shards]
        for i, shard in enumerate(shards):
            order = sorted(shard, key=lambda t: (rank[t[1]], t[0]))
            header: dict = {"__metadata__": {"format": "pt"}}
            placed, at = [], 0
            for name, dtype, shape in order:
                n = nbytes_of(dtype, shape)
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
                placed.append((name, at, n, dtype, shape))
                at += n
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            start = 8 + len(text)
            for name, begin, n, dtype, shape in placed:
                self.slots[name] = Slot(i, start + begin, n, dtype, shape)
            self.headers.append(struct.pack("<Q", len(text)) + text)
            self.sizes.append(start + at)
        self.total_bytes = sum(s.nbytes for s in self.slots.values())
        self._fds: list[int] = []
        self.folder: Path | None = None

    def create(self, folder: Path) -> None:
        """Write each shard's header and give the file its final size (the data is filled in by `write`)."""
        self.folder = Path(folder)
        for i, (header, size) in enumerate(zip(self.headers, self.sizes)):
            path = self.folder / f"shard-{i:05d}.safetensors"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666 & ~_umask())
            self._fds.append(fd)
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, size)

    def write(self, name: str, tensor: torch.Tensor, at: int = 0) -> None:
        """Put `tensor`'s bytes in `name`'s slot, starting `at` bytes into it (a piece of a larger tensor)."""
        slot = self.slots[name]
        t = tensor.detach().to("cpu").contiguous()
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        whole = at == 0 and len(data) == slot.nbytes
        if t.dtype != slot.dtype or whole and tuple(t.shape) != slot.shape:
            raise RuntimeError(f"{name}: planned {slot.dtype} {list(slot.shape)}, got {t.dtype} {list(t.shape)}")
        if at + len(data) > slot.nbytes:
            raise RuntimeError(f"{name}: {at + len(data)} bytes do not fit its {slot.nbytes}-byte slot")
        done = 0
        while done < len(data):
            done += os.pwrite(self._fds[slot.shard], data[done:], slot.offset + at + done)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def finish(self) -> list[str]:
        """Close the files and give them their final names (and the index when there are several)."""
        self.close()
        return final_shard_names(self.folder, [(f"shard-{i:05d}.safetensors", keys) for i, keys in enumerate(self.keys)],
                                 self.total_bytes)
