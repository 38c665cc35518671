"""Memory-bandwidth bound of decoding and consumer-GPU projections.

Decoding one token per sequence reads every weight once plus the KV cache of the context, so
    tokens/s <= batch * bandwidth / bytes read per decode step.
`copy_bandwidth` measures bandwidth as a device copy of a large buffer (bytes read + bytes written per second,
STREAM "copy" convention). Projections for other GPUs apply the same bound to their published bandwidth: they are
projections, not measurements.
"""

from __future__ import annotations

import time

import torch

PROJECTION_LABEL = "projection, not measured"
# Reserve kept free for the CUDA context, allocator slack and activations when projecting the max context.
PROJECTION_RESERVE_BYTES = 1 << 30


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
                 efficiency: float | None, serving_scheme: str | None,
                 reserve_bytes: int = PROJECTION_RESERVE_BYTES) -> list[dict]:
    """Batch-1 decode tokens/s bound and max context on each projected GPU (`qwenquant.targets.PROJECTED`), from
    this run's measured bytes, and whether that GPU runs the checkpoint's `serving_scheme` (None: bf16, every GPU).

    `efficiency` (measured tokens/s / measured bound on a GPU) scales the bound into an expected figure; it is
    None when this run did not measure on a GPU (CPU efficiency says nothing about GPUs).
    """
    from qwenquant.bench.memory import max_context
    from qwenquant.targets import GPU_BY_KEY, PROJECTED, target_runs

    rows = []
    step = bytes_per_decode_step(weight_read_bytes, kv_per_token, 1, context)
    for gpu in (GPU_BY_KEY[key] for key in PROJECTED):
        memory = int(gpu.memory_gib * 2**30)
        bound = bound_tokens_per_s(step, gpu.bandwidth_gb_s * 1e9, 1)
        fits = weight_bytes + reserve_bytes + kv_per_token * context <= memory
        cannot = target_runs(gpu.key, serving_scheme) if serving_scheme else None
        rows.append({
            "key": gpu.key, "name": gpu.name, "bandwidth_gb_s": gpu.bandwidth_gb_s, "memory_gib": gpu.memory_gib,
            "compute_capability": gpu.compute_capability, "serving_scheme": serving_scheme or "bf16",
            "runs_scheme": cannot is None, "runs_note": cannot or "",
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
