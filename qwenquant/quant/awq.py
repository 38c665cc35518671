"""AWQ (Lin et al., 2023): activation-aware per-channel weight scaling and clipping, as pure tensor functions.

Scaling: for inputs x [T, K] feeding weights W_i [N_i, K], y_i = (x / s) (W_i * s)^T for any s > 0. With
s = mean|x|^alpha (normalised by sqrt(max(s) min(s))), salient input channels get a finer grid after
quantization; alpha is grid-searched to minimise || f(Q(W s) / s) - f(W) ||^2 on calibration inputs
(alpha = 0, s = 1, is plain RTN, so the search never loses to RTN on that data).
Clipping: per output channel and group, pick the range shrink r minimising || x_g (Q_r(w_g) - w_g)^T ||^2.
Search returns records; folding s into the previous op and quantizing is left to the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qwenquant.quant.intq import compute_qparams, fake_quantize, quantize_rtn, resolve_group_size
from qwenquant.quant.errors import NonFiniteError
from qwenquant.quant.records import QuantizedWeight

MIN_ACT_SCALE = 1e-4


@dataclass
class AWQScaleResult:
    """Outcome of the scale search: per-input-channel factors s [K], the chosen alpha, error per grid alpha."""

    scales: torch.Tensor  # [K] float32, weights are multiplied by it, inputs divided
    ratio: float  # chosen alpha
    errors: list[float] = field(default_factory=list)  # mean squared output error per grid point
    grid: list[float] = field(default_factory=list)  # alphas tried, same order as errors


def activation_scale_stats(x: torch.Tensor) -> torch.Tensor:
    """Mean |x| per input channel: x [..., K] -> [K] float32."""
    return x.reshape(-1, x.shape[-1]).float().abs().mean(dim=0)


def scales_for_ratio(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha / sqrt(max * min), so the factors straddle 1 (alpha = 0 gives s = 1)."""
    s = act_mean.float().clamp(min=MIN_ACT_SCALE).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def fake_quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Q(w) in float32 on the RTN grid of w [N, K]."""
    return quantize_rtn(w, bits, group_size, symmetric, 1.0, scale_dtype).dequantize()


def _concat_outputs(x: torch.Tensor) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Default block function: the balance layers' outputs x W_i^T, concatenated -> [T, sum N_i]."""
    return lambda weights: torch.cat([x @ w.T for w in weights], dim=-1)


def alpha_grid(n_grid: int) -> list[float]:
    """The scale search's exponents {0, 1/n_grid, ..., (n_grid-1)/n_grid}."""
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1, got {n_grid}")
    return [i / n_grid for i in range(n_grid)]


