"""compressed-tensors `int-quantized` layout for INT8 W8A8 (records of kind "int8"), the layout vLLM's
compressed-tensors W8A8 INT8 path (`CompressedTensorsW8A8Int8`) loads.

Per Linear (local names, in this order):
- `weight_scale`: the model dtype, [N, 1] (strategy "channel");
- `weight`: int8 [N, K], the signed codes q_s = round(w / s) clamped to [-128, 127] (our unsigned record code
  minus 128), no zero point (symmetric).
w_hat = q_s * weight_scale. The config group holds the weight args (int, 8 bits, symmetric, channel, static) and the
input-activation args (int, 8 bits, symmetric, token, dynamic: the engine quantizes each token at run time, so
no input scale is stored). `read_linear` is written from this description, independent of the library; tests
check it and the written tensors against compressed-tensors' own compressor and decompressor.
"""

from __future__ import annotations

import json

import torch

from qwenquant.export.format_spec import UnstorableRecord
from qwenquant.quant import int8 as int8q
from qwenquant.quant.records import QuantizedWeight

FORMAT = "int-quantized"


def scheme(targets: list[str] | None = None):
    """The compressed-tensors QuantizationScheme of INT8 W8A8 (the library's "W8A8" / "INT8" preset's args)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # imports transformers: lazy

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=False, strategy="channel")
    acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=True, strategy="token")
    return QuantizationScheme(targets=targets or ["Linear"], weights=weights, input_activations=acts)


def linear_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One Linear's tensors: `weight_scale` (the record's scale, its dtype, [N, 1]) and `weight` (int8 codes)."""
    if qw.kind != int8q.KIND:
        raise ValueError(f"int-quantized (INT8 W8A8) stores records of kind {int8q.KIND!r}, got {qw.kind!r}")
    n, _k = qw.shape
    if tuple(qw.scale.shape) != (n, 1):
        raise ValueError(f"INT8 W8A8 needs one scale per output channel [{n}, 1], got {tuple(qw.scale.shape)}")
    if not bool(torch.isfinite(qw.scale).all()) or not bool((qw.scale > 0).all()):
        raise UnstorableRecord("INT8 weight scales must be finite and positive")
    return {"weight_scale": qw.scale, "weight": int8q.signed_codes(qw)}


def compressor_linear_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """What compressed-tensors' own `int-quantized` compressor writes for the record, given its dequantized weight
    and scale (the reference `linear_tensors` is tested against)."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(FORMAT)
    return dict(compressor.compress({"weight": qw.dequantize(torch.float32), "weight_scale": qw.scale}, scheme()))


def quantization_config(ignore: list[str]) -> dict:
    """config.json `quantization_config`: one group targeting every Linear, format int-quantized."""
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig(config_groups={"group_0": scheme()}, format=FORMAT,
                                quantization_status="compressed", ignore=list(ignore)).model_dump(mode="json")
    data = json.loads(json.dumps(config))
    for group in data["config_groups"].values():  # keys older loaders reject (as the FP8 writer drops them)
        for key in ("weights", "input_activations"):
            for legacy in ("scale_dtype", "zp_dtype"):
                group[key].pop(legacy, None)
    if data.get("moe_sparsity_config") is None:
        data.pop("moe_sparsity_config", None)  # new in 0.20; older loaders do not know the key
    return data


def tensor_bytes(n: int, k: int, dtype_bytes: int) -> dict[str, int]:
    return {"weight_scale": n * dtype_bytes, "weight": n * k}


def read_linear(tensors: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """Dequantized float32 [N, K] from one Linear's int-quantized tensors, from the format description:
    w = (weight - weight_zero_point) * weight_scale, the codes int8 [N, K], the scale per channel [N, 1] (or per
    tensor [1]), the zero point absent (symmetric) or shaped like the scale."""
    del config  # the tensors' shapes say everything the int-quantized layout can hold for W8A8
    q = tensors["weight"]
    if q.dtype != torch.int8:
        raise ValueError(f"int-quantized weight must be int8, got {q.dtype}")
    scale = tensors["weight_scale"].float()
    zero = tensors.get("weight_zero_point")
    codes = q.float() - (zero.float() if zero is not None else 0.0)
    return codes * scale
