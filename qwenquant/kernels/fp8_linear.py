"""FP8 Linears: W8A8 through `torch._scaled_mm` with row-wise scales, and FP8 weight-only.

W8A8 (what vLLM runs for compressed-tensors FP8 on SM89+): a = fp8(x / s_a) with s_a = absmax(row of x) / 448 per
token (dynamic) or the checkpoint's static `input_scale`; then
    y = _scaled_mm(a [M,K], q.t() [K,N], scale_a=s_a [M,1] fp32, scale_b=s_w [1,N] fp32, out_dtype=bf16)
      = (a * s_a) @ (q * s_w)^T, accumulated in fp32.
`qwenquant.quant.fp8.fake_quantize_activation` simulates exactly this activation rounding (tests compare the two).
Some CUDA builds only have the tensor-wise kernel on SM89 (row-wise needs SM90 there): a probe picks row-wise, or
else the tensor-wise kernel with unit scales and s_a * s_w applied to its fp32 output (labelled as such).
Weight-only (GPUs without FP8 compute, or checkpoints without activation quantization): the float8 weight stays in
memory and is upcast to bf16 for each matmul (q * s in bf16 is exact: 4 + 8 mantissa bits fit in fp32 and round
once, the same bf16 weight a dequantizing loader would hold).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from qwenquant.quant.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE

W8A8_ROWWISE = "FP8 W8A8: torch._scaled_mm, row-wise scales (per-token activations x per-channel weights)"
W8A8_TENSORWISE = ("FP8 W8A8: torch._scaled_mm tensor-wise kernel (unit scales), per-token x per-channel scales "
                   "applied to its fp32 output (this GPU/torch has no row-wise FP8 kernel)")
WEIGHT_ONLY = "FP8 weight-only: float8 weights in memory, upcast to bf16 per matmul (no FP8 compute used)"
STATIC_SUFFIX = " [static per-tensor input scale]"


@lru_cache(maxsize=None)
def scaled_mm_mode(device: str) -> str | None:
    """'rowwise', 'tensorwise' or None (no FP8 matmul here), probed once per device with a tiny product."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9):
        return None  # Ampere and older: no FP8 tensor cores
    a = torch.ones(16, 32, device=dev).to(FP8_DTYPE)
    b = torch.ones(16, 32, device=dev).to(FP8_DTYPE).t()
    try:
        torch._scaled_mm(a, b, scale_a=torch.ones(16, 1, device=dev), scale_b=torch.ones(1, 16, device=dev),
                         out_dtype=torch.bfloat16)
        return "rowwise"
    except (RuntimeError, NotImplementedError):
        pass
    try:
        one = torch.ones((), device=dev)
        torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32)
        return "tensorwise"
    except (RuntimeError, NotImplementedError):
        return None


def quantize_rows(x: torch.Tensor, input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 [M, K], fp32 scale [M, 1]): per-row absmax / 448, or a static per-tensor scale."""
    xf = x.float()
    if input_scale is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    else:
        scale = input_scale.float().reshape(1, 1).expand(xf.shape[0], 1)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


class FP8Linear(nn.Module):
    """A Linear whose weight is float8_e4m3fn [N, K] with per-channel ([N,1]) or per-tensor ([1]) scales."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, mode: str, input_scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if mode not in ("rowwise", "tensorwise", "weight-only"):
            raise ValueError(f"unknown FP8 mode {mode!r}")
        n, k = q.shape
        self.in_features, self.out_features, self.mode, self.dtype = k, n, mode, dtype
        self.register_buffer("weight", q.contiguous())  # [N, K] row-major: weight.t() is column-major for _scaled_mm
        if mode == "weight-only":  # model-dtype column: q * s rounds once (see module docstring)
            self.register_buffer("weight_scale", scale.to(dtype).reshape(-1, 1).expand(n, 1).contiguous())
        else:
            self.register_buffer("weight_scale", scale.float().reshape(1, -1).expand(1, n).contiguous())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1, 1))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        label = {"rowwise": W8A8_ROWWISE, "tensorwise": W8A8_TENSORWISE, "weight-only": WEIGHT_ONLY}[mode]
        self.kernel_label = label + (STATIC_SUFFIX if input_scale is not None and mode != "weight-only" else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.mode == "weight-only":
            y = nn.functional.linear(x2.to(self.dtype), self.weight.to(self.dtype) * self.weight_scale)
        else:
            a, sa = quantize_rows(x2, self.input_scale)
            if self.mode == "rowwise":
                y = torch._scaled_mm(a, self.weight.t(), scale_a=sa, scale_b=self.weight_scale, out_dtype=self.dtype)
            else:
                one = torch.ones((), device=x.device)
                y = torch._scaled_mm(a, self.weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
                y = (y * sa * self.weight_scale).to(self.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        static = self.input_scale is not None
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode}, static={static}"
