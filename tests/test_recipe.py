"""Recipe sections: percentages are taken as users write them, as numbers or with a % sign, in flags and YAML."""

from __future__ import annotations

import pytest

from qwenquant.errors import BadInputError
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
