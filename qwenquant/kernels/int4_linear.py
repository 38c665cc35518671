"""INT4 W4A16 Linear on torch's int4 weight-packing kernels (tinygemm on CUDA, the int4 CPU kernel on CPU).

Kernel convention (torch's own int4 tests): w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n], with
`scales_and_zeros` [K/G, N, 2] in bf16. Our records use w = (q - z) * s, hence scale = s, zero = (8 - z) * s:
exactly 0 for symmetric records (z = 8); asymmetric zeros and fp16 (GPTQ/AWQ) scales round to bf16, a relative
error of at most 2**-8 of the term.
- CPU:  `_convert_weight_to_int4pack_for_cpu(int32 [N, K] codes, inner_k_tiles)` + `_weight_int4pack_mm_for_cpu`.
- CUDA: `_convert_weight_to_int4pack(uint8 [N, K/2], inner_k_tiles)` (even column in the high nibble) +
  `_weight_int4pack_mm` (bf16 activations, SM80+).
Group sizes 32/64/128/256; channel-wise records use group 128 with the scale repeated (exact). Act-order records
(a g_idx with G columns per group) are permuted so groups are contiguous, and inputs are permuted to match.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenquant.quant.records import QuantizedWeight

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
LABEL = "INT4 W4A16: torch int4 pack kernel (_weight_int4pack_mm{suffix}), group {g}{extra}"


def kernel_group_size(k: int, group_size: int) -> int | None:
    """The kernel group size for a record with `group_size` columns per group (K = channel-wise), or None."""
    if group_size in KERNEL_GROUP_SIZES and k % group_size == 0:
        return group_size
    if group_size == k:  # one group per row: any kernel group that divides K reproduces it
        return next((g for g in (128, 256, 64, 32) if k % g == 0), None)
    return None


def inner_k_tiles(k: int) -> int | None:
    """Largest supported inner K tiling (8, 4, 2 tiles of 16) that divides K."""
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)


def unsupported_reason(qw: QuantizedWeight, device: torch.device) -> str | None:
    """Why this record cannot run on the int4 kernel here, or None."""
    n, k = qw.shape
    if qw.kind != "int" or qw.bits != 4:
        return f"{qw.bits}-bit weights (the kernel is 4-bit only)"
    if kernel_group_size(k, qw.group_size or k) is None:
        return f"group size {qw.group_size} (kernel groups: {KERNEL_GROUP_SIZES})"
    if inner_k_tiles(k) is None or n % 8 != 0:
        return f"shape N={n}, K={k} (needs K % 32 == 0 and N % 8 == 0)"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "GPU older than SM80 (tinygemm needs bf16 tensor cores)"
    if device.type not in ("cpu", "cuda"):
        return f"device {device.type}"
    g = qw.group_index()
    if qw.g_idx is not None and bool((torch.bincount(g.cpu()) != k // qw.scale.shape[1]).any()):
        return "act-order groups of unequal size"
    return None


def act_order_permutation(qw: QuantizedWeight) -> torch.Tensor | None:
    """Column order that makes the record's groups contiguous (None when they already are)."""
    g = qw.group_index().cpu()
    n_groups = qw.scale.shape[1]
    if torch.equal(g, torch.arange(qw.shape[1]) // (qw.shape[1] // n_groups)):
        return None
    return torch.argsort(g, stable=True)


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, repeat: int = 1) -> torch.Tensor:
    """Our (s, z) [N, n_groups] -> the kernel's [n_groups * repeat, N, 2] bf16 (scale, (8 - z) * s)."""
    s = scale.float().repeat_interleave(repeat, dim=1)
    z = zero.float().repeat_interleave(repeat, dim=1)
    return torch.stack([s.t(), ((8.0 - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()


def pack_int4(q: torch.Tensor, device: torch.device, tiles: int) -> torch.Tensor:
    """Unsigned codes int32 [N, K] in 0..15 -> the kernel's packed weight on `device`."""
    q = q.to(device=device, dtype=torch.int32).contiguous()
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, tiles)
    packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()  # [N, K/2], even column high nibble
    return torch.ops.aten._convert_weight_to_int4pack(packed, tiles)


class Int4Linear(nn.Module):
    """y = x @ w^T with w held as packed int4 codes and per-group bf16 scales/zeros."""

    def __init__(self, qw: QuantizedWeight, device: torch.device, bias: torch.Tensor | None = None):
        super().__init__()
        reason = unsupported_reason(qw, device)
        if reason is not None:
            raise ValueError(f"int4 kernel cannot run this weight: {reason}")
        n, k = qw.shape
        self.in_features, self.out_features = k, n
        self.group_size = kernel_group_size(k, qw.group_size or k)
        perm = act_order_permutation(qw)
        q = qw.q if perm is None else qw.q[:, perm.to(qw.q.device)]
        zero = qw.zero_point if qw.zero_point is not None else torch.full_like(qw.scale, 8, dtype=torch.int32)
        repeat = (k // qw.scale.shape[1]) // self.group_size  # > 1 only for channel-wise records
        self.register_buffer("weight_packed", pack_int4(q, device, inner_k_tiles(k)))
        self.register_buffer("scales_and_zeros", scales_and_zeros(qw.scale, zero, repeat).to(device))
        self.register_buffer("perm", None if perm is None else perm.to(device))
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=torch.bfloat16))
        suffix = "_for_cpu" if device.type == "cpu" else ""
        extra = (", act-order permuted" if perm is not None else "") + ("" if qw.symmetric else ", asymmetric")
        self.kernel_label = LABEL.format(suffix=suffix, g=self.group_size, extra=extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        x2 = x2.contiguous()
        on_cpu = self.weight_packed.device.type == "cpu"
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if on_cpu else torch.ops.aten._weight_int4pack_mm
        y = mm(x2, self.weight_packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}, perm={self.perm is not None}"
