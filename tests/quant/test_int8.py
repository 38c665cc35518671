"""INT8 W8A8 math (qwenquant.quant.int8) against float64 references, and SmoothQuant on a toy layer with outlier
input channels: smoothing must cut the INT8 output error clearly, and an alpha chosen per layer by the measured
INT8 error must do no worse than one global alpha."""

from __future__ import annotations

import pytest
import torch

from qwenquant.quant import int8 as int8q
from qwenquant.quant import scale_search as ss
from qwenquant.quant import smooth as sq
from qwenquant.quant.intq import quantize_rtn

OUTLIERS = [5, 77, 130, 200]


def _weight(n: int = 96, k: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


def toy_inputs(factors=(20.0, 50.0, 100.0, 30.0), t: int = 512, k: int = 256, seed: int = 1,
               outlier_tokens: int | None = None) -> torch.Tensor:
    """x [T, K] whose channels OUTLIERS are `factors` times larger than the rest (as LLM activations are), in every
    token or only in the first `outlier_tokens` (massive activations on a few tokens)."""
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(seed))
    x[:outlier_tokens, OUTLIERS] *= torch.tensor(factors)
    return x


def test_weight_grid_is_symmetric_per_channel_int8() -> None:
    w = _weight().to(torch.bfloat16)
    qw = int8q.quantize_weight(w, torch.bfloat16)
    assert qw.kind == "int8" and qw.bits == 8 and qw.symmetric and qw.granularity == "channel"
    assert qw.scale.shape == (96, 1) and qw.scale.dtype == torch.bfloat16
    codes = int8q.signed_codes(qw)
    assert codes.dtype == torch.int8 and int(codes.min()) >= -128 and int(codes.max()) <= 127
    # float64 reference: s = absmax / 127.5 rounded to bf16, codes = clamp(round(w / s), -128, 127)
    wd = w.double()
    s = (wd.abs().amax(dim=1, keepdim=True) / 127.5).to(torch.bfloat16).double()
    assert torch.equal(qw.scale.double(), s)
    assert torch.equal(codes.double(), torch.round(wd / s).clamp(-128, 127))
    assert torch.equal(qw.dequantize().double(), codes.double() * s)
    # the same values as intq's 8-bit per-channel symmetric grid (RTN / GPTQ records), relabelled
    assert torch.equal(qw.q, quantize_rtn(w.float(), 8, -1, True, scale_dtype=torch.bfloat16).q)


def test_as_int8_record_refuses_other_grids() -> None:
    w = _weight()
    for bad in (quantize_rtn(w, 8, 128, True), quantize_rtn(w, 8, -1, False), quantize_rtn(w, 4, -1, True)):
        with pytest.raises(ValueError, match="INT8 W8A8 needs 8-bit symmetric per-channel codes"):
            int8q.as_int8_record(bad)


