"""Output shards written as tensors arrive, holding none of them in memory: the same files `ShardWriter` writes.

`ShardWriter` (qwenquant/export/writer.py) keeps a shard's tensors until the shard is full, then hands them to
safetensors, which sorts them (dtype, widest first, then name) behind a JSON header. A shard of a big model is
gigabytes, so `SpillingShardWriter` appends each tensor's bytes to a scratch file as it arrives, and when the shard
is full writes the header (built as safetensors builds it) followed by the bytes copied, in safetensors' order, from
the scratch file by the kernel. Shard boundaries, names, header and bytes equal `ShardWriter`'s for the same
tensors in the same order (tests/stream/test_shards.py compares whole files).
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from qwenquant.export.writer import ShardWriter, _umask
from qwenquant.stream.source import DTYPE_NAMES


def safetensors_dtype_order() -> list[torch.dtype]:
    """The dtypes in the order safetensors lays them out (its sort key), read from a file it writes."""
    probe = {f"t{i:02d}": torch.zeros(1, dtype=d) for i, d in enumerate(DTYPE_NAMES)}
    data = save(probe)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return [probe[k].dtype for k in header if k != "__metadata__"]


@dataclass
class Spilled:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # in the scratch file
    nbytes: int


class SpillingShardWriter(ShardWriter):
    """`ShardWriter` whose pending shard lives in a scratch file (see the module doc). `add` takes a tensor,
    `add_chunks` one tensor in pieces."""

    def __init__(self, folder: Path, max_bytes: int):
        super().__init__(folder, max_bytes)
        self.rank = {d: i for i, d in enumerate(safetensors_dtype_order())}
        self.spilled: list[Spilled] = []
        self._scratch: io.BufferedRandom | None = None

    def _room(self, size: int) -> None:
        if self.spilled and self.pending_bytes + size > self.max_bytes:
            self.flush()
        if self._scratch is None:
            self._scratch = open(self.folder / f"shard-{len(self.shards):05d}.scratch", "w+b")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        self._room(size)
        offset = self._scratch.tell()
        if size:
            self._scratch.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._note(Spilled(name, t.dtype, tuple(t.shape), offset, size))

    def add_chunks(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], chunks) -> None:
        """One tensor given as consecutive pieces (`chunks` yields tensors of `dtype` whose bytes, in order, are
        the tensor's), so a large tensor never sits whole in memory."""
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        self._room(nbytes)
        offset = self._scratch.tell()
        for piece in chunks:
            if piece.dtype != dtype:
                raise TypeError(f"{name}: a {piece.dtype} piece for a {dtype} tensor")
            self._scratch.write(memoryview(piece.contiguous().reshape(-1).view(torch.uint8).numpy()))
        if self._scratch.tell() - offset != nbytes:
            raise ValueError(f"{name}: pieces hold {self._scratch.tell() - offset} bytes, the shape needs {nbytes}")
        self._note(Spilled(name, dtype, tuple(shape), offset, nbytes))

    def _note(self, s: Spilled) -> None:
        self.spilled.append(s)
        self.pending_bytes += s.nbytes
        self.total_bytes += s.nbytes

    def _header(self, order: list[Spilled]) -> bytes:
        """The JSON header safetensors writes for these tensors, padded with spaces to a multiple of 8."""
        header: dict = {"__metadata__": {"format": "pt"}}
        at = 0
        for s in order:
            header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [at, at + s.nbytes]}
            at += s.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        return text + b" " * (-len(text) % 8)

    def flush(self) -> None:
        if not self.spilled:
            return
        order = sorted(self.spilled, key=lambda s: (self.rank[s.dtype], s.name))
        fname = f"shard-{len(self.shards):05d}.safetensors"
        header = self._header(order)
        self._scratch.flush()
        with open(self.folder / fname, "wb") as out:
            out.write(struct.pack("<Q", len(header)) + header)
            out.flush()
            src, dst = self._scratch.fileno(), out.fileno()
            for s in order:
                done = 0
                while done < s.nbytes:
                    got = os.copy_file_range(src, dst, s.nbytes - done, s.offset + done)
                    if got == 0:
                        raise OSError(f"scratch file {self._scratch.name} ended early")
                    done += got
        os.chmod(self.folder / fname, 0o666 & ~_umask())
        self._scratch.close()
        os.unlink(self._scratch.name)
        self._scratch = None
        self.shards.append((fname, [s.name for s in self.spilled]))
        self.spilled, self.pending_bytes = [], 0

    def discard(self) -> None:
        """Close and remove the scratch file (a failed run; the folder itself is removed by its owner)."""
        if self._scratch is not None:
            self._scratch.close()
            Path(self._scratch.name).unlink(missing_ok=True)
            self._scratch = None
