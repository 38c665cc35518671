"""Recipe sections: percentages are taken as users write them, as numbers or with a % sign, in flags and YAML;
perplexity windows as a count or `all`."""

from __future__ import annotations

import pytest

from qwenquant.errors import BadInputError
from qwenquant.eval.perplexity import DEFAULT_WINDOWS
from qwenquant.recipe import EvalConfig, load_recipe


@pytest.mark.parametrize("given, expected", [(1, 1.0), (2.5, 2.5), ("1%", 1.0), (" 2.5 % ", 2.5), ("0.5", 0.5)])
def test_percent_fields_take_numbers_and_percent_signs(given, expected) -> None:
    ev = EvalConfig(max_ppl_increase_pct=given, min_task_recovery_pct=given, tasks=["piqa"])
    assert ev.max_ppl_increase_pct == expected and isinstance(ev.max_ppl_increase_pct, float)
    assert ev.min_task_recovery_pct == expected


@pytest.mark.parametrize("given", ["abc", "%", "1%%", True, [1]])
def test_bad_percent_names_the_key(given) -> None:
    with pytest.raises(ValueError, match=r"eval.max_ppl_increase_pct: .* is not a percentage; write a number like 1"):
        EvalConfig(max_ppl_increase_pct=given)


def test_recipe_yaml_and_flags_take_percent_signs(tmp_path, cli, mini_model) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nmodel: {id: m}\nstages:\n  - rtn: {}\neval: {max_ppl_increase_pct: 1%}\n")
    assert load_recipe(path).eval.max_ppl_increase_pct == 1.0
    path.write_text("version: 1\nmodel: {id: m}\nstages:\n  - rtn: {}\neval: {max_ppl_increase_pct: lots}\n")
    with pytest.raises(BadInputError, match=r"r.yaml:5: eval.max_ppl_increase_pct: 'lots' is not a percentage"):
        load_recipe(path)
    res = cli(["rtn", "--model", mini_model, "--max-ppl-increase", "1%", "--print-recipe"])
    assert res.code == 0 and "max_ppl_increase_pct: 1.0" in res.out
    res = cli(["rtn", "--model", mini_model, "--max-ppl-increase", "one", "--print-recipe"])
    assert res.code == 2 and "is not a percentage" in res.err


def test_perplexity_windows_default_count_or_all(tmp_path, cli, mini_model) -> None:
    """A default a CPU run affords (4 windows); `all` (None in the recipe, as recipes written before said it) is the
    whole text."""
    assert EvalConfig().max_windows == DEFAULT_WINDOWS == 4
    assert EvalConfig(max_windows="all").max_windows is None and EvalConfig(max_windows=None).max_windows is None
    assert EvalConfig(max_windows="7").max_windows == 7 and EvalConfig(max_windows=" ALL ").max_windows is None
    for bad in (0, -2, "x", 1.5, True, "4.0"):
        with pytest.raises(ValueError, match=r"eval.max_windows: .* is neither a positive number nor all"):
            EvalConfig(max_windows=bad)
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nmodel: {id: m}\nstages:\n  - rtn: {}\neval: {max_windows: all}\n")
    assert load_recipe(path).eval.max_windows is None
    for flag, shown in (("all", "max_windows: null"), ("12", "max_windows: 12"), (None, "max_windows: 4")):
        res = cli(["rtn", "--model", mini_model, *(["--eval-windows", flag] if flag else []), "--print-recipe"])
        assert res.code == 0 and shown in res.out, res.err
    res = cli(["rtn", "--model", mini_model, "--eval-windows", "0", "--print-recipe"])
    assert res.code == 2 and "eval.max_windows: 0 is neither a positive number nor all" in res.err