@torch.no_grad()
def scale_errors(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    alphas: list[float],
    forward: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> list[float]:
    """Mean squared output error || f(Q(W_i s) / s) - f(W) ||^2 / numel for s = `scales_for_ratio`(mean|x|, alpha),
    one per alpha of `alphas` (each independent of the others: a distributed run splits the grid over ranks).

    x [T, K] is the input shared by `weights` [N_i, K]. `forward` maps weights (in the original input basis,
    i.e. Q(W_i s) / s) to the output whose error is measured; default: the layers' concatenated outputs.
    """
    if x.dim() != 2:
        raise ValueError(f"expected calibration inputs [T, K], got shape {tuple(x.shape)}")
    if not weights:
        raise ValueError("AWQ scale search needs at least one balance weight")
    k = x.shape[1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"balance weight of shape {tuple(w.shape)} does not take {k} input channels")
    if not torch.isfinite(x).all():
        raise NonFiniteError("AWQ: calibration inputs contain NaN or Inf values")
    x = x.float()
    weights = [w.float() for w in weights]
    f = forward if forward is not None else _concat_outputs(x)
    act_mean = activation_scale_stats(x)  # [K]
    reference = f(weights).float()
    errors: list[float] = []
    for alpha in alphas:
        s = scales_for_ratio(act_mean, alpha)  # [K]
        # W_i s -> Q -> / s: the effective weight seen by the original x
        q_weights = [fake_quantize_rtn(w * s, bits, group_size, symmetric, scale_dtype) / s for w in weights]
        errors.append(float((f(q_weights).float() - reference).pow(2).mean()))
    return errors


def best_scale(x: torch.Tensor, grid: list[float], errors: list[float]) -> AWQScaleResult:
    """The grid's first alpha with the smallest error (none below inf, e.g. all NaN: alpha 0, s = 1) and its s [K]."""
    best_err, best_alpha = float("inf"), None
    for alpha, err in zip(grid, errors):
        if err < best_err:
            best_err, best_alpha = err, alpha
    act_mean = activation_scale_stats(x.float())
    s = scales_for_ratio(act_mean, best_alpha) if best_alpha is not None else torch.ones_like(act_mean)
    return AWQScaleResult(scales=s, ratio=best_alpha or 0.0, errors=list(errors), grid=list(grid))


def search_scales(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    forward: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    n_grid: int = 20,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> AWQScaleResult:
    """Grid-search alpha in `alpha_grid(n_grid)` for s = mean|x|^alpha (normalised): `scale_errors` of every alpha,
    then `best_scale`. x [T, K], weights [N_i, K], `forward` as in `scale_errors`."""
    grid = alpha_grid(n_grid)
    return best_scale(x, grid, scale_errors(x, weights, grid, forward, bits, group_size, symmetric, scale_dtype))


def clip_grid(max_shrink: float = 0.5, n_grid: int = 20) -> list[float]:
    """Clip ratios 1, 1 - 1/n_grid, ..., down to 1 - max_shrink (1.0 first: no clipping is always a candidate)."""
    if not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink}")
    return [1.0 - i / n_grid for i in range(int(round(max_shrink * n_grid)) + 1)]


@torch.no_grad()
def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    max_shrink: float = 0.5,
    n_grid: int = 20,
    n_sample_tokens: int = 512,
    batch_size: int = 64,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Clip ratio [N, n_groups] minimising each group's output error sum_t (x_tg . (Q_r(w_g) - w_g))^2.

    w [N, K] and x [T, K] as the layer sees them (after AWQ scaling); tokens are subsampled evenly to
    `n_sample_tokens`, output channels processed `batch_size` at a time to bound memory.
    """
    if w.dim() != 2 or x.dim() != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"search_clip needs w [N, K] and x [T, K], got {tuple(w.shape)} and {tuple(x.shape)}")
    n, k = w.shape
    gs = resolve_group_size(k, group_size)
    n_groups = k // gs
    ratios = clip_grid(max_shrink, n_grid)
    step = max(1, x.shape[0] // n_sample_tokens)
    # x [T, K] -> [T', n_group, G]
    xg = x[::step].float().view(-1, n_groups, gs)
    best_ratio = torch.ones(n, n_groups, dtype=torch.float32, device=w.device)
    for r0 in range(0, n, batch_size):
        # w [b, K] -> [b, n_group, G]
        wg = w[r0 : r0 + batch_size].float().view(-1, n_groups, gs)
        ref = torch.einsum("tgj,bgj->btg", xg, wg)  # [b, T', n_group]
        best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)  # [b, n_group]
        for r in ratios:
            scale, zero = compute_qparams(wg, bits, symmetric, r, scale_dtype)  # [b, n_group, 1]
            out = torch.einsum("tgj,bgj->btg", xg, fake_quantize(wg, scale, zero, bits))  # [b, T', n_group]
            err = (out - ref).pow(2).mean(dim=1)  # [b, n_group]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio[r0 : r0 + batch_size][better] = r
    return best_ratio


def quantize_weight(
    w: torch.Tensor,
    clip_ratio: torch.Tensor | None = None,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> QuantizedWeight:
    """RTN of the AWQ-scaled weight w * s [N, K] with the searched per-group clip [N, n_groups] (None: 1)."""
    return quantize_rtn(w, bits, group_size, symmetric, 1.0 if clip_ratio is None else clip_ratio, scale_dtype)
