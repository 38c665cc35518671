"""Layer sensitivity as pure functions: rank statistics, the output-error proxy, and choosing what to keep.

- Spearman's rank correlation: rho = Pearson correlation of the ranks, with tied values given their average rank
  (so rho = 1 - 6 sum d_i^2 / (n (n^2 - 1)) when there are no ties).
- Proxy: relative output error of one Linear on its captured inputs, e = ||X W^T - Q(X) Q(W)^T||_F / ||X W^T||_F;
  for a group of Linears the errors of the concatenated outputs, sqrt(sum_i err_i^2 / sum_i ref_i^2).
- Selection: units ranked by sensitivity (most sensitive first); `fewest_within` keeps the shortest prefix of that
  ranking whose measured cost is within a limit, never more than a budget of units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Sequence

import torch


def average_ranks(values: Sequence[float]) -> torch.Tensor:
    """1-based ranks of `values` (ascending) in float64, ties sharing their average rank."""
    x = torch.as_tensor(list(values), dtype=torch.float64)
    if x.dim() != 1:
        raise ValueError(f"expected a 1-D sequence, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("ranks need finite values")
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    sorted_x = x[order]
    i, n = 0, x.numel()
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0  # positions i..j share rank mean(i+1 .. j+1)
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two paired samples; NaN when either is constant or has < 2 values."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if len(a) < 2:
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    if denom == 0.0:
        return math.nan
    return float((ra * rb).sum()) / denom


def rank_by_sensitivity(scores: Mapping[Hashable, float]) -> list:
    """Keys ordered most sensitive first (descending score); equal scores keep their insertion order."""
    keys = list(scores)
    return sorted(keys, key=lambda k: -float(scores[k]))


def output_error_terms(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor,
                       x_hat: torch.Tensor | None = None) -> tuple[float, float]:
    """(||X W^T - X_hat W_hat^T||^2, ||X W^T||^2) in float32 for inputs x [..., K] and weights [N, K].

    `x_hat` is the input as the engine sees it (FP8-quantized activations); None means x itself. The two sums are
    returned separately so they can be accumulated over batches and over the members of a group.
    """
    if w.shape != w_hat.shape or w.dim() != 2:
        raise ValueError(f"weights must be 2-D and the same shape, got {tuple(w.shape)} and {tuple(w_hat.shape)}")
    k = w.shape[1]
    xf = x.reshape(-1, k).float()  # [T, K]
    xq = xf if x_hat is None else x_hat.reshape(-1, k).float()
    y = xf @ w.float().T  # [T, N]
    y_hat = xq @ w_hat.float().T
    return float((y - y_hat).pow(2).sum()), float(y.pow(2).sum())


def relative_error(terms: Sequence[tuple[float, float]]) -> float:
    """sqrt(sum err^2 / sum ref^2) over (err^2, ref^2) pairs: one Linear's batches, or a group's members."""
    err = sum(t[0] for t in terms)
    ref = sum(t[1] for t in terms)
    return math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf)


@dataclass
class Selection:
    """Outcome of `fewest_within`: the kept prefix, whether it met the limit, and every measurement made."""

    keep: list
    met: bool
    measured: list[tuple[int, float]] = field(default_factory=list)  # (units kept, measured cost)


def fewest_within(ranking: Sequence, measure: Callable[[list], float], limit: float, budget: int) -> Selection:
    """Greedy by sensitivity: the fewest most-sensitive units (k = 0, 1, ..., budget) whose `measure(kept)` is
    <= `limit`. If none qualifies, the prefix with the lowest measured cost (the fewest among equals), met=False.

    Measures in increasing k and stops at the first that qualifies, so it costs k* + 1 calls to `measure`.
    """
    if not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
    budget = min(budget, len(ranking))
    measured: list[tuple[int, float]] = []
    for k in range(budget + 1):
        cost = float(measure(list(ranking[:k])))
        if math.isnan(cost):
            raise ValueError(f"measured cost with {k} units kept is NaN")
        measured.append((k, cost))
        if cost <= limit:
            return Selection(list(ranking[:k]), True, measured)
    best_k = min(measured, key=lambda m: (m[1], m[0]))[0]
    return Selection(list(ranking[:best_k]), False, measured)
