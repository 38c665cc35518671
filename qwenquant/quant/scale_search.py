"""Scale search: pick a quantization parameter from a candidate grid by the output error it causes on calibration
inputs, as pure tensor functions.

Clipping (per Linear, weights w [N, K], inputs x [T, K]): for each ratio r in the grid, w_hat_r = Q(w, r) and
    err(r) = ||x (w_hat_r - w)^T||^2 / ||x w^T||^2 = tr(D H D^T) / tr(w H w^T),  D = w_hat_r - w,  H = x^T x,
so one Gram matrix H [K, K] serves every candidate. r = 1 is the fixed rule (range = absmax), listed first so that
ties keep it and the search never does worse than it on these inputs.
Smoothing strength (per mapping, inputs x [T, K] shared by weights w_i [N_i, K]): for each alpha, with factors
s(alpha) [K] (SmoothQuant), y_hat = Qa(x / s) Qw(w_i s)^T and
    err(alpha) = sum_i ||y_hat_i - x w_i^T||^2 / sum_i ||x w_i^T||^2,
i.e. weight and activation quantization together, as the engine computes it.
Grids: sensitive units (baseline error above a reference) get the fine grid, the others the coarse one.
Search returns named records (`SearchResult`) that callers store and can replay without searching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

CLIP_GRID_COARSE = (1.0, 0.95, 0.9, 0.85, 0.8)
CLIP_GRID_FINE = tuple(round(1.0 - 0.01 * i, 2) for i in range(21))  # 1.00, 0.99, ..., 0.80
ALPHA_GRID_COARSE = (0.3, 0.5, 0.7)
ALPHA_GRID_FINE = tuple(round(0.2 + 0.05 * i, 2) for i in range(13))  # 0.20, 0.25, ..., 0.80


@dataclass
class SearchResult:
    """The chosen value, and the relative output error of every candidate tried (same order as `grid`)."""

    best: float
    grid: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)

    @property
    def best_error(self) -> float:
        return self.errors[self.grid.index(self.best)]

    def error_at(self, value: float) -> float | None:
        return self.errors[self.grid.index(value)] if value in self.grid else None

    def to_dict(self) -> dict:
        return {"best": self.best, "best_error": self.best_error, "grid": list(self.grid), "errors": list(self.errors)}


def choose_grid(baseline_error: float, reference_error: float | None, coarse: Sequence[float],
                fine: Sequence[float]) -> tuple[float, ...]:
    """The fine grid for a sensitive unit (baseline error above the reference, or no reference yet), else coarse."""
    return tuple(fine) if reference_error is None or baseline_error > reference_error else tuple(coarse)


def gram(x: torch.Tensor) -> torch.Tensor:
    """H = x^T x [K, K] in float32 for inputs x [..., K]."""
    x = x.reshape(-1, x.shape[-1]).float()
    return x.T @ x


def weight_output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """||x (w_hat - w)^T||^2 / ||x w^T||^2 through H = x^T x (w, w_hat [N, K], H [K, K])."""
    w = w.float()
    d = w_hat.float() - w
    num = ((d @ H) * d).sum()
    den = ((w @ H) * w).sum().clamp(min=1e-30)
    return float(num / den)


def _pick(grid: Sequence[float], errors: list[float]) -> SearchResult:
    """Lowest error; the first grid entry wins ties (the fixed rule)."""
    best = min(range(len(grid)), key=lambda i: (errors[i], i))
    return SearchResult(float(grid[best]), [float(g) for g in grid], errors)


@torch.no_grad()
def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    grid: Sequence[float],
    quantize: Callable[[torch.Tensor, float], torch.Tensor],
) -> SearchResult:
    """Clipping ratio for w [N, K] minimizing its output error on inputs x [T, K].

    `quantize(w, ratio)` returns the dequantized weight w_hat [N, K] for that ratio. With T >= K the error goes
    through H = x^T x (N K^2 per candidate), otherwise through x directly (T N K).
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not grid:
        raise ValueError("clip search needs at least one candidate ratio")
    k = w.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"inputs with {x.shape[-1]} features cannot feed a weight with K={k}")
    x = x.reshape(-1, k).float()
    w = w.float()
    if x.shape[0] >= k:
        H = gram(x)
        errors = [weight_output_error(w, quantize(w, float(r)), H) for r in grid]
    else:
        ref = (x @ w.T).pow(2).sum().clamp(min=1e-30)
        errors = [float((x @ (quantize(w, float(r)).float() - w).T).pow(2).sum() / ref) for r in grid]
    return _pick(grid, errors)


@torch.no_grad()
def alpha_errors(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    grid: Sequence[float],
    factors: Callable[[float], torch.Tensor],
    quantize_weight: Callable[[torch.Tensor], torch.Tensor],
    quantize_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[float]:
    """Relative output error of the weights [N_i, K] on inputs x [T, K] after smoothing with factors(alpha) [K]
    and quantizing weights and inputs, for each alpha of the grid. `quantize_input(x / s, s)` gets the factors
    too (a static per-tensor input scale depends on them)."""
    if x.dim() != 2:
        raise ValueError(f"expected calibration inputs [T, K], got shape {tuple(x.shape)}")
    x = x.float()
    w_cat = torch.cat([w.float() for w in weights])  # [sum N_i, K]
    if w_cat.shape[1] != x.shape[1]:
        raise ValueError(f"weights with K={w_cat.shape[1]} cannot read inputs with {x.shape[1]} features")
    y = x @ w_cat.T  # [T, sum N_i]
    ref = y.pow(2).sum().clamp(min=1e-30)
    errors = []
    for alpha in grid:
        s = factors(float(alpha)).float().to(x.device)  # [K]
        w_hat = torch.cat([quantize_weight(w.float() * s) for w in weights])  # quantized per balance weight
        y_hat = quantize_input(x / s, s) @ w_hat.T
        errors.append(float((y_hat - y).pow(2).sum() / ref))
    return errors


def search_alpha(grid: Sequence[float], errors_per_mapping: list[list[float]]) -> SearchResult:
    """One alpha for several mappings (a decoder layer): the lowest sum of their relative errors."""
    if not errors_per_mapping:
        raise ValueError("alpha search needs at least one mapping")
    totals = [sum(e[i] for e in errors_per_mapping) for i in range(len(grid))]
    return _pick(grid, totals)
