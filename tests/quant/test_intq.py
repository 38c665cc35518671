"""RTN integer grid against a float64 reference written from the equations in intq's docstring."""

from __future__ import annotations

import pytest
import torch

from qwenquant.quant.intq import compute_qparams, dequantize_codes, fake_quantize, quantize_codes, quantize_rtn


def reference_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype=torch.bfloat16):
    """float64 RTN: codes [N, K], dequantized [N, K], scale and zero [N, n_groups]."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    wg = w.double().reshape(n, k // g, g)
    qmax = 2**bits - 1
    if symmetric:
        scale = wg.abs().amax(-1) / (qmax / 2)
        scale = scale.to(scale_dtype).double()
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / qmax).to(scale_dtype).double()
        zero = torch.round(-lo / scale).clamp(0, qmax)
    q = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp(0, qmax)
    deq = (q - zero[..., None]) * scale[..., None]
    return q.reshape(n, k), deq.reshape(n, k), scale, zero


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_rtn_matches_float64_reference(symmetric: bool, bits: int, group_size: int) -> None:
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(24, 256) * 0.05
    w[:, 7] *= 8  # an outlier column
    qw = quantize_rtn(w, bits, group_size, symmetric)
    q_ref, deq_ref, scale_ref, zero_ref = reference_rtn(w, bits, group_size, symmetric)

    g = 256 if group_size == -1 else group_size
    assert qw.kind == "int" and qw.bits == bits and qw.group_size == g
    assert qw.granularity == ("channel" if group_size == -1 else "group")
    assert qw.q.dtype == torch.int32 and qw.scale.dtype == torch.bfloat16
    assert int(qw.q.min()) >= 0 and int(qw.q.max()) <= 2**bits - 1
    assert torch.equal(qw.scale.double(), scale_ref)
    assert torch.equal(qw.zero_point.double(), zero_ref)
    # float32 vs float64 division may disagree only at exact .5 ties: at most one code apart, very rarely
    diff = (qw.q.double() - q_ref).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert torch.allclose(qw.dequantize().double(), deq_ref, atol=float(scale_ref.max()) * 1.01)


def test_symmetric_scale_convention_and_zero_point() -> None:
    w = torch.tensor([[-1.5, 0.0, 0.75, 1.5]])
    scale, zero = compute_qparams(w, 4, True, scale_dtype=torch.float32)
    assert scale.item() == pytest.approx(1.5 / 7.5) and zero.item() == 8
    q = quantize_codes(w, scale, zero, 4)
    assert q.tolist() == [[0, 8, 12, 15]]  # -7.5 -> -8 (even), +7.5 -> 8 saturates at 7
    assert dequantize_codes(q, scale, zero)[0].tolist() == pytest.approx([-1.6, 0.0, 0.8, 1.4])


def test_asymmetric_range_contains_zero() -> None:
    w = torch.tensor([[0.5, 1.0, 2.0, 3.0]])  # all positive: min is taken as 0
    scale, zero = compute_qparams(w, 4, False, scale_dtype=torch.float32)
    assert scale.item() == pytest.approx(3.0 / 15) and zero.item() == 0
    assert fake_quantize(torch.zeros(1, 1), scale, zero, 4).item() == 0.0


def test_scale_rounded_before_codes_so_dequantization_is_exact() -> None:
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    qw = quantize_rtn(w, 4, 32, symmetric=False, scale_dtype=torch.float16)
    scale, zero = compute_qparams(w.view(8, 2, 32), 4, False, scale_dtype=torch.float16)
    assert torch.equal(qw.dequantize().view(8, 2, 32), fake_quantize(w.view(8, 2, 32), scale, zero, 4))
    assert qw.scale.dtype == torch.float16


def test_zero_group_gets_positive_scale() -> None:
    w = torch.zeros(4, 64)
    for symmetric in (True, False):
        qw = quantize_rtn(w, 4, 32, symmetric)
        assert (qw.scale.float() > 0).all()
        assert torch.equal(qw.dequantize(), w)


def test_clip_ratio_per_group_tensor() -> None:
    torch.manual_seed(2)
    w = torch.randn(4, 64)
    clip = torch.full((4, 2), 0.5)
    clip[:, 1] = 1.0
    qw = quantize_rtn(w, 4, 32, True, clip_ratio=clip)
    ref_half = quantize_rtn(w, 4, 32, True, clip_ratio=0.5)
    ref_full = quantize_rtn(w, 4, 32, True)
    assert torch.equal(qw.scale[:, 0], ref_half.scale[:, 0])
    assert torch.equal(qw.scale[:, 1], ref_full.scale[:, 1])
    with pytest.raises(ValueError, match="clip_ratio"):
        quantize_rtn(w, 4, 32, True, clip_ratio=torch.ones(4, 3))


def test_rtn_rejects_bad_inputs() -> None:
    w = torch.randn(4, 100)
    with pytest.raises(ValueError, match="not divisible by group_size"):
        quantize_rtn(w, 4, 32)
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(torch.randn(4, 64), 1, 32)
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(torch.randn(4, 64), 9, 32)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(torch.randn(64), 4, 32)
