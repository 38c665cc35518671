"""Memory-bandwidth bound of decoding and consumer-GPU projections.

Decoding one token per sequence reads every weight once plus the KV cache of the context, so
    tokens/s <= batch * bandwidth / bytes read per decode step.
`copy_bandwidth` measures bandwidth as a device copy of a large buffer (bytes read + bytes written per second,
STREAM "copy" convention). Projections for other GPUs apply the same bound to their published bandwidth: they are
projections, not measurements.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

PROJECTION_LABEL = "projection, not measured"
# Reserve kept free for the CUDA context, allocator slack and activations when projecting the max context.
PROJECTION_RESERVE_BYTES = 1 << 30


@dataclass(frozen=True)
class GpuSpec:
    """Published figures of a GPU (vendor spec sheets: memory bandwidth in 1e9 bytes/s, memory in GiB)."""

    name: str
    bandwidth_gb_s: float
    memory_gib: float
    compute_capability: str
    fp8_compute: bool  # SM89+: FP8 tensor cores (W8A8); older GPUs run FP8 checkpoints weight-only


CONSUMER_GPUS = (
    GpuSpec("RTX 4090", 1008.0, 24.0, "8.9", True),   # 384-bit GDDR6X at 21 Gbps
    GpuSpec("RTX 3090", 936.0, 24.0, "8.6", False),   # 384-bit GDDR6X at 19.5 Gbps
    GpuSpec("A10G", 600.0, 24.0, "8.6", False),       # AWS G5 instances
    GpuSpec("RTX 3060 12GB", 360.0, 12.0, "8.6", False),  # 192-bit GDDR6 at 15 Gbps
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> dict:
    """Measured copy bandwidth of `device`: 2 * nbytes * repeats / seconds (read + write)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    seconds = time.perf_counter() - start
    moved = 2 * src.numel() * 4 * repeats
    del src, dst
    return {"bytes_per_s": moved / seconds, "buffer_bytes": nbytes, "repeats": repeats,
            "method": "device copy of one buffer into another; (bytes read + bytes written) / time"}


def bytes_per_decode_step(weight_read_bytes: int, kv_per_token: int, batch: int, context: int) -> int:
    """Ideal bytes one decode step reads: the weights once plus the stored KV of `context` tokens per sequence."""
    return weight_read_bytes + kv_per_token * batch * context


def bound_tokens_per_s(bytes_per_step: int, bandwidth: float, batch: int) -> float:
    return batch * bandwidth / bytes_per_step


def project_gpus(weight_bytes: int, weight_read_bytes: int, kv_per_token: int, context: int, max_positions: int | None,
                 efficiency: float | None, reserve_bytes: int = PROJECTION_RESERVE_BYTES) -> list[dict]:
    """Batch-1 decode tokens/s bound and max context on each consumer GPU, from this run's measured bytes.

    `efficiency` (measured tokens/s / measured bound on a GPU) scales the bound into an expected figure; it is
    None when this run did not measure on a GPU (CPU efficiency says nothing about GPUs).
    """
    from qwenquant.bench.memory import max_context

    rows = []
    step = bytes_per_decode_step(weight_read_bytes, kv_per_token, 1, context)
    for gpu in CONSUMER_GPUS:
        memory = int(gpu.memory_gib * 2**30)
        bound = bound_tokens_per_s(step, gpu.bandwidth_gb_s * 1e9, 1)
        fits = weight_bytes + reserve_bytes + kv_per_token * context <= memory
        rows.append({
            **asdict(gpu),
            "label": PROJECTION_LABEL,
            "context": context,
            "weights_fit": weight_bytes + reserve_bytes <= memory,
            "fits_at_context": fits,
            "decode_bound_tokens_per_s": bound,
            "decode_expected_tokens_per_s": None if efficiency is None else bound * efficiency,
            "max_context_batch1": max_context(memory, weight_bytes, reserve_bytes, kv_per_token, 1, max_positions),
            "reserve_bytes": reserve_bytes,
        })
    return rows
