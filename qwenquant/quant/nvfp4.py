"""NVFP4: FP4 E2M1 values in groups of 16 with FP8 E4M3 group scales and one FP32 global scale per tensor, as pure
tensor functions (the NVIDIA recipe, in the convention compressed-tensors / vLLM store it).

E2M1 holds +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}; a code is 4 bits: bit 3 the sign, bits 0-2 the index of the magnitude
in that list. Rounding is to the nearest value, ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
2.5 -> 2, 3.5 -> 4, 5 -> 4); magnitudes beyond 6 saturate.

For a tensor W [N, K] (weights; activations [..., K] the same way along their last dim), with G = 16:
    g   = 448 * 6 / max|W|                        the global scale (float32 [1]; 1.0 when max|W| is 0), stored as is
    s_j = e4m3(min(g * max|W_j| / 6, 448))        one E4M3 scale per group j of 16 consecutive inputs [N, K/16]
                                                   (a scale that rounds to 0 becomes 0.125, as compressed-tensors)
    e_j = s_j / g                                  the effective scale (float32)
    q   = e2m1(W / e_j),   W_hat = q * e_j         (float32 arithmetic, in this order)
So g maps the largest group maximum onto E4M3's top (448) and each group's maximum onto E2M1's top (6).
`weight_global_scale` / `input_global_scale` in a checkpoint are g itself (the dequantization *divides* by it).
Fused groups (q/k/v, gate/up) share one g (computed from their joint max), as vLLM uses one per fused Linear.

Activations (the W4A4 form): g_x is static, 448 * 6 / max|x| over the calibration tokens; the group scales are
computed per token and group of 16 at run time from the same equations (compressed-tensors' `dynamic: local`).
"""

from __future__ import annotations

import math

import torch

from qwenquant.quant.errors import NonFiniteError
from qwenquant.quant.gptq import ColumnGrid
from qwenquant.quant.records import E2M1_VALUES, QuantizedWeight, e2m1_values  # noqa: F401 (re-exported)

GROUP_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0
ZERO_SCALE = 0.125  # what a group scale rounding to 0 becomes (compressed-tensors: the smallest E4M3 "eps")
# magnitude thresholds between consecutive E2M1 values, and whether a value equal to one goes up (ties to the even
# code); as `bucketize` boundaries (it counts the boundaries strictly below a value) a tie going up sits one float32
# step below its threshold
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def _boundaries(device) -> torch.Tensor:
    t = torch.tensor([t for t, _ in _THRESHOLDS], dtype=torch.float32, device=device)
    up = torch.tensor([u for _, u in _THRESHOLDS], device=device)
    return torch.where(up, torch.nextafter(t, torch.zeros_like(t)), t)


