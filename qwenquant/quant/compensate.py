"""Error-compensation fine-tuning of a quantized layer's continuous parameters, as pure tensor functions.

After a decoder layer is quantized, its weight scales, its per-weight rounding (INT) and its norm weights are tuned
so that the quantized layer's output matches the unquantized layer's output on calibration inputs, in the spirit
of SignRound (Cheng et al., 2023, arXiv:2309.05516). Only scales, codes and norm weights change, so the result
exports to exactly the formats the quantizer's result does.

Per quantized Linear with float weight W [N, K] and the quantizer's record (codes q0, scale s0, zero z):
    s     = round_dtype(s0 * (1 + a))                       a in [-A, A] per scale entry   (A = MAX_RELATIVE_CHANGE)
    INT:  w_hat = (clamp(round(u / s + v) + z, 0, 2**b - 1) - z) * s                  v in [-0.5, 0.5] per weight
    FP8:  w_hat = fp8(clamp(u / s, -448, 448)) * s
where u is the continuous weight. When q0 is the nearest rounding of W / s0 (RTN, FP8) u = W (for INT kept inside
its cell: clamp(W / s0, c - 1/2 + e, c + 1/2 - e) s0 with c = q0 - z, which only moves saturated weights), and
tuning a and v may re-round it. When the quantizer chose other codes on purpose (GPTQ's error feedback; AWQ, whose
folded scales put W in another basis) u = c s0 (FP8: q0 s0) and v is not used: its codes stay unless a scale moves
far enough to re-round them. With a = 0 and v = 0 the codes and scales are exactly the quantizer's.
Norm weights: g = g0 * (1 + d), d in [-A, A]. round(.), fp8(.) and round_dtype(.) are straight-through
(identity gradient, STE). Loss: mean squared error between the quantized and the unquantized layer outputs.
Update (signed gradient descent, SignRound): p <- clamp(p - lr_t * sign(dL/dp), lo, hi), lr_t = lr * (1 - t / T)
for v (in grid steps), lr_t * RELATIVE_LR_RATIO for a and d (relative changes: one bf16 step of a scale is 2^-8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qwenquant.quant.fp8 import FP8_DTYPE, FP8_MAX
from qwenquant.quant.records import QuantizedWeight, expand_scale

MAX_ROUNDING_OFFSET = 0.5
MAX_RELATIVE_CHANGE = 0.5  # bound on a (scales) and d (norm weights): a scale may shrink or grow by at most half
RELATIVE_LR_RATIO = 0.1  # scales and norm weights move by lr * this per step (relative), offsets by lr (grid steps)
CELL_MARGIN = 1e-3  # keeps the projected INT weight strictly inside its cell, so round() reproduces q0 exactly


# -- straight-through rounding ------------------------------------------------------------------------------------


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def fp8_round_ste(x: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 value (x must already lie in [-448, 448]) forward, identity backward."""
    return x + (x.detach().to(FP8_DTYPE).float() - x).detach()


