"""GPTQ v1 writer: layout, known bit patterns, exact round trip, fp16 scales, error paths, gptqmodel agreement."""

from __future__ import annotations

import warnings

import pytest
import torch

from qwenquant.export import gptq_v1
from qwenquant.quant.records import QuantizedWeight

N, K, G = 64, 256, 64


def make_record(
    bits: int = 4,
    symmetric: bool = True,
    group_size: int | None = G,
    act_order: bool = False,
    n: int = N,
    k: int = K,
    seed: int = 0,
) -> QuantizedWeight:
    """Random INT record; asymmetric zero points in [1, 2**bits - 1] (v1 cannot store 0)."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = k // group_size if group_size else 1
    q = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.int32)
    scale = (torch.rand(n, n_groups, generator=gen) * 0.05 + 1e-3).to(torch.bfloat16)
    zero = None if symmetric else torch.randint(1, 2**bits, (n, n_groups), generator=gen, dtype=torch.int32)
    g_idx = (torch.randperm(k, generator=gen) // (group_size or k)).to(torch.int32) if act_order else None
    return QuantizedWeight(
        kind="int",
        q=q,
        scale=scale,
        granularity="group" if group_size else "channel",
        bits=bits,
        symmetric=symmetric,
        zero_point=zero,
        group_size=group_size or k,
        g_idx=g_idx,
        actorder="group" if act_order else None,
    )


def as_uint32(words: torch.Tensor) -> list[int]:
    return [w & 0xFFFFFFFF for w in words.flatten().tolist()]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_round_trip_is_exact(bits: int, symmetric: bool, act_order: bool) -> None:
    qw = make_record(bits, symmetric, act_order=act_order)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these bf16 scales convert to fp16 exactly
        tensors = gptq_v1.linear_tensors(qw)
    config = gptq_v1.quantization_config(bits, G, symmetric, "group" if act_order else None, ["lm_head"])
    per_word = 32 // bits

    assert set(tensors) == {"qweight", "qzeros", "scales", "g_idx"}
    assert tensors["qweight"].dtype == torch.int32 and tensors["qweight"].shape == (K // per_word, N)
    assert tensors["qzeros"].dtype == torch.int32 and tensors["qzeros"].shape == (K // G, N // per_word)
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (K // G, N)
    assert tensors["g_idx"].dtype == torch.int32 and torch.equal(tensors["g_idx"], qw.group_index().int())
    assert torch.equal(gptq_v1.read_linear(tensors, config), qw.dequantize())


def test_channel_wise() -> None:
    qw = make_record(group_size=None)
    tensors = gptq_v1.linear_tensors(qw)
    config = gptq_v1.quantization_config(4, None, True, None, [])
    assert config["group_size"] == -1
    assert tensors["scales"].shape == (1, N) and tensors["qzeros"].shape == (1, N // 8)
    assert torch.equal(tensors["g_idx"], torch.zeros(K, dtype=torch.int32))
    assert torch.equal(gptq_v1.read_linear(tensors, config), qw.dequantize())


@pytest.mark.parametrize(("bits", "word"), [(2, 0x55555555), (4, 0x77777777), (8, 0x7F7F7F7F)])
def test_symmetric_qzeros_store_z_minus_one(bits: int, word: int) -> None:
    tensors = gptq_v1.linear_tensors(make_record(bits))
    assert set(as_uint32(tensors["qzeros"])) == {word}


def test_qweight_and_qzeros_bit_patterns() -> None:
    """Row k = 8i + j at bits 4j of qweight[i, n]; column 8c + j at bits 4j of qzeros; v1 stores z - 1."""
    qw = make_record(symmetric=False, n=8, k=32, group_size=32)
    qw.q[:] = torch.arange(32, dtype=torch.int32) % 16  # q[n, k] = k % 16
    qw.zero_point[:, 0] = torch.arange(1, 9, dtype=torch.int32)  # z = 1..8 along N
    tensors = gptq_v1.linear_tensors(qw)
    assert tensors["qweight"].shape == (4, 8)
    assert as_uint32(tensors["qweight"][:, 0]) == [0x76543210, 0xFEDCBA98, 0x76543210, 0xFEDCBA98]
    assert tensors["qweight"][1, 0].item() < 0  # bit 31 set: stored as a negative int32
    assert as_uint32(tensors["qzeros"]) == [0x76543210]


def test_config_and_desc_act() -> None:
    config = gptq_v1.quantization_config(4, 128, True, None, ["lm_head"])
    assert config == {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 128,
        "desc_act": False,
        "sym": True,
        "checkpoint_format": "gptq",
        "lm_head": False,
        "damp_percent": 0.01,
    }
    assert gptq_v1.quantization_config(4, 128, False, "group", [])["desc_act"] is True
    assert gptq_v1.quantization_config(4, 128, False, "static", [])["desc_act"] is True
    skipping = gptq_v1.quantization_config(4, 128, True, None, ["lm_head", "model.layers.0.mlp.down_proj", "re:.*gate$"])
    assert skipping["dynamic"] == {r"-:^model\.layers\.0\.mlp\.down_proj$": {}, "-:.*gate$": {}}


def test_fp16_scales_exact_across_bf16_range() -> None:
    """bf16 -> fp16 is lossless for every bf16 scale in [2**-17, 65504]: no warning, exact weights."""
    qw = make_record()
    exponents = torch.randint(-17, 15, qw.scale.shape, generator=torch.Generator().manual_seed(3))
    mantissas = torch.rand(qw.scale.shape, generator=torch.Generator().manual_seed(4)) + 1.0
    qw.scale = (mantissas * 2.0**exponents).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors = gptq_v1.linear_tensors(qw)
    assert torch.equal(gptq_v1.read_linear(tensors, gptq_v1.quantization_config(4, G, True, None, [])), qw.dequantize())


def test_tiny_scales_warn_with_deviation() -> None:
    qw = make_record()
    qw.scale[0, 0] = 3.1e-7  # fp16 subnormal: loses mantissa bits
    with pytest.warns(UserWarning, match="max weight deviation") as record:
        tensors = gptq_v1.linear_tensors(qw)
    deviation = float((gptq_v1.read_linear(tensors, gptq_v1.quantization_config(4, G, True, None, [])) - qw.dequantize()).abs().max())
    print(f"measured max deviation {deviation:.3g}; {record[0].message}")
    assert 0 < deviation < 1e-6  # |q - z| <= 8 times half an fp16 subnormal step
    assert f"{deviation:.3g}" in str(record[0].message)


def test_impossible_layouts_raise() -> None:
    with pytest.raises(ValueError, match=r"bits \(2, 4, 8\)"):
        gptq_v1.linear_tensors(make_record(bits=3))
    with pytest.raises(ValueError, match=r"bits \(2, 4, 8\)"):
        gptq_v1.quantization_config(3, G, True, None, [])
    with pytest.raises(ValueError, match="divisible by group size"):
        gptq_v1.linear_tensors(make_record(k=96, group_size=64))
    with pytest.raises(ValueError, match="N=12"):
        gptq_v1.linear_tensors(make_record(n=12))
    zero = make_record(symmetric=False)
    zero.zero_point[3, 1] = 0
    with pytest.raises(ValueError, match="zero point of 0"):
        gptq_v1.linear_tensors(zero)
    huge = make_record()
    huge.scale[0, 0] = 1e5
    with pytest.raises(ValueError, match="overflow float16"):
        gptq_v1.linear_tensors(huge)
    fp8 = make_record()
    fp8.kind = "fp8"
    with pytest.raises(ValueError, match="INT"):
        gptq_v1.linear_tensors(fp8)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptqmodel_kernel_reads_our_tensors(bits: int, symmetric: bool) -> None:
    """gptqmodel's torch GPTQ kernel, after its own v1 -> v2 qzeros conversion, dequantizes to our weights."""
    pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    qw = make_record(bits, symmetric, act_order=True)
    tensors = gptq_v1.linear_tensors(qw)
    layer = TorchLinear(
        bits=bits, group_size=G, sym=symmetric, desc_act=True, in_features=K, out_features=N, register_buffers=True
    )
    for name, value in tensors.items():
        getattr(layer, name).data.copy_(value)
    convert_gptq_v1_to_v2_format_module(layer, bits=bits, pack_dtype=torch.int32)
    layer.optimized = True  # skip torch.compile
    layer.post_init()
    layer.eval()
    assert torch.equal(layer.dequantize_weight(), qw.dequantize(torch.float16).t())
