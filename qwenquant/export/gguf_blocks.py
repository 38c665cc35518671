"""Our INT records as GGUF's legacy 32-element block types, code for code (no re-quantization).

A record (qwenquant/quant/records.py) holds unsigned codes q [N, K], scales s and zero points z per group of G input
columns: w = (q - z) * s. With G = 32 and contiguous groups (no act-order `group` permutation), each group is one
GGUF block of the row, stored in row order, and the codes go in unchanged:

| record                    | GGUF  | block (bytes)                  | GGUF value                  | mapping                    |
|---------------------------|-------|--------------------------------|-----------------------------|----------------------------|
| 8 bits, symmetric (z=128) | Q8_0  | d f16, qs i8[32]         (34)  | d * qs                      | d = s, qs = q - 128        |
| 4 bits, symmetric (z=8)   | Q4_0  | d f16, qs u8[16]         (18)  | d * (nibble - 8)            | d = s, nibble = q          |
| 4 bits, asymmetric        | Q4_1  | d f16, m f16, qs u8[16]  (20)  | d * nibble + m              | d = s, m = -z * s, nibble = q |
| 5 bits, symmetric (z=16)  | Q5_0  | d f16, qh u32, qs u8[16] (22)  | d * (q5 - 16)               | d = s, q5 = q              |
| 5 bits, asymmetric        | Q5_1  | d f16, m f16, qh, qs     (24)  | d * q5 + m                  | d = s, m = -z * s, q5 = q  |

Nibbles: element j (0..15) of a block is the low nibble of byte j, element j + 16 its high nibble; Q5's fifth bit
of element j is bit j of the little-endian u32 `qh`. Everything else is refused with a message naming the fix:
other bit widths (Q8_1's second field is a sum, not a minimum, so 8-bit asymmetric has no type), group sizes other
than 32, act-order `group`.

Rounding to float16: d = s is exact for every bf16 scale in [2**-17, 65504] (bf16 has 8 significant bits, fp16 11,
and fp16 subnormals keep them down to 2**-17); outside that, overflow is refused and smaller scales lose bits (a
warning with the weight deviation). m = -z * s needs up to 8 + 5 significant bits, so fp16 rounds it for some
groups: `pack` measures how many minima changed and the largest resulting weight deviation (|m16 - m|), which the
writer reports. Where d and m are exact, llama.cpp's d * q + m in float32 equals our (q - z) * s bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qwenquant.export.format_spec import UnstorableRecord
from qwenquant.export.gptq_v1 import scales_to_fp16
from qwenquant.quant.records import QuantizedWeight

BLOCK = 32
# (bits, symmetric) -> GGUF type name; the one table of what each type holds
TYPE_OF = {(8, True): "Q8_0", (4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1"}
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}
TYPES = tuple(BLOCK_BYTES)


def type_for(bits: int, symmetric: bool) -> str:
    """The GGUF block type that holds these codes as they are; ValueError naming the fix otherwise."""
    if bits not in (4, 5, 8):
        raise ValueError(f"GGUF block types hold 4, 5 or 8 bits (Q4_0/Q4_1, Q5_0/Q5_1, Q8_0), got bits {bits}; "
                         "use --bits 4, 5 or 8")
    if (bits, symmetric) not in TYPE_OF:
        raise ValueError("GGUF Q8_0 is symmetric (Q8_1 stores a sum, not a minimum): 8-bit asymmetric codes have no "
                         "GGUF type; use --sym")
    return TYPE_OF[(bits, symmetric)]


def check_type(qtype: str, bits: int, symmetric: bool) -> None:
    """Refuse a requested type that cannot hold these codes as they are (the fix named)."""
    natural = type_for(bits, symmetric)
    if qtype != natural:
        want = next(f"{'--sym' if s else '--asym'} --bits {b}" for (b, s), t in TYPE_OF.items() if t == qtype)
        raise ValueError(f"GGUF {qtype} cannot hold {'symmetric' if symmetric else 'asymmetric'} {bits}-bit codes "
                         f"as they are ({natural} does); quantize with {want}")


def check_groups(group_size: int, actorder: str | None) -> None:
    if group_size != BLOCK:
        raise ValueError(f"GGUF block types have 32-column groups, got group size {group_size}; use --group-size 32")
    if actorder == "group":
        raise ValueError("GGUF blocks are contiguous 32-column runs; act-order `group` permutes groups: "
                         "use --act-order static or none")


@dataclass
class PackedLinear:
    qtype: str
    data: np.ndarray  # uint8 [N, K/32 * block bytes]
    mins_rounded: int = 0  # Q4_1/Q5_1: minima -z*s that float16 changed
    max_min_deviation: float = 0.0  # the largest |fp16(m) - m|, a bound on the weight deviation it causes


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    """[N, G] float16 -> uint8 [N, G, 2] (little-endian)."""
    return x.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[N, G, 32] low 4 bits -> uint8 [N, G, 16]: element j low nibble, element j + 16 high nibble of byte j."""
    low = q & 0x0F
    return (low[..., :16] | (low[..., 16:] << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """[N, G, 32] fifth bits -> uint8 [N, G, 4]: bit j of a little-endian u32 is element j's bit 4."""
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=-1, bitorder="little")


def _minimum(qw: QuantizedWeight) -> tuple[torch.Tensor, int, float]:
    """(fp16 m = -z * s [N, G], how many fp16 changed, max |fp16(m) - m|), m computed exactly in float32."""
    exact = -qw.zero_point.float() * qw.scale.float()
    if bool((exact.abs() > torch.finfo(torch.float16).max).any()):
        raise UnstorableRecord("a block minimum -z*s overflows float16; GGUF Q4_1/Q5_1 cannot store it")
    half = exact.to(torch.float16)
    diff = (half.float() - exact).abs()
    return half, int((diff > 0).sum()), float(diff.max()) if diff.numel() else 0.0


def pack(qw: QuantizedWeight, qtype: str | None = None) -> PackedLinear:
    """One Linear's record as GGUF blocks (the mapping in the module docstring)."""
    if qw.kind != "int":
        raise ValueError(f"GGUF block export takes INT records, got kind {qw.kind!r}")
    natural = type_for(qw.bits, qw.symmetric)
    if qtype is not None:
        check_type(qtype, qw.bits, qw.symmetric)
    check_groups(qw.group_size or qw.shape[1], qw.actorder)
    n, k = qw.shape
    if k % BLOCK or qw.scale.shape != (n, k // BLOCK):
        raise ValueError(f"GGUF blocks need K divisible by 32 and one scale per block; K={k}, "
                         f"scale {tuple(qw.scale.shape)}")
    if qw.g_idx is not None and not torch.equal(qw.g_idx.long().cpu(), torch.arange(k) // BLOCK):
        raise ValueError("GGUF blocks are contiguous 32-column runs; this record's g_idx permutes columns")
    g = k // BLOCK
    d = _f16_bytes(scales_to_fp16(qw).cpu())  # [N, G, 2]
    q = qw.q.cpu().numpy().astype(np.int32).reshape(n, g, BLOCK)
    parts, rounded, dev = [d], 0, 0.0
    if natural in ("Q4_1", "Q5_1"):
        m, rounded, dev = _minimum(qw)
        parts.append(_f16_bytes(m.cpu()))
    if natural == "Q8_0":
        parts.append((q - 128).astype(np.int8).view(np.uint8))
    else:
        if natural in ("Q5_0", "Q5_1"):
            parts.append(_high_bits(q))
        parts.append(_nibbles(q))
    data = np.concatenate(parts, axis=-1).reshape(n, g * BLOCK_BYTES[natural])
    return PackedLinear(natural, np.ascontiguousarray(data), rounded, dev)