def _magnitude_index(x: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest E2M1 magnitude to |x| (float32), ties to the even index, |x| > 6 -> 7."""
    return torch.bucketize(x.float().abs(), _boundaries(x.device))


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8, same shape) of x, rounded to the nearest E2M1 value (ties to even, |x| > 6
    saturates): bit 3 = sign of x (signbit, so -0.0 and negatives that round to 0 keep it), bits 0-2 = magnitude
    index."""
    return _magnitude_index(x).to(torch.uint8) | (torch.signbit(x.float()).to(torch.uint8) << 3)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to E2M1 values (float32): e2m1_values(e2m1_codes(x)) in fewer passes."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)
    return torch.copysign(table[_magnitude_index(x)], x.float())


def global_scale(absmax: float | torch.Tensor) -> torch.Tensor:
    """g = 448 * 6 / absmax as float32 [1]; 1.0 when absmax is 0 (or g overflows), as compressed-tensors."""
    amax = torch.as_tensor(absmax, dtype=torch.float32).reshape(1)
    if not bool(torch.isfinite(amax).all()):
        raise NonFiniteError("NVFP4: the tensor's max |value| is not finite")
    g = torch.tensor([E4M3_MAX * E2M1_MAX], dtype=torch.float32, device=amax.device) / amax
    return torch.where(torch.isfinite(g) & (amax > 0), g, torch.ones_like(g))


def _groups(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> float32 [..., K/16, 16] (ValueError when K is not a multiple of 16)."""
    k = x.shape[-1]
    if k % GROUP_SIZE:
        raise ValueError(f"NVFP4 needs a multiple of {GROUP_SIZE} input features, got {k}")
    return x.float().unflatten(-1, (k // GROUP_SIZE, GROUP_SIZE))


def group_scales(groups: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """E4M3 scales [...] of groups [..., 16] under global scale g: e4m3(min(g * max|group| / 6, 448)), 0 -> 0.125."""
    local = groups.abs().amax(dim=-1) / E2M1_MAX
    scale = (g.to(groups.device) * local).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    return torch.where(scale.float() == 0, torch.full_like(scale, ZERO_SCALE), scale)


def effective_scale(scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """e = s / g in float32 (the division every reader does, in this order)."""
    return scale.float() / g.float().to(scale.device)


@torch.no_grad()
def quantize_nvfp4(w: torch.Tensor, g: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest NVFP4 of w [N, K] (K a multiple of 16). `g`: a global scale shared with other Linears (a
    fused group's, `global_scale` of their joint max |w|), else this tensor's own. Returns the `nvfp4` record:
    codes uint8 [N, K] (unpacked), E4M3 scales [N, K/16], global scale float32 [1]."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError("NVFP4: the weight contains NaN or Inf values")
    groups = _groups(w)  # [N, K/16, 16]
    g = global_scale(groups.abs().amax()) if g is None else g.float().reshape(1)
    scale = group_scales(groups, g)  # [N, K/16]
    codes = e2m1_codes(groups / effective_scale(scale, g).unsqueeze(-1)).flatten(-2)
    return make_nvfp4_record(codes, scale, g)


def make_nvfp4_record(codes: torch.Tensor, scale: torch.Tensor, g: torch.Tensor) -> QuantizedWeight:
    """The record of E2M1 codes [N, K], E4M3 scales [N, K/16] and global scale [1]."""
    return QuantizedWeight(kind="nvfp4", q=codes.to(torch.uint8), scale=scale.to(torch.float8_e4m3fn),
                           granularity="group", bits=4, group_size=GROUP_SIZE,
                           global_scale=g.float().reshape(1).cpu())


def dequantize_nvfp4(codes: torch.Tensor, scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """W_hat = e2m1(q) * (s / g) in float32: codes [N, K], scale [N, K/16], g [1] -> [N, K]."""
    e = effective_scale(scale, g).repeat_interleave(GROUP_SIZE, dim=-1)
    return e2m1_values(codes) * e


def fake_quantize(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize x [..., K] along its last dim in groups of 16 with global scale g, group scales from
    x itself (what the engine does to a Linear's input with `dynamic: local`); float32."""
    groups = _groups(x)
    g = g.float().reshape(1).to(x.device)
    e = effective_scale(group_scales(groups, g), g).unsqueeze(-1)
    return (e2m1_round(groups / e) * e).flatten(-2)


def fake_quantize_activation(x: torch.Tensor, input_global_scale: torch.Tensor) -> torch.Tensor:
    """A Linear's input as the W4A4 engine quantizes it (see the module docstring), in x's dtype."""
    return fake_quantize(x, input_global_scale).to(x.dtype)


def gptq_grid(g: torch.Tensor) -> ColumnGrid:
    """The NVFP4 grid under global scale g for GPTQ's column loop (quant/gptq.py): a group's parameters are its E4M3
    scale s (float32 holding the E4M3 value) [..., 1] from the group as the loop sees it at its first column (a zero
    point of 0, unused); a column rounds to e2m1(w / e) * e with e = s / g; the record is re-derived from the
    pre-rounding weights and those scales (the same division and rounding, so the codes are the loop's)."""
    g = g.float().reshape(1)

    def qparams(cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = group_scales(cur.float(), g.to(cur.device)).float().unsqueeze(-1)
        return s, torch.zeros_like(s)

    def fake(w: torch.Tensor, s: torch.Tensor, _z: torch.Tensor) -> torch.Tensor:
        e = effective_scale(s, g)
        return e2m1_round(w / e) * e

    def record(pre: torch.Tensor, scale: torch.Tensor, _zero: torch.Tensor) -> QuantizedWeight:
        e = effective_scale(scale, g).repeat_interleave(GROUP_SIZE, dim=1)  # [N, K]
        return make_nvfp4_record(e2m1_codes(pre / e), scale.to(torch.float8_e4m3fn), g)

    return ColumnGrid(GROUP_SIZE, qparams, fake, record, lambda w: quantize_nvfp4(w, g))


def weight_error(w: torch.Tensor, qw: QuantizedWeight) -> float:
    """Relative Frobenius error ||w - w_hat|| / ||w||."""
    w = w.float()
    return float((w - qw.dequantize()).norm() / w.norm().clamp(min=1e-12))


def tensor_bytes(n: int, k: int) -> int:
    """Bytes of one Linear's NVFP4 tensors: packed codes (K/2 per row), E4M3 scales (K/16 per row), one float32."""
    return n * math.ceil(k / 2) + n * (k // GROUP_SIZE) + 4
