"""Memory accounting for the bench: exact tensor bytes, allocator (CUDA) or host RSS (CPU) measurements, and the
largest context that fits a memory budget (computed, not measured)."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import psutil
import torch
from torch import nn


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once (tied embeddings count once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.device.type == "meta":
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def decode_read_bytes(model: nn.Module, batch: int) -> int:
    """Weight bytes one decode step reads: every parameter/buffer once, except that an untied embedding table
    only has `batch` rows read (a tied one is read whole by lm_head)."""
    total = tensor_bytes(model)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    if not tied:
        row = emb.shape[1] * emb.element_size()
        total -= emb.numel() * emb.element_size() - batch * row
    return total


@dataclass
class MemoryProbe:
    """Reads memory on the bench device: the CUDA caching allocator, or this process's RSS on CPU."""

    device: torch.device

    @property
    def kind(self) -> str:
        return "cuda-allocator" if self.device.type == "cuda" else "host-rss"

    def settle(self) -> None:
        """Free what the previous point left (CUDA); on CPU RSS is coarse anyway and gc over transformers' heap
        costs ~0.5 s, so nothing is done."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return psutil.Process().memory_info().rss

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        """Peak allocated since reset_peak (CUDA); None on CPU, where no per-interval peak is available."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return None

    def reserved_peak(self) -> int | None:
        return torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else None


def max_context(budget_bytes: int, weight_bytes: int, reserve_bytes: int, kv_per_token: int, batch: int,
                max_positions: int | None) -> int:
    """Largest context (tokens per sequence) whose KV cache for `batch` sequences fits beside the weights and a
    reserve: floor((budget - weights - reserve) / (kv_per_token * batch)), capped at the model's max positions."""
    free = budget_bytes - weight_bytes - reserve_bytes
    if free <= 0:
        return 0
    tokens = free // (kv_per_token * batch)
    return int(min(tokens, max_positions) if max_positions else tokens)
