"""--target: the GPU table, what each GPU can run, the shipped recipe per target, and the CLI's refusals."""

from __future__ import annotations

import pytest
import yaml

from qwenquant.recipe import load_recipe
from qwenquant.stages.registry import STAGES
from qwenquant.targets import GPU_BY_KEY, SCHEME_NEEDS, TARGETS, detect_target, target_recipe, target_runs


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_each_target_ships_a_recipe_that_it_runs(target):
    """The recipe chosen for a GPU loads, names that GPU, and its scheme is one the GPU runs (no refusal)."""
    path = target_recipe(target)
    assert path.is_file(), f"no shipped recipe {path}"
    recipe = load_recipe(path, {"model.id": "some/model"})
    scheme = STAGES[recipe.quantizer].serving_scheme(recipe.quantizer_config)
    assert recipe.target.name == target and not recipe.target.force
    assert scheme in SCHEME_NEEDS and target_runs(target, scheme) is None
    assert TARGETS[target].why


def test_what_each_generation_runs():
    assert target_runs("h100", "fp8-w8a8") is None and target_runs("rtx4090", "fp8-w8a8") is None
    assert "8.9+; RTX 3090 is 8.6" in target_runs("rtx3090", "fp8-w8a8")
    assert target_runs("rtx3090", "fp8-w8a16") is None  # FP8 weight-only through Marlin on Ampere
    assert target_runs("t4", "fp8-w8a16") is not None and target_runs("t4", "w4a16") is None
    assert target_runs("t4", "int8-w8a8") is None and target_runs("a100", "int8-w8a8") is None
    assert target_runs("b200", "nvfp4") is None and target_runs("rtx5090", "nvfp4") is None
    assert "10.0+" in target_runs("h100", "nvfp4") and target_runs("a100", "nvfp4a16") is None
    assert target_runs("cpu", "int8-w8a8") is None and "CPU runtimes" in target_runs("cpu", "fp8-w8a8")


def test_auto_detection_from_compute_capability():
    assert detect_target(None) == "cpu"
    assert detect_target((9, 0)) == "h100" and detect_target((8, 9)) == "l40s"  # same sm: the most memory
    assert detect_target((8, 0)) == "a100" and detect_target((7, 5)) == "t4"
    assert detect_target((12, 0)) == "rtx5090" and detect_target((10, 0)) == "b200"
    assert detect_target((8, 7)) == "rtx3090"  # an unlisted sm (Orin): the newest listed below it
    assert GPU_BY_KEY["rtx5090"].sm == 120 and GPU_BY_KEY["cpu"].sm is None


def test_cli_refuses_a_scheme_the_target_cannot_run(cli, tiny_args, tmp_path):
    out = tmp_path / "o"
    res = cli(["fp8", *tiny_args, "--out", out, "--target", "t4"])
    assert res.code == 2 and len(res.error_lines) == 1, res.err
    line = res.error_lines[0]
    assert "fp8-w8a8 needs FP8 tensor cores" in line and "T4 is 7.5" in line and "--force-target" in line
    assert "qwenquant run --target t4" in line and not out.exists()
    res = cli(["fp8", *tiny_args, "--out", out, "--target", "auto"])  # no GPU here: auto is the CPU backend
    assert res.code == 2 and "does not run on CPU runtimes" in res.error_lines[0]
    res = cli(["fp8", *tiny_args, "--out", out, "--target", "gtx1080"])
    assert res.code == 2 and len(res.error_lines) == 1 and "gtx1080" in res.error_lines[0]
    res = cli(["fp8", *tiny_args, "--out", out, "--force-target"])
    assert res.code == 2 and "target.force: needs target.name" in res.error_lines[0]


def test_cli_forced_target_is_written_and_recorded(cli, tiny_args, tmp_path):
    out = tmp_path / "o"
    res = cli(["fp8", *tiny_args, "--out", out, "--target", "t4", "--force-target", "--quiet"])
    assert res.code == 0, res.err
    assert yaml.safe_load((out / "recipe.yaml").read_text())["target"] == {"name": "t4", "force": True}
    res = cli(["fp8", *tiny_args, "--out", tmp_path / "plain", "--quiet"])
    assert res.code == 0 and "target" not in yaml.safe_load((tmp_path / "plain" / "recipe.yaml").read_text())


def test_cli_run_target_runs_its_recipe_and_says_why(cli, tiny_qwen3, eval_text, tmp_path):
    out = tmp_path / "t4"
    res = cli(["run", "--target", "t4", "--model", tiny_qwen3, "--out", out])
    assert res.code == 0, res.err[-2000:]
    assert "--target t4 (T4): W4A16 GPTQ, because Turing" in res.err
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["target"] == {"name": "t4", "force": False} and saved["export"]["format"] == "gptq"
    assert "gptq" in saved["stages"][0]
    res = cli(["run", "--model", tiny_qwen3, "--out", tmp_path / "x"])
    assert res.code == 2 and "give a recipe file" in res.error_lines[0]


def test_cli_run_target_cpu_writes_a_gguf(cli, tiny_qwen3, tmp_path):
    out = tmp_path / "cpu"
    res = cli(["run", "--target", "cpu", "--model", tiny_qwen3, "--out", out, "--quiet"])
    assert res.code == 0, res.err[-2000:]
    assert (out / "model.gguf").is_file() and yaml.safe_load((out / "recipe.yaml").read_text())["target"]["name"] == "cpu"
