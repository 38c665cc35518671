"""Integer grid math shared by RTN, GPTQ and AWQ, as pure tensor functions.

Unsigned codes (see records.py): q = clamp(round(w / s) + z, 0, 2**b - 1), w_hat = (q - z) * s.
- symmetric (compressed-tensors convention): s = absmax / ((qmax - qmin) / 2) with qmin = -2**(b-1),
  qmax = 2**(b-1) - 1 (absmax / 7.5 for 4 bits); z = 2**(b-1).
- asymmetric: s = (max - min) / (2**b - 1) over a range that always contains 0; z = clamp(round(-min / s)).
The scale is rounded to `scale_dtype` before the codes are computed, so w_hat is exactly what an engine
computes from the saved (q, s, z).
"""

from __future__ import annotations

import torch

from qwenquant.quant.records import QuantizedWeight

MIN_BITS, MAX_BITS = 2, 8
MIN_SCALE = 1e-12


def check_bits(bits: int) -> None:
    """Raise ValueError unless 2 <= bits <= 8 (the INT widths our exporters can pack)."""
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"integer quantization supports {MIN_BITS}..{MAX_BITS} bits, got {bits!r}")


def resolve_group_size(k: int, group_size: int) -> int:
    """Columns per group: `group_size`, or K for channel-wise (-1); raises ValueError if K is not divisible."""
    if group_size == -1:
        return k
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1 (per-channel), got {group_size}")
    if k % group_size:
        raise ValueError(f"input width K={k} is not divisible by group_size={group_size}")
    return group_size


def _round_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """float32 holding the `scale_dtype`-rounded value, never 0 (an all-zero group would divide by 0)."""
    rounded = scale.clamp(min=MIN_SCALE).to(scale_dtype).float()
    tiny = torch.finfo(scale_dtype).tiny
    return torch.where(rounded > 0, rounded, torch.full_like(rounded, tiny))


def compute_qparams(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip_ratio: float | torch.Tensor = 1.0,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and unsigned zero point over the last dim of `w` [..., G] -> ([..., 1], [..., 1]) float32.

    `clip_ratio` (float, or a tensor broadcastable to [..., 1]) shrinks the range; values beyond it saturate.
    """
    check_bits(bits)
    w = w.float()
    qmax = 2**bits - 1
    if symmetric:
        absmax = w.abs().amax(dim=-1, keepdim=True) * clip_ratio
        # (qmax_signed - qmin_signed) / 2 = (2**b - 1) / 2
        scale = _round_scale(absmax / (qmax / 2.0), scale_dtype)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
        return scale, zero
    w_min = w.amin(dim=-1, keepdim=True).clamp(max=0.0) * clip_ratio
    w_max = w.amax(dim=-1, keepdim=True).clamp(min=0.0) * clip_ratio
    scale = _round_scale((w_max - w_min) / qmax, scale_dtype)
    zero = torch.round(-w_min / scale).clamp(0, qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(w / s) + z, 0, 2**b - 1) as int32 (s, z broadcast against w)."""
    q = torch.round(w.float() / scale) + zero
    return q.clamp(0, 2**bits - 1).to(torch.int32)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = (q - z) * s in float32."""
    return (q.float() - zero) * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize (float32), for error measurement and GPTQ's column updates."""
    return dequantize_codes(quantize_codes(w, scale, zero, bits), scale, zero)


def _group_clip(clip_ratio: float | torch.Tensor, n: int, n_groups: int) -> float | torch.Tensor:
    """float stays; a tensor [N, n_groups] becomes [N, n_groups, 1] to broadcast over group members."""
    if isinstance(clip_ratio, torch.Tensor):
        if tuple(clip_ratio.shape) != (n, n_groups):
            got = tuple(clip_ratio.shape)
            raise ValueError(f"clip_ratio tensor must be [N, n_groups]=[{n}, {n_groups}], got {got}")
        return clip_ratio.float().unsqueeze(-1)
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    return clip_ratio


def compute_group_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip_ratio: float | torch.Tensor = 1.0,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [N, n_groups] (float32) for natural groups k // G of w [N, K]."""
    n, k = w.shape
    gs = resolve_group_size(k, group_size)
    n_groups = k // gs
    clip = _group_clip(clip_ratio, n, n_groups)
    # w [N, K] -> [N, n_groups, G]
    scale, zero = compute_qparams(w.float().view(n, n_groups, gs), bits, symmetric, clip, scale_dtype)
    return scale.squeeze(-1), zero.squeeze(-1)


@torch.no_grad()
def quantize_rtn(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    clip_ratio: float | torch.Tensor = 1.0,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> QuantizedWeight:
    """Round-to-nearest of w [N, K] per group of `group_size` columns (-1: per output channel).

    `clip_ratio` is a float or a per-group tensor [N, n_groups] (AWQ's clip search).
    """
    check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    gs = resolve_group_size(k, group_size)
    scale, zero = compute_group_qparams(w, bits, gs, symmetric, clip_ratio, scale_dtype)  # [N, n_groups]
    # w [N, K] -> [N, n_groups, G]; params [N, n_groups, 1]
    q = quantize_codes(w.float().view(n, k // gs, gs), scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return make_int_record(q.view(n, k), scale, zero, bits, gs, symmetric, scale_dtype)


def make_int_record(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    g_idx: torch.Tensor | None = None,
    actorder: str | None = None,
) -> QuantizedWeight:
    """Pack codes [N, K] and float32 params [N, n_groups] into the INT record (scale in `scale_dtype`)."""
    k = q.shape[1]
    return QuantizedWeight(
        kind="int",
        q=q.to(torch.int32),
        scale=scale.to(scale_dtype),  # exact: scale already holds a scale_dtype value
        granularity="channel" if group_size == k else "group",
        bits=bits,
        symmetric=symmetric,
        zero_point=zero.to(torch.int32),
        group_size=group_size,
        g_idx=None if g_idx is None else g_idx.to(torch.int32),
        actorder=actorder,
    )
