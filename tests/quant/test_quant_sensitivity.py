"""Pure sensitivity helpers: Spearman rank correlation (vs scipy and the no-ties formula), ranking, the
output-error proxy (vs a float64 reference) and the greedy budget selection on synthetic costs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from qwenquant.quant.sensitivity import (
    average_ranks,
    fewest_within,
    output_error_terms,
    rank_by_sensitivity,
    relative_error,
    spearman,
)


def test_average_ranks_share_ties() -> None:
    assert average_ranks([10.0, 30.0, 20.0, 30.0]).tolist() == [1.0, 3.5, 2.0, 3.5]
    assert average_ranks([5.0, 5.0, 5.0]).tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="finite"):
        average_ranks([1.0, math.nan])


def test_spearman_known_values() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16.5]) == pytest.approx(1.0)  # monotone, not linear
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)); d = (0, 2, -1, -1, 0) -> 1 - 6 * 6 / 120 = 0.7
    assert spearman([1, 2, 3, 4, 5], [1, 4, 2, 3, 5]) == pytest.approx(0.7)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1.0], [2.0]))
    with pytest.raises(ValueError, match="length"):
        spearman([1, 2], [1, 2, 3])


def test_spearman_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(3, 40)
        a = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n)]
        b = [x + rng.gauss(0, 0.2) if rng.random() < 0.8 else rng.random() for x in a]
        if len(set(a)) < 2:
            continue
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_rank_by_sensitivity_descending_and_stable() -> None:
    scores = {"a": 0.1, "b": 0.5, "c": 0.1, "d": 0.9}
    assert rank_by_sensitivity(scores) == ["d", "b", "a", "c"]


def test_output_error_terms_match_float64_reference() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    w = torch.randn(8, 16)
    w_hat = w + 0.01 * torch.randn(8, 16)
    x_hat = x + 0.01 * torch.randn(2, 5, 16)
    err, ref = output_error_terms(x, w, w_hat, x_hat)
    y = x.double().reshape(-1, 16) @ w.double().T
    y_hat = x_hat.double().reshape(-1, 16) @ w_hat.double().T
    assert err == pytest.approx(float((y - y_hat).pow(2).sum()), rel=1e-4)
    assert ref == pytest.approx(float(y.pow(2).sum()), rel=1e-5)
    assert output_error_terms(x, w, w)[0] == 0.0
    with pytest.raises(ValueError):
        output_error_terms(x, w, w[:4])


def test_relative_error_is_error_of_the_concatenated_output() -> None:
    # two members: ||[e1; e2]|| / ||[y1; y2]|| = sqrt((1 + 4) / (4 + 16))
    assert relative_error([(1.0, 4.0), (4.0, 16.0)]) == pytest.approx(math.sqrt(5 / 20))
    assert relative_error([(0.0, 0.0)]) == 0.0


def synthetic_cost(contrib: dict[str, float], base: float):
    """Perplexity increase after keeping some units: base minus their contributions; counts calls."""
    calls = []

    def measure(kept: list[str]) -> float:
        calls.append(list(kept))
        return base - sum(contrib[k] for k in kept)

    return measure, calls


def test_fewest_within_stops_at_the_first_prefix_meeting_the_limit() -> None:
    contrib = {"g0": 0.5, "g1": 0.3, "g2": 0.1, "g3": 0.05}
    ranking = rank_by_sensitivity(contrib)
    measure, calls = synthetic_cost(contrib, base=1.0)
    sel = fewest_within(ranking, measure, limit=0.25, budget=4)
    assert sel.met and sel.keep == ["g0", "g1"]  # 1.0 -> 0.5 -> 0.2 <= 0.25
    assert calls == [[], ["g0"], ["g0", "g1"]]  # k* + 1 measurements, nothing beyond
    assert [k for k, _ in sel.measured] == [0, 1, 2]
    assert sel.measured[-1][1] == pytest.approx(0.2)


def test_fewest_within_keeps_nothing_when_uniform_already_passes() -> None:
    measure, calls = synthetic_cost({"a": 1.0}, base=0.1)
    sel = fewest_within(["a"], measure, limit=0.5, budget=1)
    assert sel.met and sel.keep == [] and calls == [[]]


def test_fewest_within_budget_cap_returns_best_achievable() -> None:
    contrib = {"g0": 0.5, "g1": 0.3, "g2": 0.1}
    measure, calls = synthetic_cost(contrib, base=1.0)
    sel = fewest_within(["g0", "g1", "g2"], measure, limit=0.0, budget=2)
    assert not sel.met and sel.keep == ["g0", "g1"] and len(calls) == 3
    # a non-monotone cost: the best prefix is not the longest
    costs = {0: 1.0, 1: 0.4, 2: 0.6}
    sel = fewest_within(["a", "b"], lambda kept: costs[len(kept)], limit=0.1, budget=5)  # budget clamps to 2
    assert not sel.met and sel.keep == ["a"] and sel.measured == [(0, 1.0), (1, 0.4), (2, 0.6)]
    # ties: the fewest
    sel = fewest_within(["a", "b"], lambda kept: 0.4 if kept else 1.0, limit=0.1, budget=2)
    assert sel.keep == ["a"]


def test_fewest_within_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="budget"):
        fewest_within(["a"], lambda k: 0.0, 0.0, -1)
    with pytest.raises(ValueError, match="NaN"):
        fewest_within(["a"], lambda k: math.nan, 0.0, 1)
