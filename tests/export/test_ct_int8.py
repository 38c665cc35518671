"""compressed-tensors int-quantized (INT8 W8A8) writer, config and spec reader against the library's own
compressor and decompressor, and the kernels' checkpoint reader."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwenquant.export import ct_int8
from qwenquant.export.format_spec import UnstorableRecord
from qwenquant.export.registry import FORMATS
from qwenquant.kernels.checkpoint_records import activation_scheme, record_from_tensors
from qwenquant.quant import int8 as int8q
from qwenquant.quant.intq import quantize_rtn


def _record(n: int = 64, k: int = 96, seed: int = 0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.03
    w[:, 5] *= 20  # an outlier column: the rows' scales differ widely
    w[3] = 0  # an all-zero row: smallest positive scale, codes 0
    return int8q.quantize_weight(w.to(dtype), dtype)


def library_decompress(tensors: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """compressed-tensors' own reader, driven by the config we wrote."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    return BaseCompressor.get_value_from_registry(config["format"]).decompress(tensors, scheme)["weight"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensors_are_the_librarys_and_read_back_exactly(dtype) -> None:
    qw = _record(dtype=dtype)
    tensors = ct_int8.linear_tensors(qw)
    assert list(tensors) == ["weight_scale", "weight"]
    assert tensors["weight"].dtype == torch.int8 and tensors["weight"].shape == (64, 96)
    assert tensors["weight_scale"].dtype == dtype and tensors["weight_scale"].shape == (64, 1)
    library = ct_int8.compressor_linear_tensors(qw)  # the library's compressor on the dequantized weight
    assert list(library) == list(tensors) and all(torch.equal(library[k], tensors[k]) for k in tensors)

    config = ct_int8.quantization_config(["lm_head"])
    assert config["format"] == "int-quantized" and config["ignore"] == ["lm_head"]
    group = config["config_groups"]["group_0"]
    assert {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
            "dynamic": False}.items() <= group["weights"].items()
    assert {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
            "dynamic": True}.items() <= group["input_activations"].items()
    # our spec reader and the library's decompressor agree with the record bit for bit
    assert torch.equal(ct_int8.read_linear(tensors, config), qw.dequantize())
    assert torch.equal(FORMATS["compressed-tensors"].read_linear(tensors, config, "x"), qw.dequantize())
    assert torch.equal(library_decompress(tensors, config), qw.dequantize(dtype))  # it computes in the scale dtype
    as_fp32 = {**tensors, "weight_scale": tensors["weight_scale"].float()}
    assert torch.equal(library_decompress(as_fp32, config), qw.dequantize())


def test_config_is_the_librarys_w8a8_preset() -> None:
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    ours = QuantizationConfig.model_validate(ct_int8.quantization_config([])).config_groups["group_0"]
    preset = preset_name_to_scheme("W8A8", ["Linear"])
    assert ours.weights == preset.weights and ours.input_activations == preset.input_activations


def test_kernel_reader_recovers_the_record() -> None:
    qw = _record()
    config = ct_int8.quantization_config(["lm_head"])
    back = record_from_tensors(ct_int8.linear_tensors(qw), config, "model.layers.0.mlp.up_proj")
    assert back.kind == "int8" and torch.equal(back.q, qw.q) and torch.equal(back.scale, qw.scale)
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert activation_scheme(config) == "token"


def test_refuses_what_it_cannot_store() -> None:
    with pytest.raises(ValueError, match="stores records of kind 'int8'"):
        ct_int8.linear_tensors(quantize_rtn(torch.randn(8, 32), 8, -1, True))
    bad = _record()
    with pytest.raises(UnstorableRecord, match="finite and positive"):
        ct_int8.linear_tensors(dataclasses.replace(bad, scale=bad.scale.clone().fill_(float("inf"))))
    with pytest.raises(ValueError, match="must be int8"):
        ct_int8.read_linear({"weight": torch.zeros(2, 8, dtype=torch.int32), "weight_scale": torch.ones(2, 1)}, {})
