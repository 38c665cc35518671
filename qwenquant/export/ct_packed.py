"""compressed-tensors `pack-quantized` layout for INT weights (W4A16 / W8A16, sym or asym, group or channel).

Per Linear: `weight_packed` I32 [N, K*bits/32], `weight_scale` (model dtype) [N, K/G], `weight_shape` I64 [2],
and for asymmetric schemes `weight_zero_point` I32 [N*bits/32, K/G] (packed along N).
compressed-tensors stores *signed* codes and zero points (unsigned minus 2**(bits-1)) and adds 2**(bits-1) back
when packing, so the packed fields hold exactly our unsigned q and z. Packing is a dense little-endian bit
stream: element j of a row sits at bits [j*bits, (j+1)*bits) of the row's words. For 2/4/8 bits this is the
classic "element i of each word at bits [bits*i, ...)" layout; 3-bit fields straddle words (new in
compressed-tensors 0.20; older readers used 10 codes per word, so 3-bit output only loads with >= 0.20).

The tensors and config are produced by the compressed-tensors library itself; `read_linear` is an independent
reader written from the format description, used to verify what was written.

compressed-tensors 0.20 removed act-order "group" (the `weight_g_idx` tensor): its QuantizationArgs reject
`actorder="group"`, so a checkpoint with a column permutation can no longer be described or loaded. Records
with a non-trivial g_idx are refused here; "static" (a.k.a. "weight") act-order needs no g_idx and is fine.
"""

from __future__ import annotations

import warnings

import torch

from qwenquant.export.format_spec import UnstorableRecord
from qwenquant.export.gptq_v1 import unpack_int32
from qwenquant.quant.records import QuantizedWeight

FORMAT = "pack-quantized"
SUPPORTED_BITS = (2, 3, 4, 8)
ENGINE_BITS = (4, 8)  # vLLM's compressed-tensors WNA16 kernels
STORABLE_ACTORDER = (None, "static", "weight")


def _weight_args(bits: int, group_size: int | None, symmetric: bool, actorder: str | None):
    """compressed-tensors QuantizationArgs for the weights; group_size None or <= 0 means channel-wise."""
    from compressed_tensors.quantization import QuantizationArgs

    if bits not in SUPPORTED_BITS:
        raise ValueError(f"compressed-tensors pack-quantized export supports bits {SUPPORTED_BITS}, got {bits}")
    if actorder not in STORABLE_ACTORDER:
        raise ValueError(
            f"act-order {actorder!r} cannot be stored as compressed-tensors: version 0.20 removed actorder 'group' "
            "(weight_g_idx); use --act-order static (same accuracy path, no g_idx) or --format gptq"
        )
    if group_size is None or group_size <= 0:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel", actorder=actorder)
    return QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size, actorder=actorder
    )


def _scheme(bits: int, group_size: int | None, symmetric: bool, actorder: str | None):
    """A QuantizationScheme targeting Linear layers, weight-only, pack-quantized."""
    from compressed_tensors.quantization import QuantizationScheme

    args = _weight_args(bits, group_size, symmetric, actorder)
    return QuantizationScheme(targets=["Linear"], weights=args, format=FORMAT)


def _record_group_size(qw: QuantizedWeight) -> int | None:
    """Group size to declare for this record: None for channel-wise (one group spanning K)."""
    n_groups = qw.scale.shape[1]
    return None if n_groups == 1 else qw.shape[1] // n_groups


