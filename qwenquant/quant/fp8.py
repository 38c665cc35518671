"""FP8 E4M3 quantization of weights and activations, as pure tensor functions.

Math (compressed-tensors / vLLM convention): scale = absmax / 448 over the granule, q = fp8(clamp(w / scale)),
w_hat = q * scale. The scale is rounded to the model dtype *before* computing q, so that w_hat computed here is
bit-for-bit what an engine computes from the saved (q, scale).
"""

from __future__ import annotations

import math

import torch

from qwenquant.quant.records import QuantizedWeight, expand_scale

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
WEIGHT_GRANULARITIES = ("tensor", "channel", "block")
MIN_SCALE = 1e-12


def _block_absmax(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """Max |w| of each BxB block (the last blocks may be partial): [ceil(N/B), ceil(K/B)]."""
    n, k = w.shape
    nb, kb = math.ceil(n / block_size), math.ceil(k / block_size)
    if n % block_size == 0 and k % block_size == 0:  # whole blocks: no padded copy
        return w.abs().view(nb, block_size, kb, block_size).amax(dim=(1, 3))
    padded = torch.zeros(nb * block_size, kb * block_size, dtype=w.dtype, device=w.device)
    padded[:n, :k] = w.abs()
    # padded [nb*B, kb*B] -> [nb, B, kb, B]
    return padded.view(nb, block_size, kb, block_size).amax(dim=(1, 3))


def compute_weight_scale(
    w: torch.Tensor,
    granularity: str = "channel",
    block_size: int = 128,
    clip_ratio: float | torch.Tensor = 1.0,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Scale per granule: tensor [1], channel [N, 1], block [ceil(N/B), ceil(K/B)]; rounded to `scale_dtype`.

    `clip_ratio` < 1 shrinks the range (values beyond it saturate), used by scale search.
    """
    if granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(f"unknown FP8 weight granularity {granularity!r}; use one of {WEIGHT_GRANULARITIES}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.float()
    if granularity == "tensor":
        absmax = w.abs().amax().reshape(1)
    elif granularity == "channel":
        absmax = w.abs().amax(dim=1, keepdim=True)
    else:
        absmax = _block_absmax(w, block_size)
    scale = (absmax * clip_ratio / FP8_MAX).clamp(min=MIN_SCALE)
    return scale.to(scale_dtype)


def shared_tensor_scale(absmax: float, clip_ratio: float = 1.0, scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """One per-tensor scale [1] = absmax * clip / 448 for the Linears of a fused group (engines fuse q/k/v and
    gate/up and would requantize the shards to their largest scale): `absmax` is the group's max |w|."""
    return torch.tensor([absmax * clip_ratio / FP8_MAX], dtype=scale_dtype).clamp(min=MIN_SCALE)


def quantize_fp8(
    w: torch.Tensor,
    granularity: str = "channel",
    block_size: int = 128,
    clip_ratio: float | torch.Tensor = 1.0,
    scale_dtype: torch.dtype = torch.bfloat16,
    scale: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize a weight [N, K] to E4M3 with the given granularity (or a given scale)."""
    wf = w.float()  # one float32 copy for the scale and the codes
    if scale is None:
        scale = compute_weight_scale(wf, granularity, block_size, clip_ratio, scale_dtype)
    n, k = w.shape
    if granularity == "block" and n % block_size == 0 and k % block_size == 0:
        # the same division as by the expanded [N, K] scale, without materializing it: [N/B, B, K/B, B] / [N/B, 1, K/B, 1]
        blocks = wf.view(n // block_size, block_size, k // block_size, block_size)
        q = (blocks / scale.float()[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(n, k)
    else:
        full = expand_scale(scale, tuple(w.shape), granularity, block_size)
        q = (wf / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return QuantizedWeight(
        kind="fp8",
        q=q,
        scale=scale,
        granularity=granularity,
        bits=8,
        block_size=block_size if granularity == "block" else None,
    )


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, granularity: str, block_size: int | None = None) -> torch.Tensor:
    """w_hat = q * scale in float32."""
    return q.float() * expand_scale(scale, tuple(q.shape), granularity, block_size)


def fake_quantize_fp8_weight(w: torch.Tensor, **kwargs) -> torch.Tensor:
    """Quantize then dequantize (float32), for error measurement."""
    return quantize_fp8(w, **kwargs).dequantize()


def fake_quantize_activation(
    x: torch.Tensor, mode: str, input_scale: torch.Tensor | None = None, group_size: int = 128
) -> torch.Tensor:
    """Simulate FP8 activation quantization as the engine does it, returning x's dtype.

    mode "token": dynamic per-token scale absmax/448; "group": dynamic per token and group of `group_size`
    channels (the 128x128 block scheme); "tensor": static per-tensor `input_scale` from calibration.
    """
    xf = x.float()
    if mode == "token":
        scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    elif mode == "group":
        k = xf.shape[-1]
        if k % group_size:
            raise ValueError(f"activation width {k} is not divisible by group size {group_size}")
        g = xf.unflatten(-1, (k // group_size, group_size))
        scale = (g.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
        q = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale
        return q.flatten(-2).to(x.dtype)
    elif mode == "tensor":
        if input_scale is None:
            raise ValueError("static activation quantization needs a calibrated input_scale")
        scale = input_scale.float().to(xf.device)
    else:
        raise ValueError(f"unknown activation mode {mode!r}")
    return ((xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale).to(x.dtype)


def static_input_scale(absmax: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Per-tensor input scale [1] from the calibration absmax of a Linear's input."""
    return (absmax.float().reshape(1) / FP8_MAX).clamp(min=MIN_SCALE).to(scale_dtype)


def weight_error(w: torch.Tensor, qw: QuantizedWeight) -> float:
    """Relative Frobenius error ||w - w_hat|| / ||w||, reported per layer."""
    w = w.float()
    return float((w - qw.dequantize()).norm() / w.norm().clamp(min=1e-12))
