"""GPTQ v1 checkpoint layout (`quant_method: "gptq"`, `checkpoint_format: "gptq"`).

Per Linear, with p = 32 / bits codes per int32 word (transposed relative to the weight):
- `qweight` I32 [K/p, N]: input row k = p*i + j sits at bits [bits*j, bits*(j+1)) of word [i, n];
- `qzeros` I32 [K/G, N/p]: column p*c + j at bits [bits*j, ...) of word [g, c]; **v1 stores z - 1**
  (symmetric 4-bit words are 0x77777777);
- `scales` F16 [K/G, N];  `g_idx` I32 [K]: group of each input column, in the original column order.
w[n, k] = scales[g, n] * (q[k, n] - z[g, n]) with g = g_idx[k]. Bits 2, 4 and 8 pack evenly; GPTQ's 3-bit
packing lets codes straddle words in a layout of its own, and is refused. A zero point of 0 cannot be stored
(z - 1 = -1 would borrow into the neighbouring field), so such asymmetric records are refused as well.

Scales are converted to float16. bf16 -> fp16 is exact for every bf16 value in [2**-17, 65504]; smaller
scales lose bits (fp16 subnormals) and larger ones overflow: the first warns with the resulting max weight
deviation, the second raises.
"""

from __future__ import annotations

import re
import warnings

import math

import torch

from qwenquant.export.format_spec import ExportFormat, UnstorableRecord, int_actorder
from qwenquant.quant.records import QuantizedWeight

SUPPORTED_BITS = (2, 4, 8)
FP16_MAX = float(torch.finfo(torch.float16).max)


def pack_int32(codes: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack unsigned `bits`-wide codes along `dim` into int32 words, LSB first.

    Field f of word c holds element p*c + order[f] along `dim` (order defaults to 0..p-1).
    """
    per_word = 32 // bits
    moved = codes.movedim(dim, -1).to(torch.int64)  # [..., L]
    length = moved.shape[-1]
    if length % per_word != 0:
        raise ValueError(f"dimension of size {length} is not divisible by {per_word} ({bits}-bit codes per int32)")
    if int(moved.min()) < 0 or int(moved.max()) >= 2**bits:
        raise ValueError(f"codes out of the unsigned {bits}-bit range")
    fields = moved.reshape(*moved.shape[:-1], length // per_word, per_word)
    if order is not None:
        fields = fields[..., list(order)]
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (fields << shifts).sum(dim=-1)  # [..., L/p] in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words -> unsigned codes int32, unpacked along `dim`."""
    per_word = 32 // bits
    moved = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF  # [..., W]
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    fields = (moved.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [..., W, p]: field f
    if order is not None:
        fields = fields[..., torch.argsort(torch.tensor(order)).tolist()]  # element e sits in field order.index(e)
    codes = fields.reshape(*moved.shape[:-1], -1).to(torch.int32)
    return codes.movedim(-1, dim).contiguous()


def scales_to_fp16(qw: QuantizedWeight) -> torch.Tensor:
    """Record scales [N, n_groups] as float16; raises on overflow, warns when values change."""
    scale = qw.scale.float()
    if bool((scale.abs() > FP16_MAX).any()):
        raise UnstorableRecord(f"scales up to {float(scale.abs().max()):.3g} overflow float16 (max {FP16_MAX})")
    half = qw.scale.to(torch.float16)
    if not torch.equal(half.float(), scale):
        exact = qw.dequantize(torch.float32)
        converted = QuantizedWeight(**{**qw.__dict__, "scale": half})
        deviation = float((converted.dequantize(torch.float32) - exact).abs().max())
        warnings.warn(
            f"float16 cannot represent {int((half.float() != scale).sum())} scale(s) exactly "
            f"(smallest scale {float(scale.abs().min()):.3g}); max weight deviation {deviation:.3g}",
            stacklevel=3,
        )
    return half


def check_groups(qw: QuantizedWeight) -> int:
    """Validate K against the group layout; returns the number of groups."""
    n, k = qw.shape
    n_groups = qw.scale.shape[1]
    if qw.group_size is not None and k % qw.group_size != 0:
        raise ValueError(f"K={k} is not divisible by group size {qw.group_size}")
    if qw.scale.shape != (n, n_groups) or k % n_groups != 0:
        raise ValueError(f"scale shape {tuple(qw.scale.shape)} does not split K={k} into equal groups")
    if not qw.symmetric and (qw.zero_point is None or qw.zero_point.shape != qw.scale.shape):
        raise ValueError("asymmetric record needs a zero_point shaped like its scale")
    return n_groups


def unsigned_zero_point(qw: QuantizedWeight) -> torch.Tensor:
    """Zero points [N, n_groups] int32; symmetric records use 2**(bits-1)."""
    if qw.symmetric:
        return torch.full(qw.scale.shape, 2 ** (qw.bits - 1), dtype=torch.int32, device=qw.q.device)
    return qw.zero_point.to(torch.int32)


def _check(qw: QuantizedWeight) -> None:
    """Raise ValueError when the record cannot be written as GPTQ v1."""
    if qw.kind != "int":
        raise ValueError(f"GPTQ stores INT weights, got kind {qw.kind!r}")
    if qw.bits not in SUPPORTED_BITS:
        raise ValueError(f"GPTQ v1 export supports bits {SUPPORTED_BITS}, got {qw.bits}")
    check_groups(qw)
    per_word = 32 // qw.bits
    n, k = qw.shape
    if k % per_word != 0 or n % per_word != 0:
        raise ValueError(f"GPTQ packs {per_word} codes per int32 along K and N; got N={n}, K={k}")
    if not qw.symmetric and bool((qw.zero_point == 0).any()):
        raise UnstorableRecord(
            "GPTQ v1 stores zero_point - 1 and cannot represent a zero point of 0; "
            "use --format compressed-tensors or symmetric quantization"
        )


def linear_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Local tensors of one Linear: `qweight`, `qzeros`, `scales`, `g_idx`."""
    _check(qw)
    zero = unsigned_zero_point(qw)  # [N, n_groups]
    return {
        "qweight": pack_int32(qw.q.t(), qw.bits, dim=0),  # [K, N] -> [K/p, N]
        "qzeros": pack_int32((zero - 1).t(), qw.bits, dim=1),  # [n_groups, N] -> [n_groups, N/p]
        "scales": scales_to_fp16(qw).t().contiguous(),  # [n_groups, N]
        "g_idx": qw.group_index().to(torch.int32).contiguous(),  # [K]
    }


def _skip_patterns(ignore: list[str]) -> dict[str, dict]:
    """gptqmodel/vLLM `dynamic` negative overrides ("-:regex") for ignored modules other than lm_head."""
    patterns = {}
    for name in ignore:
        if name == "lm_head":
            continue
        regex = name[3:] if name.startswith("re:") else f"^{re.escape(name)}$"
        patterns[f"-:{regex}"] = {}
    return patterns


def quantization_config(
    bits: int, group_size: int | None, symmetric: bool, actorder: str | None, ignore: list[str]
) -> dict:
    """config.json `quantization_config`, also the content of `quantize_config.json`.

    group_size None or <= 0 means channel-wise (-1). Ignored modules other than lm_head (never quantized in
    GPTQ v1) become gptqmodel-style `dynamic` skip rules, matched by loaders against module names.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"GPTQ v1 export supports bits {SUPPORTED_BITS}, got {bits}")
    config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size if group_size and group_size > 0 else -1,
        "desc_act": actorder is not None,
        "sym": symmetric,
        "checkpoint_format": "gptq",
        "lm_head": False,
        "damp_percent": 0.01,
    }
    skips = _skip_patterns(ignore)
    if skips:
        config["dynamic"] = skips
    return config


