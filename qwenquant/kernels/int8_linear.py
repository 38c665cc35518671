"""INT8 W8A8 Linear on `torch._int_mm` (int8 x int8 -> int32), with the per-token / per-channel scaling around it.

What vLLM's compressed-tensors W8A8 INT8 path computes (`qwenquant.quant.int8`): each token's input row is quantized
dynamically, q_a = round(x * 127 / a_max) in [-128, 127], s_a = a_max / 127 (float32, [M, 1]); then
    acc [M, N] = _int_mm(q_a [M, K] int8, q_w^T [K, N] int8)    (exact int32 sums)
    y = (acc * s_a * s_w) in float32, cast to bf16,               s_w [1, N]: the checkpoint's per-channel scales.
`qwenquant.quant.int8.fake_quantize_tokens` simulates the same activation rounding (tests compare both, and the
output with the dequantized float reference).
Shape rules of `_int_mm` (torch's aten/src/ATen/native/cuda/Blas.cpp): on CUDA M > 16, K and N positive multiples
of 8, int8 inputs, a contiguous int32 output; the CPU kernel takes any shape. A Linear whose K or N breaks the CUDA
rule is not built here (`unsupported_reason`: the loader dequantizes it, labelled); on CUDA, inputs of at most 16
rows (decode at small batch) are padded with zero rows to 17 and the padding's outputs dropped (labelled).
"""

from __future__ import annotations

import torch
from torch import nn

from qwenquant.quant import int8 as int8q
from qwenquant.quant.records import QuantizedWeight

LABEL = "INT8 W8A8: torch._int_mm (int8 x int8 -> int32), per-token x per-channel float32 scales"
CUDA_PAD_SUFFIX = " [CUDA: inputs of <= 16 rows padded to 17 (the kernel's minimum)]"
CUDA_MIN_ROWS = 17  # _int_mm on CUDA needs M > 16
CUDA_MULTIPLE = 8  # ... and K, N multiples of 8


def unsupported_reason(qw: QuantizedWeight, device: torch.device) -> str | None:
    """Why this record cannot run on `_int_mm` here, or None."""
    n, k = qw.shape
    if qw.kind != int8q.KIND:
        return f"record kind {qw.kind!r} (the kernel takes INT8 W8A8 records)"
    if device.type not in ("cpu", "cuda"):
        return f"device {device.type}"
    if device.type == "cuda" and (k % CUDA_MULTIPLE or n % CUDA_MULTIPLE):
        return f"shape N={n}, K={k} (CUDA _int_mm needs K and N multiples of {CUDA_MULTIPLE})"
    return None


def int_mm_rows(q: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """acc [M, N] int32 = q [M, K] int8 @ weight_t [K, N] int8; on CUDA fewer than 17 rows are zero-padded to 17
    (the padded rows' outputs are dropped)."""
    m = q.shape[0]
    if q.device.type == "cuda" and m < CUDA_MIN_ROWS:
        padded = torch.zeros(CUDA_MIN_ROWS, q.shape[1], dtype=q.dtype, device=q.device)
        padded[:m] = q
        return torch._int_mm(padded, weight_t)[:m]
    return torch._int_mm(q, weight_t)


class Int8Linear(nn.Module):
    """y = x @ w^T with w held as int8 codes [N, K] and per-channel float32 scales; x quantized per token."""

    def __init__(self, qw: QuantizedWeight, device: torch.device, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        reason = unsupported_reason(qw, device)
        if reason is not None:
            raise ValueError(f"int8 kernel cannot run this weight: {reason}")
        n, k = qw.shape
        self.in_features, self.out_features, self.dtype = k, n, dtype
        self.register_buffer("weight", int8q.signed_codes(qw).to(device).contiguous())  # [N, K]: .t() is [K, N]
        self.register_buffer("weight_scale", qw.scale.float().reshape(1, n).to(device))
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=dtype))
        self.kernel_label = LABEL + (CUDA_PAD_SUFFIX if device.type == "cuda" else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, scale = int8q.quantize_tokens(x.reshape(-1, self.in_features))  # int8 [M, K], float32 [M, 1]
        acc = int_mm_rows(q.contiguous(), self.weight.t())
        y = (acc.float() * scale * self.weight_scale).to(self.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"