def test_token_quantization_is_vllms_dynamic_int8() -> None:
    """Per row: s = absmax / 127, codes = round_half_even(x * (127 / absmax)) in [-128, 127]; zero rows -> 0."""
    x = (torch.randn(6, 64, generator=torch.Generator().manual_seed(2)) * 3).to(torch.bfloat16)
    x[2] = 0
    x[4, 7] = 1000.0  # one huge value: the rest of that row rounds coarsely, other rows are unaffected
    q, s = int8q.quantize_tokens(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (6, 1)
    xf = x.float()
    absmax = xf.abs().amax(dim=1, keepdim=True)
    assert torch.equal(s, absmax / 127)
    expected = torch.round(xf * torch.where(absmax > 0, 127 / absmax, torch.zeros_like(absmax))).clamp(-128, 127)
    assert torch.equal(q.float(), expected)
    assert int(q[2].abs().max()) == 0 and int(q.abs().max()) == 127  # the row max maps to +-127
    x_hat = int8q.fake_quantize_tokens(x.float())
    assert torch.equal(x_hat, q.float() * s)
    err = (x_hat - xf).abs()
    assert bool((err <= s / 2 + 1e-6 * absmax).all()), float((err / s.clamp(min=1e-30)).max())
    assert int8q.fake_quantize_tokens(x).dtype == torch.bfloat16


def _smoothed_error(x: torch.Tensor, w: torch.Tensor, alpha: float | None) -> float:
    """Relative W8A8 output error of one Linear after smoothing with `alpha` (None: no smoothing)."""
    if alpha is None:
        return int8q.output_error(x, w, int8q.quantize_weight(w, torch.float32).dequantize())
    s = sq.smoothing_factors(x.abs().amax(dim=0), [w], alpha)
    ws = w * s
    # the model computes (x / s) (w s)^T = x w^T: same reference, both sides quantized as the engine does
    ref = x @ w.T
    out = int8q.fake_quantize_tokens(x / s) @ int8q.quantize_weight(ws, torch.float32).dequantize().T
    return float((out - ref).pow(2).sum() / ref.pow(2).sum())


def test_smoothing_cuts_int8_error_on_outlier_channels() -> None:
    x, w = toy_inputs(), _weight(k=256)
    plain = _smoothed_error(x, w, None)
    smoothed = _smoothed_error(x, w, 0.5)
    print(f"INT8 W8A8 relative output error: no smoothing {plain:.3e}, alpha 0.5 {smoothed:.3e} "
          f"(ratio {smoothed / plain:.3f})")
    # measured: 1.2e-03 -> 5.3e-05 (ratio 0.044)
    assert smoothed / plain < 0.1
    # the loss comes from the outlier channels: without them INT8 per token loses far less
    calm = _smoothed_error(toy_inputs(factors=(1.0, 1.0, 1.0, 1.0)), w, None)
    print(f"without outlier channels: {calm:.3e}")  # measured: 9.9e-05
    assert calm < plain / 10


def test_per_layer_alpha_is_no_worse_than_one_global_alpha() -> None:
    """Two 'layers': outlier channels in 4 of 512 tokens (massive activations) and in every token. The alpha chosen
    per layer by measured INT8 error (what smooth.alpha_search does) sums to no more than the best single alpha
    for both, and clearly below the default alpha 0.5."""
    layers = [(toy_inputs((50.0, 100.0, 200.0, 80.0), seed=3, outlier_tokens=4), [_weight(seed=4)]),
              (toy_inputs((50.0, 100.0, 200.0, 80.0), seed=5), [_weight(seed=6), _weight(n=32, seed=7)])]
    grid = ss.ALPHA_GRID_FINE

    def errors(x, ws) -> list[float]:
        return ss.alpha_errors(x, ws, grid, lambda a: sq.smoothing_factors(x.abs().amax(dim=0), ws, a),
                               lambda w: int8q.quantize_weight(w, torch.float32).dequantize(),
                               lambda v, _s: int8q.fake_quantize_tokens(v))

    per_layer = [errors(x, ws) for x, ws in layers]
    chosen = [ss.search_alpha(grid, [e]) for e in per_layer]
    per_layer_total = sum(c.best_error for c in chosen)
    global_totals = [sum(e[i] for e in per_layer) for i in range(len(grid))]
    best_global = min(global_totals)
    at_default = global_totals[grid.index(0.5)]
    print(f"alphas per layer {[c.best for c in chosen]}: total error {per_layer_total:.4e}; best global alpha "
          f"{grid[global_totals.index(best_global)]}: {best_global:.4e}; alpha 0.5: {at_default:.4e}")
    # measured: alphas [0.35, 0.5]: 1.37e-04 vs the best global alpha (0.35) 1.52e-04 vs alpha 0.5 2.48e-04
    assert per_layer_total <= best_global * (1 + 1e-9)
    assert chosen[0].best != chosen[1].best  # the layers really want different strengths
    assert per_layer_total < 0.8 * at_default
