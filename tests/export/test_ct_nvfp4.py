"""compressed-tensors nvfp4-pack-quantized: our tensors are what the library's compressor writes, and our spec reader
reads what its decompressor reads."""

from __future__ import annotations

import pytest
import torch

from qwenquant.export import ct_nvfp4
from qwenquant.quant import nvfp4


def _weight(seed: int, n: int = 48, k: int = 128) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.03
    w[1, 5] = 0.4  # an outlier (global scale) and an all-zero group
    w[2, 16:32] = 0.0
    return w.to(torch.bfloat16)


def test_pack_round_trip_and_nibble_order() -> None:
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = ct_nvfp4.pack_codes(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(ct_nvfp4.unpack_codes(packed), codes)
    assert ct_nvfp4.pack_codes(torch.tensor([[0x3, 0xA]], dtype=torch.uint8)).item() == 0xA3  # column 0 low nibble
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 256)
    assert torch.equal(ct_nvfp4.pack_codes(ct_nvfp4.unpack_codes(every)), every)


@pytest.mark.parametrize("activations", [False, True])
def test_tensors_equal_compressed_tensors_compressor(activations: bool) -> None:
    """The library quantizes the source weight with our scales and packs it: byte for byte our tensors."""
    from compressed_tensors.compressors import BaseCompressor

    w = _weight(0)
    qw = nvfp4.quantize_nvfp4(w)
    g_in = nvfp4.global_scale(3.0) if activations else None
    ours = ct_nvfp4.linear_tensors(qw, g_in)
    scheme = ct_nvfp4.scheme(activations)
    compressor = BaseCompressor.get_value_from_registry(ct_nvfp4.FORMAT)
    theirs = compressor.compress({"weight": w, "weight_scale": qw.scale.to(torch.bfloat16),
                                  "weight_global_scale": qw.global_scale}, scheme)
    assert torch.equal(ours["weight_packed"], theirs["weight_packed"])
    assert theirs["weight_scale"].dtype == ours["weight_scale"].dtype == torch.float8_e4m3fn
    assert torch.equal(ours["weight_scale"].view(torch.uint8), theirs["weight_scale"].view(torch.uint8))
    assert torch.equal(ours["weight_global_scale"], theirs["weight_global_scale"])
    assert ours["weight_global_scale"].dtype == torch.float32 and ours["weight_global_scale"].shape == (1,)
    expected = {"weight_packed", "weight_scale", "weight_global_scale"} | ({"input_global_scale"} if activations else set())
    assert set(ours) == expected
    if activations:
        assert ours["input_global_scale"].dtype == torch.float32 and torch.equal(ours["input_global_scale"], g_in)


def test_spec_reader_equals_decompressor_and_record() -> None:
    from compressed_tensors.compressors import BaseCompressor

    w = _weight(1)
    qw = nvfp4.quantize_nvfp4(w)
    tensors = ct_nvfp4.linear_tensors(qw, None)
    ours = ct_nvfp4.read_linear(tensors, ct_nvfp4.quantization_config(False, []))
    assert torch.equal(ours, qw.dequantize())  # float32, exactly the record
    compressor = BaseCompressor.get_value_from_registry(ct_nvfp4.FORMAT)
    theirs = compressor.decompress(dict(tensors), ct_nvfp4.scheme(False))["weight"]
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(ours.to(torch.bfloat16), theirs)
    record = ct_nvfp4.record(tensors)
    assert torch.equal(record.dequantize(), ours)


def test_quantization_config_is_the_library_preset() -> None:
    from compressed_tensors.quantization import QuantizationConfig

    for acts in (False, True):
        cfg = ct_nvfp4.quantization_config(acts, ["lm_head"])
        assert cfg["format"] == "nvfp4-pack-quantized" and cfg["quant_method"] == "compressed-tensors"
        group = cfg["config_groups"]["group_0"]
        w = group["weights"]
        assert (w["num_bits"], w["type"], w["strategy"], w["group_size"]) == (4, "float", "tensor_group", 16)
        assert "scale_dtype" in w  # kept: without it the library would not round dynamic group scales to E4M3
        a = group["input_activations"]
        assert (a is not None) == acts
        if acts:
            assert a["dynamic"] == "local" and a["group_size"] == 16
        parsed = QuantizationConfig.model_validate(cfg)
        assert parsed.config_groups["group_0"].weights.group_size == 16


def test_refuses_other_records_and_odd_shapes() -> None:
    from qwenquant.quant.intq import quantize_rtn

    with pytest.raises(ValueError, match="NVFP4"):
        ct_nvfp4.linear_tensors(quantize_rtn(torch.randn(8, 32), 4, 16), None)
    assert "not a multiple of 16" in ct_nvfp4.check_linear("x.down_proj", 40)
    assert ct_nvfp4.check_linear("x.down_proj", 48) is None