def _validate(qw: QuantizedWeight) -> None:
    """Raise ValueError when the record cannot be written as pack-quantized."""
    if qw.kind != "int":
        raise ValueError(f"pack-quantized stores INT weights, got kind {qw.kind!r}")
    if qw.bits not in SUPPORTED_BITS:
        raise ValueError(f"compressed-tensors pack-quantized export supports bits {SUPPORTED_BITS}, got {qw.bits}")
    n, k = qw.shape
    n_groups = qw.scale.shape[1]
    if qw.group_size is not None and k % qw.group_size != 0:
        raise ValueError(f"K={k} is not divisible by group size {qw.group_size}")
    if qw.scale.shape != (n, n_groups) or k % n_groups != 0:
        raise ValueError(f"scale shape {tuple(qw.scale.shape)} does not split K={k} into equal groups")
    if (k * qw.bits) % 32 != 0:
        raise ValueError(f"K={k} x {qw.bits} bits does not fill whole int32 words")
    if not qw.symmetric and (n * qw.bits) % 32 != 0:
        raise ValueError(f"N={n} x {qw.bits} bits does not fill whole int32 words (zero points pack along N)")
    if not qw.symmetric and (qw.zero_point is None or qw.zero_point.shape != qw.scale.shape):
        raise ValueError("asymmetric record needs a zero_point shaped like its scale")
    if not bool(torch.isfinite(qw.scale).all()) or not bool((qw.scale > 0).all()):
        raise UnstorableRecord("scales must be finite and positive")
    if qw.g_idx is not None and not torch.equal(qw.group_index().cpu(), torch.arange(k) // (k // n_groups)):
        raise ValueError(
            "record has an act-order column permutation (non-trivial g_idx): compressed-tensors 0.20 removed "
            "actorder 'group' (weight_g_idx); use --act-order static or --format gptq"
        )


def linear_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Local tensors of one Linear (`weight_packed`, `weight_scale`, `weight_shape`[, `weight_zero_point`])."""
    from compressed_tensors.compressors import BaseCompressor

    _validate(qw)
    if qw.bits not in ENGINE_BITS:
        warnings.warn(
            f"{qw.bits}-bit pack-quantized loads in transformers with compressed-tensors >= 0.20 only; "
            f"vLLM kernels support bits {ENGINE_BITS}",
            stacklevel=2,
        )
    offset = 2 ** (qw.bits - 1)
    scheme = _scheme(qw.bits, _record_group_size(qw), qw.symmetric, None)  # actorder does not change tensors
    state = {"weight": qw.dequantize(torch.float32), "weight_scale": qw.scale}
    if not qw.symmetric:
        # compressed-tensors convention: signed zero point = unsigned z - 2**(bits-1), kept in int8
        state["weight_zero_point"] = (qw.zero_point.to(torch.int32) - offset).to(torch.int8)
    compressor = BaseCompressor.get_value_from_registry(FORMAT)
    out = compressor.compress(state, scheme)
    tensors = {name: t.contiguous() for name, t in out.items()}
    if not torch.equal(unpack_bits(tensors["weight_packed"], qw.bits, qw.shape[1]), qw.q.to(torch.int32)):
        raise RuntimeError("compressed-tensors re-quantization did not reproduce the record's codes")
    return tensors


def quantization_config(
    bits: int, group_size: int | None, symmetric: bool, actorder: str | None, ignore: list[str]
) -> dict:
    """config.json `quantization_config` for a model whose quantized Linears all share one scheme."""
    from compressed_tensors.quantization import QuantizationConfig

    scheme = _scheme(bits, group_size, symmetric, actorder)
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=FORMAT,
        quantization_status="compressed",
        ignore=list(ignore),
    ).model_dump(mode="json")
    if config.get("moe_sparsity_config") is None:
        config.pop("moe_sparsity_config", None)  # new in 0.20; older loaders do not know the key
    return config


def unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Dense little-endian bit stream per row: int32 [R, W] -> unsigned codes int32 [R, length]."""
    rows, n_words = packed.shape
    if n_words * 32 < length * bits:
        raise ValueError(f"{n_words} words hold fewer than {length} codes of {bits} bits")
    if 32 % bits == 0:  # no code straddles a word: plain per-word fields
        return unpack_int32(packed, bits, dim=1)[:, :length]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    # one period = 32 codes in `bits` words; pad to whole periods
    periods = -(-n_words // bits)
    words = torch.nn.functional.pad(words, (0, periods * bits - n_words)).view(rows, periods, bits)
    words = torch.cat([words, torch.zeros_like(words[..., :1])], dim=-1)  # a spare word for straddling codes
    codes = torch.empty(rows, periods, 32, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        value = (words[..., word] >> shift) | (words[..., word + 1] << (32 - shift))
        codes[..., i] = (value & mask).to(torch.int32)
    return codes.view(rows, periods * 32)[:, :length]


def _config_bits(config: dict, tensors: dict[str, torch.Tensor]) -> int:
    """Bit width from the single config group, else from the packed width."""
    groups = [g for g in config.get("config_groups", {}).values() if isinstance(g, dict) and g.get("weights")]
    widths = {g["weights"]["num_bits"] for g in groups}
    if len(widths) == 1:
        return int(widths.pop())
    k = int(tensors["weight_shape"][1])
    return tensors["weight_packed"].shape[1] * 32 // k


def read_linear(tensors: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """Dequantized float32 [N, K] from one Linear's pack-quantized tensors (independent of the library)."""
    bits = _config_bits(config, tensors)
    n, k = (int(v) for v in tensors["weight_shape"])
    scale = tensors["weight_scale"].float()  # [N, n_groups]
    n_groups = scale.shape[1]
    q = unpack_bits(tensors["weight_packed"], bits, k)  # [N, K] unsigned
    if "weight_g_idx" in tensors:  # legacy act-order "group" checkpoints
        g = tensors["weight_g_idx"].long()
    else:
        g = torch.arange(k, device=q.device) // (k // n_groups)
    if "weight_zero_point" in tensors:
        zero = unpack_bits(tensors["weight_zero_point"].t(), bits, n).t().float()  # [N, n_groups] unsigned
        return (q.float() - zero[:, g]) * scale[:, g]
    return (q.float() - 2 ** (bits - 1)) * scale[:, g]
