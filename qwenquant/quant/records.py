"""The record every quantizer returns and every exporter reads: codes plus what is needed to dequantize them.

Conventions (one place, so algorithms and writers agree):
- FP8 (`kind="fp8"`): `q` is float8_e4m3fn [N, K]; `scale` multiplies: w_hat = q * scale, broadcast per
  granularity: "tensor" -> [1], "channel" -> [N, 1], "block" -> [ceil(N/B), ceil(K/B)] for block size B.
- INT (`kind="int"`): `q` holds unsigned codes in [0, 2**bits - 1] as int32 [N, K]; `zero_point` [N, K/G] holds
  unsigned zero points (symmetric: always 2**(bits-1)); `scale` [N, K/G]; w_hat = (q - z[g_idx]) * scale[g_idx]
  where column k belongs to group g_idx[k] (k // G without act-order). Channel-wise = one group of size K.
- INT8 W8A8 (`kind="int8"`, quant/int8.py): the INT convention with bits 8, symmetric, one group per row (scale
  [N, 1]); a kind of its own because its layout (int-quantized) and its activations (INT8 per token) differ.
- NVFP4 (`kind="nvfp4"`, quant/nvfp4.py): `q` holds 4-bit E2M1 codes as uint8 [N, K] (bit 3 sign, bits 0-2 the
  index of the magnitude in E2M1_VALUES); `scale` float8_e4m3fn [N, K/16]; `global_scale` float32 [1] = g;
  w_hat = e2m1(q) * (scale / g), the division and the product in float32.
- `scale` is stored in the model dtype (bf16 for Qwen3); codes were computed with that rounded scale, so
  dequantization in float32 reproduces exactly what an engine computes from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """One Linear's quantized weight."""

    kind: str  # "fp8" | "int" | "nvfp4"
    q: torch.Tensor
    scale: torch.Tensor
    granularity: str  # fp8: tensor | channel | block ; int: group | channel
    bits: int = 8
    symmetric: bool = True
    zero_point: torch.Tensor | None = None
    group_size: int | None = None  # int: columns per group (K for channel-wise)
    g_idx: torch.Tensor | None = None  # int: [K] group of each input column (act-order), else None
    actorder: str | None = None  # int: None | "static" | "group" (how g_idx was produced)
    block_size: int | None = None  # fp8 block granularity
    global_scale: torch.Tensor | None = None  # nvfp4: float32 [1], the per-tensor g (scale / g is the group's step)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def group_index(self) -> torch.Tensor:
        """[K] group of each input column (derived when no act-order permutation was used)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        k = self.q.shape[1]
        gs = self.group_size or k
        return torch.arange(k, device=self.q.device) // gs

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w_hat in `dtype`, computed in float32."""
        if self.kind == "fp8":  # w_hat = q * scale
            return (self.q.float() * expand_scale(self.scale, tuple(self.q.shape), self.granularity,
                                                  self.block_size)).to(dtype)
        if self.kind == "nvfp4":  # w_hat = e2m1(q) * (scale / g)
            step = self.scale.float() / self.global_scale.float().to(self.scale.device)
            return (e2m1_values(self.q) * step.repeat_interleave(self.group_size or 16, dim=1)).to(dtype)
        g = self.group_index()
        scale = self.scale.float()[:, g]  # [N, K]
        zero = self.zero_point.float()[:, g] if self.zero_point is not None else 2 ** (self.bits - 1)
        return ((self.q.float() - zero) * scale).to(dtype)


E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of E2M1 codes 0..7


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values of 4-bit E2M1 codes (uint8 in [0, 15]: bit 3 the sign, bits 0-2 the magnitude index)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], granularity: str, block_size: int | None) -> torch.Tensor:
    """Broadcastable float32 FP8 scale for a weight of `shape` [N, K]: [1] and [N, 1] as they are, block scales
    [ceil(N/B), ceil(K/B)] -> [N, K] by repeating each block's scale."""
    scale = scale.float()
    if granularity != "block":
        return scale
    n, k = shape
    b = block_size or 128
    return scale.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]