def read_linear(tensors: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """Dequantized float32 [N, K] from one Linear's GPTQ v1 tensors."""
    bits = int(config["bits"])
    q = unpack_int32(tensors["qweight"], bits, dim=0)  # [K, N]
    zero = unpack_int32(tensors["qzeros"], bits, dim=1) + 1  # [n_groups, N], v1 stores z - 1
    scale = tensors["scales"].float()  # [n_groups, N]
    g = tensors["g_idx"].long()  # [K]
    w = (q.float() - zero.float()[g]) * scale[g]  # [K, N]
    return w.t().contiguous()


# -- the registry entry ---------------------------------------------------------------------------------------------


def _check_stage(kind: str, cfg) -> None:
    if kind != "int":
        raise ValueError("export.format: gptq stores INT weights; FP8 exports to compressed-tensors or hf-fp8")
    if cfg.bits not in SUPPORTED_BITS:
        raise ValueError(f"export.format: gptq packs 2, 4 or 8 bits, got bits {cfg.bits}; use compressed-tensors")


def _check_linear(kind: str, cfg, name: str, n: int, k: int) -> str | None:
    if n % 8:
        return f"{name} has {n} output features; gptq packs 8 per int32, use --format compressed-tensors"
    per_word = 32 // cfg.bits if 32 % cfg.bits == 0 else None
    if per_word and k % per_word:
        return f"{name} has {k} input features; gptq packs {per_word} per int32 along them, use --format compressed-tensors"
    return None


def _tensor_bytes(kind: str, cfg, n: int, k: int, dtype_bytes: int) -> dict[str, int]:
    groups = k // (k if cfg.group_size == -1 else cfg.group_size)
    per_word = 32 // cfg.bits
    return {"qweight": 4 * math.ceil(k / per_word) * n, "qzeros": 4 * groups * math.ceil(n / per_word),
            "scales": 2 * groups * n, "g_idx": 4 * k}


def _quantization_config(kind: str, cfg, ignore: list[str], linears: list[str]) -> tuple[dict, dict]:
    config = quantization_config(cfg.bits, cfg.group_size, cfg.symmetric, int_actorder(cfg), ignore)
    if hasattr(cfg, "dampening_frac"):
        config["damp_percent"] = cfg.dampening_frac  # metadata only, but it must tell the truth
    return config, config


EXPORT_FORMAT = ExportFormat(
    "gptq", ("int",), _check_stage, _tensor_bytes,
    linear_tensors=lambda qw, cfg, name, activation: linear_tensors(qw),
    quantization_config=_quantization_config,
    reload_with=lambda kind, cfg, moe: "spec-reader",  # transformers needs gptqmodel for it
    read_linear=lambda tensors, config, name: read_linear(tensors, config),
    check_linear=_check_linear, fused_ignores=True,
)
