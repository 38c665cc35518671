"""compressed-tensors pack-quantized writer: layout, exact round trip, and agreement with the library's reader."""

from __future__ import annotations

import warnings

import pytest
import torch

from qwenquant.export import ct_packed
from qwenquant.quant.records import QuantizedWeight

N, K, G = 64, 256, 64


def make_record(
    bits: int = 4, symmetric: bool = True, group_size: int | None = G, n: int = N, k: int = K, seed: int = 0
) -> QuantizedWeight:
    """Random INT record: codes in range, positive bf16 scales, random unsigned zero points when asymmetric."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = k // group_size if group_size else 1
    q = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.int32)
    scale = (torch.rand(n, n_groups, generator=gen) * 0.05 + 1e-3).to(torch.bfloat16)
    zero = None if symmetric else torch.randint(0, 2**bits, (n, n_groups), generator=gen, dtype=torch.int32)
    return QuantizedWeight(
        kind="int",
        q=q,
        scale=scale,
        granularity="group" if group_size else "channel",
        bits=bits,
        symmetric=symmetric,
        zero_point=zero,
        group_size=group_size or k,
    )


def library_decompress(tensors: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """compressed-tensors' own reader, driven by the config we wrote."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(config["format"])
    return compressor.decompress(tensors, scheme)["weight"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [G, None])
