"""FP8 KV-cache scales (qwenquant/quant/kv_cache.py) and their simulation in a forward (qwenquant/kv_simulation.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwenquant.kv_simulation import KVObserver, kv_cache_quantization, kv_hooks
from qwenquant.quant.fp8 import FP8_MAX
from qwenquant.quant.kv_cache import fake_quantize_kv, kv_absmax, kv_relative_error, kv_scale


def _outlier_kv(factor: float) -> torch.Tensor:
    """K [2, 4, 256, 64]: four KV heads of scale 0.05, head 2 with a few entries `factor` x larger (outliers)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 256, 64, generator=g) * 0.05
    x[:, 2, ::17, 5] *= factor
    return x


@pytest.fixture(scope="module")
def outlier_kv() -> torch.Tensor:
    return _outlier_kv(10000.0)


def test_absmax_shapes_and_values(outlier_kv) -> None:
    per_tensor, per_head = kv_absmax(outlier_kv, "tensor"), kv_absmax(outlier_kv, "head")
    assert per_tensor.shape == (1,) and per_head.shape == (4, 1, 1)
    assert float(per_tensor) == float(outlier_kv.abs().max())
    assert torch.equal(per_head.flatten(), outlier_kv.abs().amax(dim=(0, 2, 3)))
    with pytest.raises(ValueError, match="strategy"):
        kv_absmax(outlier_kv, "channel")
    with pytest.raises(ValueError, match="kv_heads"):
        kv_absmax(outlier_kv[0], "head")


def _errors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative MSE per head under one per-tensor scale and under per-head scales."""
    s_tensor = kv_scale(kv_absmax(x, "tensor"), torch.float32)
    s_head = kv_scale(kv_absmax(x, "head"), torch.float32)
    return kv_relative_error(x, s_tensor), kv_relative_error(x, s_head)


def test_per_head_beats_per_tensor_on_heads_without_outliers(outlier_kv) -> None:
    """A head whose outliers are 1e4 x the other heads' values sets the per-tensor scale so high that the quiet heads'
    values fall into E4M3's subnormal range (below 2^-6 x scale), where the relative error grows; per-head scales keep
    each quiet head in the normal range. Head 2 itself gets the same scale either way."""
    err_tensor, err_head = _errors(outlier_kv)
    quiet = [0, 1, 3]
    print(f"relative MSE per head: per-tensor {err_tensor.tolist()}, per-head {err_head.tolist()}")
    # measured: per-tensor 1.32e-3 on every quiet head, per-head 0.69e-3 to 0.71e-3 (E4M3 ~ 3 mantissa bits)
    assert float(err_head[quiet].max()) < 1e-3, err_head
    assert float(err_tensor[quiet].min()) > 1.5 * float(err_head[quiet].max()), (err_tensor, err_head)
    assert abs(float(err_tensor[2]) - float(err_head[2])) <= 1e-6 + 0.01 * float(err_head[2])


def test_fp8_relative_error_barely_depends_on_the_scale_within_its_range() -> None:
    """A floating-point cache, unlike INT8: with outliers 60 x the other heads' values the quiet heads stay in the
    normal range, and per-tensor scales cost them at most a few percent of relative error (measured: 0.70e-3 vs
    0.69e-3 to 0.71e-3)."""
    err_tensor, err_head = _errors(_outlier_kv(60.0))
    print(f"60x outliers, relative MSE per head: per-tensor {err_tensor.tolist()}, per-head {err_head.tolist()}")
    assert torch.allclose(err_tensor, err_head, rtol=0.05), (err_tensor, err_head)


def test_fake_quantize_round_trip_and_saturation() -> None:
    s = kv_scale(torch.tensor([448.0 * 0.01]), torch.float32)  # s = 0.01
    assert float(s) == pytest.approx(0.01)
    x = torch.tensor([0.0, 0.01, -1.0, 4.48, 100.0]).reshape(1, 1, 5, 1)
    y = fake_quantize_kv(x, s).flatten()
    assert y[0] == 0 and float(y[1]) == pytest.approx(0.01, rel=1e-6)
    assert float(y[3]) == pytest.approx(4.48, rel=1e-6)  # 448 x s: the largest code
    assert float(y[4]) == pytest.approx(FP8_MAX * 0.01, rel=1e-6)  # beyond it: saturates
    # scales are stored in the model dtype: the rounded value is what the simulation uses
    assert kv_scale(torch.tensor([1.2345]), torch.bfloat16).dtype == torch.bfloat16


class _Attention(nn.Module):
    """The attention interface qwenquant hooks: K/V handed to `cache.update` before attention reads them."""

    def __init__(self):
        super().__init__()
        self.k = nn.Linear(8, 8, bias=False)

    def forward(self, x, cache=None):
        k = self.k(x).view(1, 2, -1, 4)  # [B, H, T, D]
        v = x.view(1, 2, -1, 4)
        if cache is not None:
            k, v = cache.update(k, v, 0)
        return (k.sum() + v.sum()).reshape(1)


def test_hooks_observe_and_quantize_what_the_cache_stores() -> None:
    torch.manual_seed(0)
    outer = nn.Module()
    outer.attn = _Attention()
    x = torch.randn(3, 8)
    plain = outer.attn(x)
    observer = KVObserver("head")
    with kv_hooks(outer, ["attn"], observer):
        assert torch.equal(outer.attn(x), plain)  # observing changes nothing
    k_abs, v_abs = observer.absmax["attn"]
    assert torch.equal(v_abs.flatten(), x.view(1, 2, -1, 4).abs().amax(dim=(0, 2, 3)))
    assert observer.tokens["attn"] == 3
    scales = {"attn": (kv_scale(k_abs), kv_scale(v_abs))}
    with kv_cache_quantization(outer, scales):
        quantized = outer.attn(x)
    k = outer.attn.k(x).view(1, 2, -1, 4)
    expected = fake_quantize_kv(k, scales["attn"][0]).sum() + fake_quantize_kv(x.view(1, 2, -1, 4), scales["attn"][1]).sum()
    assert torch.allclose(quantized, expected.reshape(1)) and not torch.equal(quantized, plain)
    assert not outer.attn._forward_pre_hooks  # removed after the block


def test_calibration_sets_scales_from_the_combined_absmax() -> None:
    """kv_calibration stores s = bf16(max|x| / 448) per head; in a distributed run the absmax is first combined over
    the ranks (here a stand-in rank whose V reached 100 on head 1)."""
    from qwenquant.kv_simulation import kv_calibration
    from qwenquant.state import QuantState

    torch.manual_seed(0)
    outer = nn.Module()
    outer.attn = _Attention()
    x = torch.randn(3, 8)
    state = QuantState()
    other_rank = torch.tensor([0.0, 100.0]).reshape(2, 1, 1)
    with kv_calibration(outer, "attn", "", "head", state, torch.bfloat16,
                        combine_max=lambda t: torch.maximum(t, other_rank)) as report:
        outer.attn(x)
    k_scale, v_scale = state.kv_scales["attn"]
    v_abs = x.view(1, 2, -1, 4).abs().amax(dim=(0, 2, 3))
    assert torch.equal(v_scale.flatten(), (torch.stack([v_abs[0], torch.tensor(100.0)]) / 448).to(torch.bfloat16))
    assert k_scale.shape == (2, 1, 1) and report["v_scale"] == v_scale.float().flatten().tolist()
    assert report["strategy"] == "head" and report["tokens"] == 3
