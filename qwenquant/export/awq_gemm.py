"""AWQ GEMM checkpoint layout (`quant_method: "awq"`, `version: "gemm"`), 4-bit only.

Per Linear, packed along N (not transposed like GPTQ's qweight):
- `qweight` I32 [K, N/8]: nibble i of word [k, c] holds column 8c + ORDER[i], ORDER = [0, 2, 4, 6, 1, 3, 5, 7];
- `qzeros` I32 [K/G, N/8]: unsigned zero points, same interleave, stored as is (no -1 as in GPTQ v1);
- `scales` F16 [K/G, N].
w[n, k] = (q - z) * scale with contiguous groups (no g_idx): act-order permutations cannot be stored.
AWQ kernels are asymmetric; symmetric records are written with z = 8. Scales go to float16 as in GPTQ v1
(exact for bf16 values in [2**-17, 65504]; warns when lossy, raises on overflow).
"""

from __future__ import annotations

import math

import torch

from qwenquant.export.format_spec import ExportFormat, int_actorder
from qwenquant.export.gptq_v1 import check_groups, pack_int32, scales_to_fp16, unpack_int32, unsigned_zero_point
from qwenquant.quant.records import QuantizedWeight

BITS = 4
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
ACT_ORDER_ERROR = (
    "AWQ format cannot store act-order (a g_idx column permutation); "
    "use --format gptq, or --act-order static or none"
)


def _check(qw: QuantizedWeight) -> None:
    """Raise ValueError when the record cannot be written as AWQ GEMM."""
    if qw.kind != "int":
        raise ValueError(f"AWQ stores INT weights, got kind {qw.kind!r}")
    if qw.bits != BITS:
        raise ValueError(f"AWQ GEMM export supports bits ({BITS},), got {qw.bits}")
    n_groups = check_groups(qw)
    n, k = qw.shape
    if n % 8 != 0:
        raise ValueError(f"AWQ packs 8 codes per int32 along N; N={n} is not divisible by 8")
    if qw.g_idx is not None and not torch.equal(qw.group_index().cpu(), torch.arange(k) // (k // n_groups)):
        raise ValueError(ACT_ORDER_ERROR)


def linear_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Local tensors of one Linear: `qweight`, `qzeros`, `scales`."""
    _check(qw)
    return {
        "qweight": pack_int32(qw.q.t(), BITS, dim=1, order=ORDER),  # [K, N] -> [K, N/8]
        "qzeros": pack_int32(unsigned_zero_point(qw).t(), BITS, dim=1, order=ORDER),  # [n_groups, N/8]
        "scales": scales_to_fp16(qw).t().contiguous(),  # [n_groups, N]
    }


def quantization_config(
    bits: int, group_size: int | None, symmetric: bool, actorder: str | None, ignore: list[str]
) -> dict:
    """config.json `quantization_config` (group_size None or <= 0 means channel-wise, written as -1).

    `symmetric` only changes the stored zero points (z = 8): AWQ GEMM always declares zero_point true.
    Act-order "static" keeps contiguous groups and is accepted; "group" is refused. Loaders match
    `modules_to_not_convert` entries as substrings of module names, so regex entries cannot be expressed.
    """
    del symmetric
    if bits != BITS:
        raise ValueError(f"AWQ GEMM export supports bits ({BITS},), got {bits}")
    if actorder not in (None, "static", "weight"):
        raise ValueError(ACT_ORDER_ERROR)
    regexes = [name for name in ignore if name.startswith("re:")]
    if regexes:
        raise ValueError(f"AWQ modules_to_not_convert matches plain substrings; got regex entries {regexes}")
    skipped = [name for name in ignore if name != "lm_head"]
    return {
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
        "group_size": group_size if group_size and group_size > 0 else -1,
        "bits": BITS,
        "modules_to_not_convert": skipped or None,
    }


def read_linear(tensors: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """Dequantized float32 [N, K] from one Linear's AWQ GEMM tensors."""
    del config
    q = unpack_int32(tensors["qweight"], BITS, dim=1, order=ORDER)  # [K, N]
    zero = unpack_int32(tensors["qzeros"], BITS, dim=1, order=ORDER)  # [n_groups, N]
    scale = tensors["scales"].float()  # [n_groups, N]
    k, n_groups = q.shape[0], scale.shape[0]
    g = torch.arange(k, device=q.device) // (k // n_groups)  # [K]
    w = (q.float() - zero.float()[g]) * scale[g]  # [K, N]
    return w.t().contiguous()


# -- the registry entry ---------------------------------------------------------------------------------------------


def _check_stage(kind: str, cfg) -> None:
    if kind != "int":
        raise ValueError("export.format: awq stores INT weights; FP8 exports to compressed-tensors or hf-fp8")
    if int_actorder(cfg) == "group":
        raise ValueError("export.format: awq cannot store act-order 'group'; use actorder static/none or format gptq")
    if cfg.bits != BITS:
        raise ValueError(f"export.format: awq stores 4-bit weights only, got bits {cfg.bits}; "
                         "use bits 4 or format compressed-tensors")


def _check_linear(kind: str, cfg, name: str, n: int, k: int) -> str | None:
    if n % 8:
        return f"{name} has {n} output features; awq packs 8 per int32, use --format compressed-tensors"
    return None


def _tensor_bytes(kind: str, cfg, n: int, k: int, dtype_bytes: int) -> dict[str, int]:
    groups = k // (k if cfg.group_size == -1 else cfg.group_size)
    return {"qweight": 4 * k * math.ceil(n / 8), "qzeros": 4 * groups * math.ceil(n / 8), "scales": 2 * groups * n}


def _quantization_config(kind: str, cfg, ignore: list[str], linears: list[str]) -> tuple[dict, None]:
    return quantization_config(cfg.bits, cfg.group_size, cfg.symmetric, int_actorder(cfg), ignore), None


EXPORT_FORMAT = ExportFormat(
    "awq", ("int",), _check_stage, _tensor_bytes,
    linear_tensors=lambda qw, cfg, name, activation: linear_tensors(qw),
    quantization_config=_quantization_config,
    reload_with=lambda kind, cfg, moe: "spec-reader",  # transformers needs gptqmodel for it
    read_linear=lambda tensors, config, name: read_linear(tensors, config),
    check_linear=_check_linear, fused_ignores=True,
)
