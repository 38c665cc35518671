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


def test_default_output_names_differ_by_what_the_flags_changed():
    """./<model>-<tag>: the command's defaults keep the short name (`qwenquant fp8 --model Qwen3-4B` writes
    ./Qwen3-4B-FP8); every change a README command makes shows in the name, so they do not collide."""
    from qwenquant.recipe_builder import output_tag, quantize_recipe

    def tag(scheme, **settings):
        return output_tag(quantize_recipe(settings), scheme)

    assert tag("FP8", fp8={}) == "FP8"
    assert tag("W4A16-GPTQ", gptq={}) == "W4A16-GPTQ" and tag("W4A16-AWQ", awq={}) == "W4A16-AWQ"
    names = [tag("FP8", fp8={"weights": "block"}, export={"format": "hf-fp8"}),
             tag("FP8", fp8={"activations": "none"}),
             tag("FP8", fp8={"weights": "tensor", "activations": "static"}, smooth={}),
             tag("FP8", fp8={"activations": "static", "clip_search": True}, smooth={}),
             tag("W4A16-GPTQ", gptq={}, export={"format": "gptq"}),
             tag("W4A16-GPTQ", gptq={}, mixed_precision={"keep_sensitive": 2}),
             tag("W4A16-GPTQ", gptq={}, compensate={}),
             tag("W4A16-GPTQ", gptq={"clip_search": True}),
             tag("W4A16-GPTQ", gptq={"group_size": -1, "symmetric": False}),
             tag("W4A16-AWQ", awq={"clip": False, "group_size": 64}),
             tag("W4A16-RTN", rtn={}, mixed_precision={"keep_sensitive": "auto"}, eval={"max_ppl_increase_pct": 1})]
    assert names == ["FP8-BLOCK-hf-fp8", "FP8-WEIGHT-ONLY", "FP8-SMOOTH-TENSOR-STATIC", "FP8-SMOOTH-STATIC-SEARCH",
                     "W4A16-GPTQ-gptq", "W4A16-GPTQ-KEEP2", "W4A16-GPTQ-COMP", "W4A16-GPTQ-SEARCH",
                     "W4A16-GPTQ-CH-ASYM", "W4A16-AWQ-G64-NOCLIP", "W4A16-RTN-KEEPAUTO"]


def test_kv_cache_shows_in_the_default_output_name():
    from qwenquant.recipe_builder import output_tag, quantize_recipe

    assert output_tag(quantize_recipe({"gptq": {}, "kv_cache": {"scheme": "fp8"}}), "W4A16-GPTQ") == "W4A16-GPTQ-KV-FP8"
    assert output_tag(quantize_recipe({"fp8": {}, "kv_cache": {"scheme": "fp8", "strategy": "head"}}),
                      "FP8") == "FP8-KV-FP8-HEAD"
    assert output_tag(quantize_recipe({"fp8": {}, "kv_cache": {}}), "FP8") == "FP8"
