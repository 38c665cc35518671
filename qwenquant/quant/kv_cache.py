"""FP8 (E4M3) KV-cache scales, as pure tensor functions.

An engine with an FP8 KV cache stores each new key/value row as k8 = e4m3(clamp(k / s_k, -448, 448)) and reads it
back as k8 * s_k (the same for v with s_v). K is stored as the attention computes with it: after k_norm and RoPE.
With K, V of shape [B, H, T, D] (batch, KV heads, positions, head dim) the static scales are

    per tensor:  s = max(|x|) / 448                      stored shape [1]        (compressed-tensors `tensor`)
    per head:    s_h = max_{b,t,d} |x[b, h, t, d]| / 448   stored shape [H, 1, 1]  (compressed-tensors `attn_head`)

with the maxima taken over every calibration token. Both stored shapes broadcast against [B, H, T, D]. A head whose
values are small keeps its own fine grid under per-head scales; under one per-tensor scale, one head with outliers
coarsens every head's grid (tests/quant/test_kv_cache.py measures it). Scales are rounded to the model dtype they
are stored in, and every simulation uses that rounded value, so what is measured is what an engine loads.
"""

from __future__ import annotations

import torch

from qwenquant.quant.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE

KV_STRATEGIES = ("tensor", "head")


def kv_absmax(x: torch.Tensor, strategy: str) -> torch.Tensor:
    """max |x| of K or V [B, H, T, D]: over everything ([1], strategy `tensor`) or per KV head ([H, 1, 1], `head`)."""
    if x.dim() != 4:
        raise ValueError(f"K/V must be [batch, kv_heads, positions, head_dim], got shape {tuple(x.shape)}")
    a = x.detach().float().abs()
    if strategy == "tensor":
        return a.amax().reshape(1)
    if strategy == "head":
        return a.amax(dim=(0, 2, 3)).reshape(-1, 1, 1)
    raise ValueError(f"KV-cache strategy {strategy!r}; use one of {KV_STRATEGIES}")


def kv_scale(absmax: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """s = max(absmax / 448, 1e-12), in `dtype` (what the checkpoint stores and the engine reads), same shape."""
    return (absmax.float() / FP8_MAX).clamp(min=MIN_SCALE).to(dtype)


def fake_quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x as an FP8 cache returns it: e4m3(clamp(x / s, -448, 448)) * s, computed in float32, in x's dtype.
    x [B, H, T, D]; s [1] or [H, 1, 1]."""
    s = scale.to(device=x.device, dtype=torch.float32)
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (q.float() * s).to(x.dtype)


def kv_relative_error(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """||fake_quantize_kv(x, s) - x||^2 / ||x||^2 per KV head, [H] (float32): the error one scale choice leaves."""
    xf = x.detach().float()
    err = (fake_quantize_kv(xf, scale) - xf).pow(2).sum(dim=(0, 2, 3))
    return err / xf.pow(2).sum(dim=(0, 2, 3)).clamp(min=1e-30)