def dtype_round_ste(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to `dtype` (held in float32) forward, identity backward."""
    return x + (x.detach().to(dtype).float() - x).detach()


# -- one Linear ---------------------------------------------------------------------------------------------------


@dataclass
class LinearCompensation:
    """Trainable state of one quantized Linear. `scale_change` (a) and `offsets` (v) are the leaves to tune;
    `scale_change` may be one tensor shared by several Linears (FP8 per-tensor scales of a fused group)."""

    record: QuantizedWeight  # the quantizer's result (codes q0, scale s0), on the compute device
    base: torch.Tensor  # u [N, K] float32, the continuous weight
    scale_change: torch.Tensor  # a, shaped like record.scale, float32
    offsets: torch.Tensor | None  # v [N, K] float32 (INT only)
    follows_weight: bool = True  # base is the float weight (codes were its nearest rounding), else the codes

    def parameters(self) -> list[torch.Tensor]:
        return [self.scale_change] + ([self.offsets] if self.offsets is not None else [])


def _expand_int(t: torch.Tensor, record: QuantizedWeight) -> torch.Tensor:
    """Per-group tensor [N, n_groups] -> [N, K] through the record's column -> group map."""
    return t[:, record.group_index().to(t.device)]


def init_compensation(w: torch.Tensor, record: QuantizedWeight, scale_change: torch.Tensor | None = None,
                      rounding: bool = True) -> LinearCompensation:
    """Start state reproducing `record` exactly: a = 0 (or the shared `scale_change`), v = 0.

    w [N, K] is the float weight the quantizer saw. When the record's codes are the nearest-rounding of w (RTN,
    FP8), the continuous weight is w itself (kept inside its cell), so tuning can re-round it (SignRound). Otherwise
    (GPTQ's error feedback, AWQ's folded scales) the codes are the quantizer's decisions: the continuous weight sits
    on them (u = (q0 - z) s0, or q0 s0 for FP8) and no rounding offsets are tuned. `rounding=False` never tunes them.
    """
    if tuple(w.shape) != tuple(record.q.shape):
        raise ValueError(f"weight shape {tuple(w.shape)} does not match the record's {tuple(record.q.shape)}")
    w = w.detach().float()
    a = scale_change if scale_change is not None else torch.zeros_like(record.scale, dtype=torch.float32)
    if record.kind == "fp8":
        s0 = expand_scale(record.scale, tuple(w.shape), record.granularity, record.block_size)
        nearest = torch.equal((w / s0).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float(), record.q.float())
        return LinearCompensation(record, w if nearest else record.q.float() * s0, a, None, nearest)
    s0 = _expand_int(record.scale.float(), record)  # [N, K]
    z = _int_zero(record)
    cell = record.q.float() - z  # c = q0 - z [N, K]
    nearest = torch.equal((torch.round(w / s0) + z).clamp(0, 2**record.bits - 1), record.q.float())
    if not nearest:
        return LinearCompensation(record, cell * s0, a, None, False)
    u = s0 * (w / s0).clamp(cell - 0.5 + CELL_MARGIN, cell + 0.5 - CELL_MARGIN)  # saturated weights: cell edge
    return LinearCompensation(record, u, a, torch.zeros_like(u) if rounding else None, True)


def _int_zero(record: QuantizedWeight) -> torch.Tensor | float:
    if record.zero_point is None:
        return float(2 ** (record.bits - 1))
    return _expand_int(record.zero_point.float(), record)


def compensated_scale(p: LinearCompensation) -> torch.Tensor:
    """s = round_dtype(s0 * (1 + a)) with the record's scale shape, float32, straight-through."""
    return dtype_round_ste(p.record.scale.float() * (1.0 + p.scale_change), p.record.scale.dtype)


def fake_quantized_weight(p: LinearCompensation) -> torch.Tensor:
    """w_hat [N, K] float32 (differentiable in a and v through the straight-through rounding)."""
    r = p.record
    s = compensated_scale(p)
    if r.kind == "fp8":
        full = expand_scale(s, tuple(r.q.shape), r.granularity, r.block_size)
        return fp8_round_ste((p.base / full).clamp(-FP8_MAX, FP8_MAX)) * full
    full = _expand_int(s, r)
    z = _int_zero(r)
    x = p.base / full + (p.offsets if p.offsets is not None else 0.0)
    q = (round_ste(x) + z).clamp(0, 2**r.bits - 1)
    return (q - z) * full


@torch.no_grad()
def export_record(p: LinearCompensation) -> QuantizedWeight:
    """The record of the current state: new codes and scale (in the record's dtype), everything else as before.

    `record.dequantize()` of the result equals `fake_quantized_weight(p)` exactly.
    """
    r = p.record
    s = compensated_scale(p)
    scale = s.to(r.scale.dtype)
    if r.kind == "fp8":
        full = expand_scale(scale, tuple(r.q.shape), r.granularity, r.block_size)
        q = (p.base / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    else:
        full = _expand_int(scale.float(), r)
        x = p.base / full + (p.offsets if p.offsets is not None else 0.0)
        q = (torch.round(x) + _int_zero(r)).clamp(0, 2**r.bits - 1).to(torch.int32)
    return QuantizedWeight(kind=r.kind, q=q, scale=scale, granularity=r.granularity, bits=r.bits,
                           symmetric=r.symmetric, zero_point=r.zero_point, group_size=r.group_size, g_idx=r.g_idx,
                           actorder=r.actorder, block_size=r.block_size)


# -- loss and update ----------------------------------------------------------------------------------------------


def output_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements, in float32."""
    return (out.float() - target.float()).pow(2).mean()


def branch_error(out: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> tuple[float, float]:
    """(sum ||out - target||^2, sum ||target - inputs||^2): the squared error of a decoder layer's output and the
    squared norm of its residual branches (the residual stream passes through unchanged, so it is left out of
    the reference); their ratio is the relative output error reported per layer."""
    err = float((out.float() - target.float()).pow(2).sum())
    ref = float((target.float() - inputs.float()).pow(2).sum())
    return err, ref


def learning_rate(lr: float, step: int, steps: int) -> float:
    """Linear decay from lr (step 0) towards 0 (SignRound's schedule)."""
    return lr * (1.0 - step / steps)


@torch.no_grad()
def signed_step(param: torch.Tensor, lr: float, bound: float) -> None:
    """p <- clamp(p - lr * sign(grad), -bound, bound) in place, then clear the gradient."""
    if param.grad is None:
        return
    param.sub_(lr * torch.sign(param.grad)).clamp_(-bound, bound)
    param.grad = None


def is_finite(loss: torch.Tensor) -> bool:
    return math.isfinite(float(loss.detach()))
