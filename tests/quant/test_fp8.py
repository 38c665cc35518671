"""FP8 E4M3 weight and activation quantization against a float64 reference written from the equations in
qwenquant/quant/fp8.py and docs formats.md: scale = absmax / 448 per granule, rounded to bf16 *before* the codes
are computed; q = e4m3(clamp(w / scale, -448, 448)) with round-to-nearest-even; w_hat = q * scale.

The reference rounds to E4M3 with its own table of the 253 finite code values, not with torch's cast."""

from __future__ import annotations

import math

import pytest
import torch

from qwenquant.quant.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    compute_weight_scale,
    dequantize_fp8,
    fake_quantize_activation,
    quantize_fp8,
    static_input_scale,
    weight_error,
)

# All non-negative finite E4M3 values (codes 0x00..0x7E; 0x7F is NaN), ascending.
_CODES = torch.arange(0, 0x7F, dtype=torch.uint8)
_GRID = _CODES.view(FP8_DTYPE).double()


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round float64 values already clamped to [-448, 448] to the nearest E4M3 value, ties to the even code."""
    assert x.dtype == torch.float64
    a = x.abs().flatten()
    hi = torch.searchsorted(_GRID, a).clamp(max=len(_GRID) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - _GRID[lo], _GRID[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (_CODES[hi] % 2 == 0).to(torch.bool) & (hi != lo))
    r = torch.where(pick_hi, _GRID[hi], _GRID[lo])
    return (r * x.flatten().sign()).view(x.shape)


def test_reference_rounding_table() -> None:
    assert _GRID[-1] == 448.0 and FP8_MAX == 448.0
    # 1.0 and 1.125 are neighbours: 1.0625 ties to 1.0 (even mantissa), 1.1875 ties to 1.25
    assert e4m3_round(torch.tensor([1.0625, 1.1875, -1.0625, 1.07], dtype=torch.float64)).tolist() == [1.0, 1.25, -1.0, 1.125]
    # torch's own cast agrees on random values (sanity of the reference itself)
    x = (torch.randn(10000, dtype=torch.float64) * 50).clamp(-448, 448)
    assert torch.equal(e4m3_round(x), x.to(FP8_DTYPE).double())


def _expand(scale: torch.Tensor, shape, granularity: str, block: int) -> torch.Tensor:
    n, k = shape
    if granularity == "tensor":
        return scale.reshape(1, 1).expand(n, k)
    if granularity == "channel":
        return scale.reshape(n, 1).expand(n, k)
    rows = torch.arange(n) // block
    cols = torch.arange(k) // block
    return scale[rows][:, cols]


def reference_fp8(w: torch.Tensor, granularity: str, block: int = 128, clip: float = 1.0):
    """(codes as float64 [N,K], scale bf16 per granule, w_hat float64 [N,K])."""
    w = w.double()
    n, k = w.shape
    if granularity == "tensor":
        absmax = w.abs().max().reshape(1)
    elif granularity == "channel":
        absmax = w.abs().amax(1, keepdim=True)
    else:
        nb, kb = math.ceil(n / block), math.ceil(k / block)
        absmax = torch.zeros(nb, kb, dtype=torch.float64)
        for i in range(nb):
            for j in range(kb):
                absmax[i, j] = w[i * block:(i + 1) * block, j * block:(j + 1) * block].abs().max()
    scale = (absmax * clip / 448.0).clamp(min=1e-12).to(torch.bfloat16)  # rounded once, from float64
    full = _expand(scale.double(), (n, k), granularity, block)
    q = e4m3_round((w / full).clamp(-448.0, 448.0))
    return q, scale, q * full


def _bf16_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Weights as a model stores them (bf16 values), with a few outlier columns and a small-magnitude row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.03
    w[:, torch.randperm(k, generator=g)[:3]] *= 20
    w[1] *= 1e-3
    return w.to(torch.bfloat16)


GRANULARITY_SHAPES = [
    ("tensor", (256, 384), 128),
    ("tensor", (300, 200), 128),
    ("channel", (256, 384), 128),
    ("channel", (300, 200), 128),
    ("block", (256, 384), 128),  # divides 128
    ("block", (300, 200), 128),  # does not: partial blocks on both edges
    ("block", (130, 129), 128),  # one-row / one-column partial blocks
    ("block", (192, 160), 64),
]


@pytest.mark.parametrize("granularity,shape,block", GRANULARITY_SHAPES)
def test_quantize_matches_float64_reference(granularity: str, shape, block: int) -> None:
    w = _bf16_weight(*shape, seed=shape[0] + shape[1] + block)
    qw = quantize_fp8(w, granularity, block)
    q_ref, scale_ref, deq_ref = reference_fp8(w, granularity, block)

    expected_scale_shape = {"tensor": (1,), "channel": (shape[0], 1),
                            "block": (math.ceil(shape[0] / block), math.ceil(shape[1] / block))}[granularity]
    assert qw.q.dtype == FP8_DTYPE and tuple(qw.q.shape) == shape
    assert qw.scale.dtype == torch.bfloat16 and tuple(qw.scale.shape) == expected_scale_shape
    assert torch.equal(qw.scale, scale_ref)
    assert torch.equal(qw.q.double(), q_ref)
    assert torch.equal(qw.dequantize(torch.float64), deq_ref)
    assert torch.equal(dequantize_fp8(qw.q, qw.scale, granularity, block).double(), deq_ref)
    assert qw.block_size == (block if granularity == "block" else None)
    # bounded error: E4M3 has 3 mantissa bits, so each element is within half a step (1/16 relative) + subnormals
    assert weight_error(w.float(), qw) < 0.04


def test_scale_is_rounded_before_codes() -> None:
    """Codes come from the bf16-rounded scale, so q * scale(bf16) is what an engine computes from the file."""
    w = torch.tensor([[1.0, 0.3, -0.7], [447.0 * 0.00123, 0.2, 0.1]], dtype=torch.float32)
    qw = quantize_fp8(w, "channel")
    exact_scale = w.double().abs().amax(1, keepdim=True) / 448.0
    assert not torch.equal(qw.scale.double(), exact_scale)  # bf16 rounding changed the scale ...
    codes_with_rounded = e4m3_round((w.double() / qw.scale.double()).clamp(-448, 448))
    assert torch.equal(qw.q.double(), codes_with_rounded)  # ... and the codes used the rounded one


def test_scale_rounding_down_saturates_not_nan() -> None:
    """When bf16 rounds absmax/448 *down*, absmax/scale exceeds 448: the code must saturate to 448, never NaN."""
    found = None
    for m in range(1, 4000):  # find an absmax whose scale rounds down in bf16
        a = 1.0 + m / 4096.0
        if float(torch.tensor(a / 448.0, dtype=torch.float64).to(torch.bfloat16)) < a / 448.0:
            a_bf16 = float(torch.tensor(a).to(torch.bfloat16))
            if float(torch.tensor(a_bf16 / 448.0, dtype=torch.float64).to(torch.bfloat16)) < a_bf16 / 448.0:
                found = a_bf16
                break
    assert found is not None
    w = torch.tensor([[found, -found, 0.5]], dtype=torch.bfloat16)
    for gran in ("tensor", "channel", "block"):
        qw = quantize_fp8(w, gran)
        assert float(w.double().abs().max() / qw.scale.double().max()) > 448.0
        q = qw.q.double()
        assert not torch.isnan(q).any()
        assert q[0, 0] == 448.0 and q[0, 1] == -448.0


def test_clip_ratio_saturates_large_values() -> None:
    w = torch.linspace(-2.0, 2.0, 64).reshape(2, 32)
    qw = quantize_fp8(w, "channel", clip_ratio=0.5)
    q_ref, scale_ref, deq_ref = reference_fp8(w, "channel", clip=0.5)
    assert torch.equal(qw.scale, scale_ref) and torch.equal(qw.q.double(), q_ref)
    q = qw.q.double()
    assert not torch.isnan(q).any()
    assert (q.abs() == 448.0).sum() > 10  # everything beyond half the range saturated
    assert float(qw.dequantize().abs().max()) == pytest.approx(1.0, rel=1 / 64)


def test_given_scale_clamps_out_of_range() -> None:
    w = torch.tensor([[1000.0, -5.0, 0.25]])
    qw = quantize_fp8(w, "tensor", scale=torch.tensor([1.0], dtype=torch.bfloat16))
    assert qw.q.double().tolist() == [[448.0, -5.0, 0.25]]


def test_zero_weight_has_no_nan() -> None:
    w = torch.zeros(4, 8)
    w[0, 0] = 1.0
    for gran in ("tensor", "channel", "block"):
        qw = quantize_fp8(w, gran)
        assert not torch.isnan(qw.q.float()).any() and not torch.isnan(qw.dequantize()).any()
        assert (qw.scale.float() > 0).all()
        assert torch.equal(qw.dequantize()[1:], torch.zeros(3, 8))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="granularity"):
        compute_weight_scale(torch.ones(2, 2), "row")
    with pytest.raises(ValueError, match="2-D"):
        compute_weight_scale(torch.ones(2, 2, 2), "channel")


def test_scale_dtype_follows_model_dtype() -> None:
    w = _bf16_weight(16, 32, seed=3).float()
    qw = quantize_fp8(w, "channel", scale_dtype=torch.float16)
    assert qw.scale.dtype == torch.float16
    full = qw.scale.double()
    assert torch.equal(qw.q.double(), e4m3_round((w.double() / full).clamp(-448, 448)))


# ---- activations -------------------------------------------------------------------------------------------------


def _activations(seed: int, shape=(3, 16, 256)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 5] *= 40  # an outlier channel
    x[0, 3] *= 1e-3  # a quiet token
    return x.to(torch.bfloat16).float()


def reference_activation(x: torch.Tensor, mode: str, input_scale=None, group: int = 128) -> torch.Tensor:
    """Fake quantization as engines do it: dynamic scales are float32 (absmax/448, not rounded to bf16) and x / scale
    is a float32 division (a float64 division would round a handful of near-ties the other way); the E4M3 rounding
    and the dequantization product are the reference's own, in float64."""
    xf = x.float()
    if mode == "token":
        scale = (xf.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1e-12)
    elif mode == "group":
        xf = xf.unflatten(-1, (x.shape[-1] // group, group))
        scale = (xf.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1e-12)
    else:
        scale = input_scale.float()
    out = e4m3_round((xf / scale).double().clamp(-448, 448)) * scale.double()
    return out.flatten(-2) if mode == "group" else out


@pytest.mark.parametrize("mode", ["token", "group"])
def test_dynamic_activation_matches_reference(mode: str) -> None:
    x = _activations(1)
    out = fake_quantize_activation(x, mode, group_size=128)
    ref = reference_activation(x, mode)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
    # each token (or group) maps its own absmax to exactly 448 * scale
    amax = x.abs().amax(-1) if mode == "token" else x.unflatten(-1, (2, 128)).abs().amax(-1)
    out_amax = out.abs().amax(-1) if mode == "token" else out.unflatten(-1, (2, 128)).abs().amax(-1)
    torch.testing.assert_close(out_amax, amax, rtol=1e-6, atol=0)


def test_group_mode_is_finer_than_token_mode() -> None:
    """With an outlier in group 0, group-128 scaling keeps group 1 more precise than per-token scaling."""
    x = _activations(2)
    err_tok = (fake_quantize_activation(x, "token") - x)[..., 128:].norm()
    err_grp = (fake_quantize_activation(x, "group") - x)[..., 128:].norm()
    assert err_grp < err_tok


def test_group_mode_rejects_non_divisible_width() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        fake_quantize_activation(torch.randn(2, 200), "group", group_size=128)


def test_static_tensor_activation_matches_reference_and_saturates() -> None:
    x = _activations(3)
    calib_absmax = x.abs().amax() * 0.5  # calibration saw only half the range: the rest must saturate
    scale = static_input_scale(calib_absmax)
    assert scale.dtype == torch.bfloat16 and scale.shape == (1,)
    assert torch.equal(scale, (calib_absmax.double() / 448.0).reshape(1).to(torch.bfloat16))
    out = fake_quantize_activation(x, "tensor", input_scale=scale)
    ref = reference_activation(x, "tensor", input_scale=scale)
    assert torch.equal(out.double(), ref)
    assert not torch.isnan(out).any()
    assert float(out.abs().max()) == pytest.approx(448.0 * float(scale), rel=1e-6)
    with pytest.raises(ValueError, match="input_scale"):
        fake_quantize_activation(x, "tensor")
    with pytest.raises(ValueError, match="mode"):
        fake_quantize_activation(x, "channel")


def test_activation_keeps_dtype_bf16() -> None:
    x = _activations(4).to(torch.bfloat16)
    for mode in ("token", "group"):
        out = fake_quantize_activation(x, mode)
        assert out.dtype == torch.bfloat16
        # every dequantized value is representable in bf16 (q has 4 significant bits, scale float32 -> rounded once)
        torch.testing.assert_close(out.double(), reference_activation(x.float(), mode), rtol=2**-8, atol=0)