def test_round_trip_is_exact(bits: int, symmetric: bool, group_size: int | None) -> None:
    qw = make_record(bits, symmetric, group_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3-bit engine-support warning
        tensors = ct_packed.linear_tensors(qw)
    config = ct_packed.quantization_config(bits, group_size, symmetric, None, ["lm_head"])
    n_groups = qw.scale.shape[1]

    expected = {"weight_packed", "weight_scale", "weight_shape"} | (set() if symmetric else {"weight_zero_point"})
    assert set(tensors) == expected
    assert tensors["weight_packed"].dtype == torch.int32
    assert tensors["weight_packed"].shape == (N, K * bits // 32)
    assert tensors["weight_scale"].dtype == torch.bfloat16
    assert tensors["weight_scale"].shape == (N, n_groups)
    assert tensors["weight_shape"].dtype == torch.int64
    assert tensors["weight_shape"].tolist() == [N, K]
    if not symmetric:
        assert tensors["weight_zero_point"].dtype == torch.int32
        assert tensors["weight_zero_point"].shape == (N * bits // 32, n_groups)

    assert torch.equal(ct_packed.read_linear(tensors, config), qw.dequantize())
    # the library dequantizes in the scale dtype (bf16): one rounding of the exact product
    assert torch.equal(library_decompress(tensors, config), qw.dequantize(torch.bfloat16))
    # with float32 scales its arithmetic is exact, like ours
    as_fp32 = {**tensors, "weight_scale": tensors["weight_scale"].float()}
    assert torch.equal(library_decompress(as_fp32, config), qw.dequantize())


def test_four_bit_nibbles_follow_formats_md() -> None:
    """Element i of each run of 8 along K at bits [4i, 4i+4); zero points the same along N; unsigned values."""
    qw = make_record(4, symmetric=False, n=8, k=32, group_size=32)
    qw.q[:] = torch.arange(32, dtype=torch.int32) % 16  # row: 0..15, 0..15
    qw.zero_point[:, 0] = torch.arange(1, 9, dtype=torch.int32)  # z = 1..8 down N
    tensors = ct_packed.linear_tensors(qw)
    words = tensors["weight_packed"][0].tolist()
    assert words == [0x76543210, 0xFEDCBA98 - 2**32, 0x76543210, 0xFEDCBA98 - 2**32]
    assert tensors["weight_zero_point"].tolist() == [[0x87654321 - 2**32]]


def test_three_bit_codes_straddle_words_and_warn() -> None:
    qw = make_record(3, n=32, k=32, group_size=32)
    qw.q[:] = 7  # all ones: 96 set bits over three words
    with pytest.warns(UserWarning, match="3-bit"):
        tensors = ct_packed.linear_tensors(qw)
    assert tensors["weight_packed"].shape == (32, 3)
    assert tensors["weight_packed"][0].tolist() == [-1, -1, -1]


def test_trivial_g_idx_is_accepted() -> None:
    qw = make_record()
    qw.g_idx = (torch.arange(K) // G).to(torch.int32)
    qw.actorder = "static"
    tensors = ct_packed.linear_tensors(qw)
    assert "weight_g_idx" not in tensors
    config = ct_packed.quantization_config(4, G, True, "static", [])
    assert torch.equal(ct_packed.read_linear(tensors, config), qw.dequantize())


def test_config_matches_formats_md_and_validates() -> None:
    from compressed_tensors.quantization import QuantizationConfig

    config = ct_packed.quantization_config(4, 128, False, "static", ["lm_head", "re:.*mlp.gate$"])
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed"
    assert config["ignore"] == ["lm_head", "re:.*mlp.gate$"]
    assert config["kv_cache_scheme"] is None
    assert "moe_sparsity_config" not in config
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["input_activations"] is None
    weights = group["weights"]
    assert weights == {
        "num_bits": 4,
        "type": "int",
        "symmetric": False,
        "group_size": 128,
        "strategy": "group",
        "dynamic": False,
        "actorder": "static",
    }  # no scale_dtype / zp_dtype: older loaders forbid them
    QuantizationConfig.model_validate(config)
    channel = ct_packed.quantization_config(8, None, True, None, [])["config_groups"]["group_0"]["weights"]
    assert channel["strategy"] == "channel" and channel["group_size"] is None and "actorder" not in channel


def test_act_order_group_is_refused() -> None:
    """compressed-tensors 0.20 removed actorder 'group' (weight_g_idx)."""
    with pytest.raises(ValueError, match="removed actorder 'group'"):
        ct_packed.quantization_config(4, G, True, "group", [])
    qw = make_record()
    qw.g_idx = (torch.randperm(K, generator=torch.Generator().manual_seed(1)) // G).to(torch.int32)
    qw.actorder = "group"
    with pytest.raises(ValueError, match="act-order"):
        ct_packed.linear_tensors(qw)


def test_library_rejects_act_order_group() -> None:
    """Pins the library behaviour the refusal above relies on."""
    from compressed_tensors.quantization import QuantizationArgs

    with pytest.raises(ValueError):
        QuantizationArgs(num_bits=4, strategy="group", group_size=G, actorder="group")


def test_impossible_layouts_raise() -> None:
    with pytest.raises(ValueError, match="divisible by group size"):
        ct_packed.linear_tensors(make_record(k=96, group_size=64))
    with pytest.raises(ValueError, match="bits"):
        ct_packed.linear_tensors(make_record(bits=5))
    with pytest.raises(ValueError, match="bits"):
        ct_packed.quantization_config(16, G, True, None, [])
    with pytest.raises(ValueError, match="zero points pack along N"):
        ct_packed.linear_tensors(make_record(symmetric=False, n=12))
    with pytest.raises(ValueError, match="whole int32 words"):
        ct_packed.linear_tensors(make_record(k=36, group_size=None))
    fp8 = make_record()
    fp8.kind = "fp8"
    with pytest.raises(ValueError, match="INT"):
        ct_packed.linear_tensors(fp8)
    bad_scale = make_record()
    bad_scale.scale[0, 0] = 0
    with pytest.raises(ValueError, match="positive"):
        ct_packed.linear_tensors(bad_scale)


def test_reader_accepts_legacy_g_idx() -> None:
    """Checkpoints written before 0.20 may carry weight_g_idx; the reader applies it."""
    qw = make_record()
    tensors = ct_packed.linear_tensors(qw)
    qw.g_idx = (torch.randperm(K, generator=torch.Generator().manual_seed(2)) // G).to(torch.int32)
    tensors["weight_g_idx"] = qw.g_idx
    config = ct_packed.quantization_config(4, G, True, None, [])
    assert torch.equal(ct_packed.read_linear(tensors, config), qw.dequantize())
