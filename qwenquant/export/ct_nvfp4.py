"""compressed-tensors `nvfp4-pack-quantized` layout for NVFP4 records (quant/nvfp4.py), weight-only (NVFP4A16) or
with FP4 activations (NVFP4, W4A4), as vLLM loads it (Marlin FP4 weight-only from sm80, FP4 tensor cores on sm100+).

Per Linear:
- `weight_packed` uint8 [N, K/2]: two 4-bit E2M1 codes per byte, column 2j in the low nibble, 2j+1 in the high one;
  a code is bit 3 = sign, bits 0-2 = the index of the magnitude in (0, 0.5, 1, 1.5, 2, 3, 4, 6);
- `weight_scale` float8_e4m3fn [N, K/16]: one scale per 16 consecutive input features;
- `weight_global_scale` float32 [1]: g, which the readers *divide* by: w = e2m1 * (weight_scale / g);
- `input_global_scale` float32 [1] (W4A4 only): the static global scale of the Linear's input (group scales are
  computed per token at run time, `dynamic: local`).
config.json: one config group with compressed-tensors' own `NVFP4A16` / `NVFP4` preset arguments (strategy
`tensor_group`, group 16, type float, 4 bits), `format: nvfp4-pack-quantized`. Unlike the FP8 and INT groups, the
arguments keep `scale_dtype`/`zp_dtype` (float8_e4m3fn), as compressed-tensors 0.20 writes them: without
`scale_dtype` its activation quantization would not round the dynamic group scales to E4M3.

The tensors are written here (`linear_tensors`, tested against the library's compressor byte for byte);
`read_linear` is the spec reader, written from the description above (tested against the library's decompressor).
"""

from __future__ import annotations

import torch

from qwenquant.export.format_spec import UnstorableRecord
from qwenquant.quant.records import QuantizedWeight

FORMAT = "nvfp4-pack-quantized"
GROUP = 16
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 4-bit codes [N, K] (K even) -> uint8 [N, K/2], column 2j low nibble, 2j+1 high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"NVFP4 packs two codes per byte; {codes.shape[-1]} columns is odd")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 4-bit codes [N, K] (the inverse of `pack_codes`)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def linear_tensors(qw: QuantizedWeight, input_global_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One NVFP4 Linear's tensors (see the module docstring), from its record and, for W4A4, its input's global
    scale."""
    if qw.kind != "nvfp4":
        raise ValueError(f"nvfp4-pack-quantized stores NVFP4 weights, got kind {qw.kind!r}")
    n, k = qw.shape
    if tuple(qw.scale.shape) != (n, k // GROUP) or qw.global_scale is None:
        raise ValueError(f"NVFP4 record of shape {(n, k)} has scales {tuple(qw.scale.shape)}")
    g = qw.global_scale.float().reshape(1)
    if not bool(torch.isfinite(g).all() & (g > 0).all()) or not bool(torch.isfinite(qw.scale.float()).all()):
        raise UnstorableRecord("NVFP4 global and group scales must be finite and positive")
    out = {"weight_packed": pack_codes(qw.q).contiguous(), "weight_scale": qw.scale.to(torch.float8_e4m3fn),
           "weight_global_scale": g.clone()}
    if input_global_scale is not None:
        out["input_global_scale"] = input_global_scale.float().reshape(1).clone()
    return out


def scheme(activations: bool, targets: list[str] | None = None):
    """compressed-tensors' own NVFP4 (activations) or NVFP4A16 preset as a QuantizationScheme."""
    from compressed_tensors.quantization import preset_name_to_scheme  # imports transformers: lazy

    return preset_name_to_scheme("NVFP4" if activations else "NVFP4A16", targets or ["Linear"])


def quantization_config(activations: bool, ignore: list[str]) -> dict:
    """config.json `quantization_config`: one group targeting every quantized Linear."""
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig(config_groups={"group_0": scheme(activations)}, format=FORMAT,
                                quantization_status="compressed", ignore=list(ignore)).model_dump(mode="json")
    if config.get("moe_sparsity_config") is None:
        config.pop("moe_sparsity_config", None)  # new in 0.20; older loaders do not know the key
    return config


def tensor_bytes(activations: bool, n: int, k: int) -> dict[str, int]:
    out = {"weight_packed": n * k // 2, "weight_scale": n * (k // GROUP), "weight_global_scale": 4}
    return out | ({"input_global_scale": 4} if activations else {})


def check_linear(name: str, k: int) -> str | None:
    if k % GROUP:
        return f"{name}: {k} input features are not a multiple of {GROUP} (NVFP4 stores one scale per 16)"
    return None


def read_linear(tensors: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """Dequantized float32 [N, K] from one Linear's nvfp4-pack-quantized tensors, from the format description:
    nibbles (low first) -> E2M1 values, times weight_scale / weight_global_scale per group of 16 (float32)."""
    del config  # the layout has one variant
    packed = tensors["weight_packed"]
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2).long()  # [N, K]
    table = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32)
    values = table[codes]
    step = tensors["weight_scale"].float() / tensors["weight_global_scale"].float().reshape(1)  # [N, K/16]
    return values * step.repeat_interleave(GROUP, dim=1)


def record(tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    """The record of one Linear's tensors (for `qwenquant bench`)."""
    return QuantizedWeight(kind="nvfp4", q=unpack_codes(tensors["weight_packed"]), scale=tensors["weight_scale"],
                           granularity="group", bits=4, group_size=GROUP,
                           global_scale=tensors["weight_global_scale"].float().reshape(1))
