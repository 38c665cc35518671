"""AWQ GEMM writer: interleaved layout, exact round trip, act-order refusal, error paths, gptqmodel agreement."""

from __future__ import annotations

import warnings

import pytest
import torch

from qwenquant.export import awq_gemm
from qwenquant.quant.records import QuantizedWeight

N, K, G = 64, 256, 64


def make_record(
    symmetric: bool = False, group_size: int | None = G, n: int = N, k: int = K, bits: int = 4, seed: int = 0
) -> QuantizedWeight:
    """Random INT record: codes in range, positive bf16 scales, zero points in [0, 2**bits - 1] when asymmetric."""
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


def as_uint32(words: torch.Tensor) -> list[int]:
    return [w & 0xFFFFFFFF for w in words.flatten().tolist()]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [G, None])
def test_round_trip_is_exact(symmetric: bool, group_size: int | None) -> None:
    qw = make_record(symmetric, group_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these bf16 scales convert to fp16 exactly
        tensors = awq_gemm.linear_tensors(qw)
    config = awq_gemm.quantization_config(4, group_size, symmetric, None, ["lm_head"])
    n_groups = qw.scale.shape[1]

    assert set(tensors) == {"qweight", "qzeros", "scales"}
    assert tensors["qweight"].dtype == torch.int32 and tensors["qweight"].shape == (K, N // 8)
    assert tensors["qzeros"].dtype == torch.int32 and tensors["qzeros"].shape == (n_groups, N // 8)
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (n_groups, N)
    assert torch.equal(awq_gemm.read_linear(tensors, config), qw.dequantize())


def test_interleaved_nibble_order() -> None:
    """Nibble i of word c holds column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    qw = make_record(n=16, k=32, group_size=32)
    qw.q[:] = torch.arange(16, dtype=torch.int32).unsqueeze(1)  # q[n, k] = n
    qw.zero_point[:, 0] = torch.arange(16, dtype=torch.int32)  # z[n] = n
    tensors = awq_gemm.linear_tensors(qw)
    assert as_uint32(tensors["qweight"][0]) == [0x75316420, 0xFDB9ECA8]
    assert as_uint32(tensors["qzeros"]) == [0x75316420, 0xFDB9ECA8]


def test_symmetric_exports_zero_point_eight() -> None:
    tensors = awq_gemm.linear_tensors(make_record(symmetric=True))
    assert set(as_uint32(tensors["qzeros"])) == {0x88888888}


def test_config_matches_formats_md() -> None:
    assert awq_gemm.quantization_config(4, 128, True, None, ["lm_head"]) == {
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
        "group_size": 128,
        "bits": 4,
        "modules_to_not_convert": None,
    }
    skipping = awq_gemm.quantization_config(4, None, False, "static", ["lm_head", "model.layers.3.mlp.down_proj"])
    assert skipping["modules_to_not_convert"] == ["model.layers.3.mlp.down_proj"]
    assert skipping["group_size"] == -1


def test_act_order_is_refused() -> None:
    qw = make_record()
    qw.g_idx = (torch.randperm(K, generator=torch.Generator().manual_seed(1)) // G).to(torch.int32)
    with pytest.raises(ValueError, match="AWQ format cannot store act-order"):
        awq_gemm.linear_tensors(qw)
    with pytest.raises(ValueError, match="AWQ format cannot store act-order"):
        awq_gemm.quantization_config(4, G, False, "group", [])


def test_trivial_g_idx_and_static_act_order_are_accepted() -> None:
    qw = make_record()
    qw.g_idx = (torch.arange(K) // G).to(torch.int32)
    qw.actorder = "static"
    tensors = awq_gemm.linear_tensors(qw)
    config = awq_gemm.quantization_config(4, G, False, "static", [])
    assert torch.equal(awq_gemm.read_linear(tensors, config), qw.dequantize())


def test_impossible_layouts_raise() -> None:
    with pytest.raises(ValueError, match=r"bits \(4,\)"):
        awq_gemm.linear_tensors(make_record(bits=8))
    with pytest.raises(ValueError, match=r"bits \(4,\)"):
        awq_gemm.quantization_config(3, G, False, None, [])
    with pytest.raises(ValueError, match="N=12"):
        awq_gemm.linear_tensors(make_record(n=12))
    with pytest.raises(ValueError, match="divisible by group size"):
        awq_gemm.linear_tensors(make_record(k=96, group_size=64))
    with pytest.raises(ValueError, match="regex"):
        awq_gemm.quantization_config(4, G, False, None, ["re:.*lm_head"])
    huge = make_record()
    huge.scale[0, 0] = 1e5
    with pytest.raises(ValueError, match="overflow float16"):
        awq_gemm.linear_tensors(huge)


def test_tiny_scales_warn() -> None:
    qw = make_record()
    qw.scale[1, 2] = 2.0e-7
    with pytest.warns(UserWarning, match="max weight deviation"):
        tensors = awq_gemm.linear_tensors(qw)
    deviation = (awq_gemm.read_linear(tensors, {}) - qw.dequantize()).abs().max()
    assert 0 < float(deviation) < 1e-6  # |q - z| <= 15 times half an fp16 subnormal step


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptqmodel_kernel_reads_our_tensors(symmetric: bool) -> None:
    """gptqmodel's reference torch AWQ kernel computes x @ w.T with our weights (identity input)."""
    pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    qw = make_record(symmetric)
    tensors = awq_gemm.linear_tensors(qw)
    layer = AwqTorchLinear(
        bits=4, group_size=G, sym=False, desc_act=False, in_features=K, out_features=N, register_buffers=True
    )
    for name, value in tensors.items():
        getattr(layer, name).data.copy_(value)
    layer.post_init()
    layer.eval()
    out = layer(torch.eye(K, dtype=torch.float16))  # [K, N] = w.T in fp16
    assert torch.equal(out, qw.dequantize(torch.float16).t())
