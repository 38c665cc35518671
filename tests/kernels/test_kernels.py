"""Low-precision kernel modules (qwenquant/kernels) against float references: FP8 W8A8 `_scaled_mm` with row-wise
scales, FP8 weight-only, INT4 W4A16 on torch's int4 pack kernels (sym/asym, groups 32/64/128, channel-wise,
act-order), and the FP8 static KV cache. torch._scaled_mm and the int4 CPU kernels run on CPU, so every numeric
check runs here; CUDA-only checks are marked and skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import linear

from qwenquant.kernels import fp8_linear, int4_linear
from qwenquant.kernels.fp8_linear import FP8Linear
from qwenquant.kernels.int4_linear import Int4Linear
from qwenquant.kernels.kv_cache import FP8StaticLayer, dequantize_kv, kv_bytes_per_token, make_static_cache, quantize_kv
from qwenquant.quant.fp8 import fake_quantize_activation, quantize_fp8, static_input_scale
from qwenquant.quant.intq import quantize_rtn
from qwenquant.quant.records import QuantizedWeight

CPU = torch.device("cpu")


def _weight(n: int = 96, k: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 3] *= 8  # an outlier input channel
    return w


def _acts(m: int = 7, k: int = 256, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, m, k, generator=g) * 2).to(torch.bfloat16)


def _close_to_bf16_rounding(y: torch.Tensor, ref: torch.Tensor, rel: float = 2**-7) -> None:
    """y (bf16 output) equals ref up to bf16 rounding of the result and fp32 summation order."""
    err = (y.float() - ref).abs()
    bound = rel * ref.abs() + 1e-3 * ref.abs().max()
    assert bool((err <= bound).all()), f"max error {float(err.max()):.3g}, ref max {float(ref.abs().max()):.3g}"


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_scaled_mm_rowwise_matches_reference(granularity, static) -> None:
    w, x = _weight(), _acts()
    qw = quantize_fp8(w, granularity)
    input_scale = static_input_scale(x.float().abs().amax()) if static else None
    mod = FP8Linear(qw.q, qw.scale, "rowwise", input_scale=input_scale)
    y = mod(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 7, 96)
    # reference: the engine's activation rounding (qwenquant's simulation) times the dequantized weight, in fp32
    xq = fake_quantize_activation(x.float(), "tensor" if static else "token", input_scale)
    _close_to_bf16_rounding(y, linear(xq, qw.dequantize()))
    assert "row-wise" in mod.kernel_label and ("static" in mod.kernel_label) == static


def test_fp8_activation_codes_are_the_simulated_ones() -> None:
    """quantize_rows produces exactly the codes fake_quantize_activation rounds to (per token)."""
    x = _acts().reshape(-1, 256)
    q, scale = fp8_linear.quantize_rows(x)
    assert scale.shape == (14, 1) and scale.dtype == torch.float32
    assert torch.equal((q.float() * scale).to(torch.bfloat16), fake_quantize_activation(x, "token"))


def test_fp8_tensorwise_fallback_math() -> None:
    """The tensor-wise kernel path (unit scales, scales applied to the fp32 output) computes the same product."""
    w, x = _weight(), _acts()
    qw = quantize_fp8(w, "channel")
    try:
        y = FP8Linear(qw.q, qw.scale, "tensorwise")(x)
    except RuntimeError as err:
        pytest.skip(f"tensor-wise _scaled_mm unavailable on CPU in this torch ({err})")
    _close_to_bf16_rounding(y, linear(fake_quantize_activation(x.float(), "token"), qw.dequantize()))


def test_fp8_weight_only_equals_dequantized_bf16_linear() -> None:
    w, x = _weight(), _acts()
    qw = quantize_fp8(w, "channel")
    mod = FP8Linear(qw.q, qw.scale, "weight-only")
    assert mod.weight.dtype == torch.float8_e4m3fn  # fp8 stays in memory
    assert torch.equal(mod(x), linear(x, qw.dequantize(torch.bfloat16)))
    assert "weight-only" in mod.kernel_label


def test_scaled_mm_mode_on_cpu_is_rowwise() -> None:
    assert fp8_linear.scaled_mm_mode("cpu") == "rowwise"


def _act_order_record(w: torch.Tensor, group: int, symmetric: bool) -> QuantizedWeight:
    """A record whose groups follow a column permutation (GPTQ act-order 'group'), stored in original order."""
    k = w.shape[1]
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(3))
    qp = quantize_rtn(w[:, perm], 4, group, symmetric)
    q = torch.empty_like(qp.q)
    q[:, perm] = qp.q
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
    return QuantizedWeight(kind="int", q=q, scale=qp.scale, granularity="group", bits=4, symmetric=symmetric,
                           zero_point=qp.zero_point, group_size=group, g_idx=g_idx, actorder="group")


def _kernel_weight(qw: QuantizedWeight) -> torch.Tensor:
    """The weight the int4 kernel represents: (q - 8) * s + bf16((8 - z) * s), the zero term rounded to bf16."""
    g = qw.group_index()
    s, z = qw.scale.float()[:, g], qw.zero_point.float()[:, g]
    return (qw.q.float() - 8) * s + ((8 - z) * s).to(torch.bfloat16).float()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128, -1, "act-order"])
def test_int4_pack_mm_matches_dequantized(group, symmetric) -> None:
    w, x = _weight(), _acts()
    if group == "act-order":
        qw = _act_order_record(w, 64, symmetric)
    else:
        qw = quantize_rtn(w, 4, group, symmetric)
    mod = Int4Linear(qw, CPU)
    assert mod.weight_packed.numel() * mod.weight_packed.element_size() == 96 * 256 // 2  # 4 bits per weight
    kernel_w = _kernel_weight(qw)
    # symmetric: exactly our dequantized weight; asymmetric: the zero term (8 - z) * s rounded to bf16 (2**-8 relative)
    g = qw.group_index()
    slack = (8 - qw.zero_point.float()[:, g]).abs() * qw.scale.float()[:, g] * 2**-8
    assert bool(((kernel_w - qw.dequantize()).abs() <= slack).all())
    if symmetric:
        assert torch.equal(kernel_w, qw.dequantize())
    # the kernel computes x @ kernel_w^T in fp32 and rounds the output to bf16
    _close_to_bf16_rounding(mod(x), linear(x.float(), kernel_w), rel=2**-6)
    assert ("act-order" in mod.kernel_label) == (group == "act-order")
    assert ("asymmetric" in mod.kernel_label) == (not symmetric)


def test_int4_scales_and_zeros_convention() -> None:
    """Kernel dequantization (q - 8) * scale + zero equals ours (q - z) * s with zero = (8 - z) * s."""
    s = torch.tensor([[0.5, 0.25]])
    z = torch.tensor([[3, 8]])
    sz = int4_linear.scales_and_zeros(s, z)  # [n_groups, N, 2]
    assert sz.shape == (2, 1, 2) and sz.dtype == torch.bfloat16
    for q in range(16):
        for g in range(2):
            kernel = (q - 8) * float(sz[g, 0, 0]) + float(sz[g, 0, 1])
            assert kernel == (q - int(z[0, g])) * float(s[0, g])


def test_int4_unsupported_weights_name_the_reason() -> None:
    w = _weight()
    assert "8-bit" in int4_linear.unsupported_reason(quantize_rtn(w, 8, 128, True), CPU)
    assert int4_linear.unsupported_reason(quantize_rtn(w, 4, 16, True), CPU).startswith("group size 16")
    assert int4_linear.unsupported_reason(quantize_rtn(_weight(12, 256), 4, 128, True), CPU).startswith("shape")
    with pytest.raises(ValueError, match="int4 kernel"):
        Int4Linear(quantize_rtn(w, 3, 128, True), CPU)


@pytest.mark.gpu
def test_int4_cuda_kernel_matches_cpu_kernel() -> None:
    """CUDA packing (uint8, even column in the high nibble) + tinygemm give the CPU kernel's result."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tinygemm needs SM80+")
    w, x = _weight(), _acts()
    for sym in (True, False):
        qw = quantize_rtn(w, 4, 64, sym)
        ref = Int4Linear(qw, CPU)(x).float()
        y = Int4Linear(qw, torch.device("cuda"))(x.cuda()).float().cpu()
        assert float((y - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


@pytest.mark.gpu
def test_fp8_cuda_kernel_matches_reference() -> None:
    mode = fp8_linear.scaled_mm_mode("cuda")
    if mode is None:
        pytest.skip("this GPU has no FP8 matmul")
    w, x = _weight(), _acts()
    qw = quantize_fp8(w, "channel")
    y = FP8Linear(qw.q.cuda(), qw.scale.cuda(), mode)(x.cuda()).cpu()
    _close_to_bf16_rounding(y, linear(fake_quantize_activation(x.float(), "token"), qw.dequantize()))


def _kv(t: int, seed: int) -> torch.Tensor:
    return torch.randn(2, 3, t, 16, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_fp8_kv_cache_round_trip() -> None:
    layer = FP8StaticLayer(max_cache_len=12)
    k0, v0 = _kv(5, 0), _kv(5, 1) * 3
    keys, values = layer.update(k0, v0)
    assert layer.keys.dtype == torch.float8_e4m3fn and keys.dtype == torch.bfloat16 and keys.shape == (2, 3, 12, 16)
    assert float(layer.k_scale) == pytest.approx(float(k0.float().abs().amax()) / 448, rel=1e-6)  # from the prefill
    assert torch.equal(keys[:, :, :5], dequantize_kv(quantize_kv(k0, layer.k_scale), layer.k_scale, torch.bfloat16))
    assert float((values[:, :, :5].float() - v0.float()).abs().max()) <= float(v0.float().abs().max()) / 16
    k1, v1 = _kv(1, 2), _kv(1, 3)
    keys, values = layer.update(k1, v1)  # one decode step lands at position 5
    assert torch.equal(keys[:, :, 5:6], dequantize_kv(quantize_kv(k1, layer.k_scale), layer.k_scale, torch.bfloat16))
    assert not keys[:, :, 6:].any() and int(layer.get_seq_length()) == 6
    assert layer.keys.numel() * layer.keys.element_size() == 2 * 3 * 12 * 16  # one byte per element


def test_fp8_kv_cache_uses_calibrated_scales() -> None:
    from transformers import Qwen3Config

    config = Qwen3Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    cache = make_static_cache(config, 8, "fp8", {0: (0.5, 0.25)})
    assert isinstance(cache.layers[0], FP8StaticLayer) and cache.layers[0].calibrated
    assert not cache.layers[1].calibrated
    cache.layers[0].update(_kv(2, 0)[:, :2], _kv(2, 1)[:, :2])
    assert float(cache.layers[0].k_scale) == 0.5 and float(cache.layers[0].v_scale) == 0.25
    assert kv_bytes_per_token(config, "fp8") * 2 == kv_bytes_per_token(config, "bf16") == 2 * 2 * 2 * 32 * 2


def test_calibrated_kv_scales_are_read_from_the_checkpoint() -> None:
    from qwenquant.kernels.checkpoint_records import kv_cache_scales

    tensors = {"model.layers.3.self_attn.k_scale": torch.tensor([0.5]), "model.layers.3.self_attn.v_scale": torch.tensor([0.25]),
               "model.layers.3.self_attn.q_proj.weight": torch.zeros(1)}
    assert kv_cache_scales(tensors) == {3: (0.5, 0.25)}


def test_per_head_kv_scales_quantize_each_head_with_its_own_scale() -> None:
    """A per-head checkpoint (`--kv-cache fp8 --kv-cache-strategy head`: k_scale [H, 1, 1]) drives the bench cache:
    each head's codes are its values over its own scale."""
    from qwenquant.kernels.checkpoint_records import kv_cache_scales

    k_scale = torch.tensor([0.5, 0.01, 0.125]).reshape(3, 1, 1).to(torch.bfloat16)
    tensors = {"model.layers.0.self_attn.k_scale": k_scale, "model.layers.0.self_attn.v_scale": k_scale * 2}
    scales = kv_cache_scales(tensors)
    assert scales[0][0].shape == (3, 1, 1) and scales[0][0].dtype == torch.float32
    layer = FP8StaticLayer(8, *scales[0])
    k, v = _kv(4, 0), _kv(4, 1)
    keys, _ = layer.update(k, v)
    for h in range(3):
        s = float(k_scale[h])
        expected = (k[:, h].float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(layer.keys[:, h, :4], expected), h
        assert torch.equal(keys[:, h, :4], (expected.to(torch.bfloat16) * torch.tensor(s, dtype=torch.bfloat16)))
    assert keys.dtype == torch.bfloat16
