"""INT8 W8A8 (SmoothQuant-style serving, vLLM's compressed-tensors `int-quantized` path), as pure tensor functions.

Weights: symmetric INT8 per output channel, the INT grid of `intq` with bits = 8 and one group per row:
    s_w [N, 1] = absmax(row) / 127.5 (rounded to the model dtype first), q = clamp(round(w / s_w) + 128, 0, 255),
    w_hat = (q - 128) * s_w.
The record keeps intq's unsigned codes (records.py) under kind "int8"; the checkpoint stores the signed codes
q - 128 in [-128, 127] as int8 (compressed-tensors' own convention: same scale, same rounding, same clamp).

Activations: dynamic, symmetric, per token (row), as vLLM's `dynamic_scaled_int8_quant` computes them in float32:
    a_max = max_k |x[m, k]|,  s_a[m] = a_max / 127,  q_a[m, k] = clamp(round_half_even(x[m, k] * (127 / a_max)),
    -128, 127),  x_hat = q_a * s_a  (a row of zeros gives zero codes).
The matmul then accumulates int32 products of codes and scales the result: y[m, n] = s_a[m] * s_w[n] *
sum_k q_a[m, k] (q_w[n, k] - 128).
"""

from __future__ import annotations

import dataclasses

import torch

from qwenquant.quant import intq
from qwenquant.quant.records import QuantizedWeight

KIND = "int8"
BITS = 8
ZERO = 2 ** (BITS - 1)  # the unsigned record's zero point: signed code = q - 128
INT8_MAX = 127.0


@torch.no_grad()
def quantize_weight(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """Round-to-nearest of w [N, K] to symmetric INT8 per output channel: the W8A8 record (kind "int8")."""
    return as_int8_record(intq.quantize_rtn(w.float(), BITS, -1, True, scale_dtype=scale_dtype))


def as_int8_record(qw: QuantizedWeight) -> QuantizedWeight:
    """An INT record that is 8-bit, symmetric and per output channel (RTN's or GPTQ's) relabelled as a W8A8 record;
    anything else is a ValueError (the W8A8 layout stores exactly one scale per row and no zero point)."""
    n, k = qw.shape
    if qw.kind not in ("int", KIND) or qw.bits != BITS or not qw.symmetric or tuple(qw.scale.shape) != (n, 1):
        raise ValueError(f"INT8 W8A8 needs 8-bit symmetric per-channel codes, got kind {qw.kind!r}, {qw.bits} bits, "
                         f"symmetric={qw.symmetric}, scale {tuple(qw.scale.shape)} for [{n}, {k}]")
    return dataclasses.replace(qw, kind=KIND, granularity="channel", group_size=k, g_idx=None)


def signed_codes(qw: QuantizedWeight) -> torch.Tensor:
    """The record's codes as the checkpoint stores them: int8 [N, K] = q - 128."""
    return (qw.q.to(torch.int32) - ZERO).to(torch.int8)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (int8 codes [..., K], float32 scales [..., 1]): vLLM's dynamic per-token INT8 quantization."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(absmax > 0, INT8_MAX / absmax, torch.zeros_like(absmax))  # 127 / a_max, as the kernel
    q = torch.round(xf * inverse).clamp(-128, 127).to(torch.int8)
    return q, absmax / INT8_MAX


def fake_quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """x_hat = q_a * s_a (see `quantize_tokens`), computed in float32, returned in x's dtype."""
    q, scale = quantize_tokens(x)
    return (q.float() * scale).to(x.dtype)


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative squared output error of one Linear under W8A8: ||Q(x) w_hat^T - x w^T||^2 / ||x w^T||^2
    (x [T, K] inputs, w / w_hat [N, K] float and dequantized weights; Q: per-token INT8)."""
    ref = x.float() @ w.float().T
    out = fake_quantize_tokens(x.float()) @ w_hat.float().T
    return float((out - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))
