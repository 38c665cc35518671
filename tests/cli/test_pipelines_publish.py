"""Issue-6 surface: shipped recipes, `qwenquant run`, recipe errors, quality gates, model card, push, compare."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from qwenquant.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_validate_and_say_when_to_use_them(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#"), "each shipped recipe opens with a comment saying when to use it"
    recipe = load_recipe(path, {"model.id": "Qwen3-4B"})
    assert yaml.safe_load(recipe.to_yaml())["stages"]  # round-trips


def test_recipe_errors_name_file_line_key_and_allowed_values(tmp_path, cli) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nstages:\n  - smooth: {}\n  - fp8: {weights: chan}\n")
    res = cli(["run", bad, "--model", "x"])
    assert res.code == 2 and len(res.error_lines) == 1
    line = res.error_lines[0]
    assert f"{bad}:4" in line and "stages[1].fp8.weights" in line and "tensor, channel, block" in line
    bad.write_text("version: 1\nstages:\n  - fp8: {weights: channel, colour: red}\n")
    res = cli(["run", bad, "--model", "x"])
    assert res.code == 2 and "colour: unknown key" in res.error_lines[0] and f"{bad}:3" in res.error_lines[0]


def test_run_recipe_and_reproduce_from_saved_recipe(cli, tiny_qwen3, calib_txt, eval_text, tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "version": 1, "model": {"id": str(tiny_qwen3)},
        "calibration": {"dataset": str(calib_txt), "num_samples": 4, "seq_len": 64, "seed": 3},
        "stages": [{"smooth": {"alpha": 0.6}}, {"fp8": {"weights": "tensor", "activations": "static"}}],
        "eval": {"eval_text": str(eval_text), "window": 128, "max_windows": 1}, "device": "cpu"}))
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli(["run", recipe, "--out", first, "--quiet"]).code == 0
    assert cli(["run", first / "recipe.yaml", "--out", second, "--quiet"]).code == 0
    a = json.loads((first / "qwenquant_report.json").read_text())
    b = json.loads((second / "qwenquant_report.json").read_text())
    assert a["recipe"] == b["recipe"]
    assert a["calibration"]["sha256_token_ids"] == b["calibration"]["sha256_token_ids"]
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_quality_gate_fails_after_writing_report(cli, tiny_args, tmp_path) -> None:
    out = tmp_path / "gated"
    res = cli(["fp8", *tiny_args, "--out", out, "--max-ppl-increase", "-50", "--json"])
    assert res.code == 3, res.err[-1000:]
    assert json.loads(res.out)["exit_code"] == 3
    report = json.loads((out / "qwenquant_report.json").read_text())
    assert report["gates"][0]["gate"] == "max_ppl_increase_pct" and report["gates"][0]["passed"] is False
    # a gated-out folder is refused by push
    res = cli(["push", out, "--repo-id", "org/name", "--dry-run"])
    assert res.code == 2 and "quality gate" in res.error_lines[0]


def test_model_card_and_provenance(fp8_run, tiny_qwen3) -> None:
    res = fp8_run()
    card = (res.out_dir / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and "fp8" in meta["tags"] and meta["base_model"]
    report = json.loads((res.out_dir / "qwenquant_report.json").read_text())
    ppl = report["evaluation"]["quantized"]["perplexity"]
    assert f"{ppl:.4f}" in card  # the card quotes the measured number, with its setup
    assert "vllm serve" in card and "from_pretrained" in card
    assert set(report["model"]["files_sha256"]) == {p.name for p in tiny_qwen3.glob("*.safetensors")}
    assert report["calibration"]["tokens"] == 0 and report["calibration"]["sha256_token_ids"] is None  # data-free
    assert report["environment"]["torch"] and report["command"].startswith("qwenquant fp8")


def test_push_dry_run_and_local_target(fp8_run, cli, tmp_path) -> None:
    out = fp8_run().out_dir
    res = cli(["push", out, "--repo-id", "org/tiny-fp8", "--dry-run", "--json"])
    assert res.code == 0, res.err
    listed = {f["path"] for f in json.loads(res.out)["files"]}
    assert {"model.safetensors", "README.md", "qwenquant_report.json", "recipe.yaml"} <= listed
    res = cli(["push", out, "--repo-id", "org/tiny-fp8", "--local-dir", tmp_path / "hub", "--quiet"])
    assert res.code == 0, res.err
    assert (tmp_path / "hub" / "org" / "tiny-fp8" / "model.safetensors").is_file()


def test_push_refuses_unverified_or_incomplete(fp8_run, cli, tmp_path) -> None:
    src = fp8_run().out_dir
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    report = json.loads((broken / "qwenquant_report.json").read_text())
    report["verification"]["passed"] = False
    report["verification"]["reason"] = "weights differ"
    (broken / "qwenquant_report.json").write_text(json.dumps(report))
    res = cli(["push", broken, "--repo-id", "org/x", "--dry-run"])
    assert res.code == 2 and "failed verification" in res.error_lines[0]
    (broken / "qwenquant_report.json").unlink()
    res = cli(["push", broken, "--repo-id", "org/x", "--dry-run"])
    assert res.code == 2 and "qwenquant_report.json" in res.error_lines[0]
    res = cli(["push", src, "--repo-id", "not-a-repo-id", "--dry-run"])
    assert res.code == 2 and "org/name" in res.error_lines[0]


def test_compare_runs_reuses_and_merges(cli, tiny_qwen3, calib_txt, eval_text, tmp_path) -> None:
    recipes = []
    for name, stage in (("dyn", {"fp8": {"weights": "channel", "activations": "dynamic"}}),
                        ("w8a16", {"fp8": {"weights": "channel", "activations": "none"}})):
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump({"version": 1, "stages": [stage], "calibration": {
            "dataset": str(calib_txt), "num_samples": 4, "seq_len": 64}}))
        recipes.append(p)
    args = ["compare", "--model", tiny_qwen3, "--recipes", *recipes, "--out", tmp_path / "cmp",
            "--eval-text", eval_text, "--eval-window", "128", "--eval-windows", "1", "--device", "cpu", "--json"]
    res = cli(args)
    assert res.code == 0, res.err[-2000:]
    rows = json.loads(res.out)["rows"]
    assert [r["name"] for r in rows] == ["dyn", "w8a16"] and all(r["verified"] for r in rows)
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["same_evaluation"] and (tmp_path / "cmp" / "accuracy_vs_size.png").is_file()
    stamp = (tmp_path / "cmp" / "dyn" / "qwenquant_report.json").stat().st_mtime_ns
    res = cli(args)  # second run reuses the finished outputs
    assert res.code == 0 and (tmp_path / "cmp" / "dyn" / "qwenquant_report.json").stat().st_mtime_ns == stamp
    res = cli(["report", tmp_path / "cmp" / "dyn", tmp_path / "cmp" / "w8a16", "--out", tmp_path / "merged", "--quiet"])
    assert res.code == 0 and "| dyn |" in (tmp_path / "merged" / "COMPARE.md").read_text()


def test_task_recovery_gate(cli, tiny_args, tmp_path) -> None:
    """--tasks measures source and result identically; --min-task-recovery gates on the worst task."""
    out = tmp_path / "tasks"
    res = cli(["fp8", *tiny_args, "--out", out, "--tasks", "piqa", "--task-limit", "6",
               "--min-task-recovery", "1000", "--json"])
    assert res.code == 3, res.err[-1500:]
    report = json.loads((out / "qwenquant_report.json").read_text())
    piqa = report["evaluation"]["tasks"]["piqa"]
    assert piqa["source"]["n"] == 6 and 0.0 <= piqa["quantized"]["acc"] <= 1.0
    gate = report["gates"][0]
    assert gate["gate"] == "min_task_recovery_pct" and not gate["passed"]
    assert "| piqa |" in (out / "REPORT.md").read_text() and "| piqa |" in (out / "README.md").read_text()
