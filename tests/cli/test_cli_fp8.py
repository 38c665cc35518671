"""`qwenquant fp8` end to end, in process (`qwenquant.cli.main`): the output folder, its recipe and report, --json,
--print-recipe, default output naming; and one run on the trained qwen3-mini where accuracy means something."""

from __future__ import annotations

import json

import pytest
import yaml

from qwenquant.recipe import load_recipe, recipe_from_dict

CHECKPOINT_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja"}
RUN_FILES = {"recipe.yaml", "qwenquant_report.json", "REPORT.md"}


def _check_folder(out, source_dir) -> dict:
    """Common checks of a finished output folder; returns the report."""
    names = {p.name for p in out.iterdir()}
    assert CHECKPOINT_FILES | RUN_FILES <= names, sorted(names)
    assert not [n for n in names if "partial" in n or n.startswith(".")]
    report = json.loads((out / "qwenquant_report.json").read_text())
    assert report["schema_version"] == 1
    assert report["verification"]["passed"] is True
    assert report["model"]["architecture"] == "Qwen3ForCausalLM"
    md = (out / "REPORT.md").read_text()
    assert md.startswith("# qwenquant report") and "PASSED" in md
    # generation config and tokenizer are carried over unchanged in meaning
    src_gen = json.loads((source_dir / "generation_config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert {k: gen.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == \
        {k: src_gen.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    assert (out / "chat_template.jinja").read_text() == (source_dir / "chat_template.jinja").read_text()
    return report


def test_default_out_json_and_complete_folder(cli, tiny_args, tiny_qwen3, tmp_path, monkeypatch) -> None:
    """No --out: writes ./<model-dir-name>-FP8 in the working directory; --json prints one parseable summary."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    res = cli(["fp8", *tiny_args, "--json"])
    assert res.code == 0, res.err[-3000:]
    out = work / f"{tiny_qwen3.name}-FP8"
    assert sorted(p.name for p in work.iterdir()) == [out.name]  # nothing else, no leftovers

    summary = json.loads(res.out)  # the whole of stdout is one JSON document
    assert summary["ok"] is True and summary["verification"] is True
    assert summary["out"] == out.name
    assert summary["output_bytes"] == (out / "model.safetensors").stat().st_size
    assert summary["mean_kl"] >= 0 and summary["source_ppl"] > 0 and summary["quantized_ppl"] > 0

    report = _check_folder(out, tiny_qwen3)
    assert report["evaluation"]["kl_vs_source"]["mean_kl"] == pytest.approx(summary["mean_kl"])

    # recipe.yaml loads back to the recipe the same flags print, and the report embeds the same
    printed = cli(["fp8", *tiny_args, "--print-recipe"])
    assert printed.code == 0
    expected = recipe_from_dict(yaml.safe_load(printed.out))
    saved = load_recipe(out / "recipe.yaml")
    assert saved == expected
    assert report["recipe"] == expected.to_dict()
    assert saved.stage("fp8").weights == "channel" and saved.stage("fp8").activations == "dynamic"

    from transformers import AutoTokenizer

    text = "The quick brown fox, 快速的狐狸."
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny_qwen3)(text)["input_ids"]


def test_print_recipe_prints_yaml_and_writes_nothing(cli, tiny_args, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "never"
    res = cli(["fp8", *tiny_args, "--weights", "block", "--smooth", "--smooth-alpha", "0.7", "--out", str(out),
               "--print-recipe"])
    assert res.code == 0, res.err
    data = yaml.safe_load(res.out)
    recipe = recipe_from_dict(data)
    assert [type(s).__name__ for s in recipe.stages] == ["SmoothStage", "FP8Stage"]
    assert recipe.stages[0].alpha == 0.7 and recipe.stage("fp8").weights == "block"
    assert recipe.calibration.num_samples == 4 and recipe.eval.window == 128
    assert list(tmp_path.iterdir()) == []


def test_cached_variant_folders_are_complete(fp8_run, tiny_qwen3) -> None:
    """The runs shared with the export tests (written under a parent folder that did not exist yet)."""
    for flags in [(), ("--weights", "block", "--format", "hf-fp8")]:
        res = fp8_run(*flags)
        assert res.code == 0 and res.out == ""
        _check_folder(res.out_dir, tiny_qwen3)


def test_no_verify_no_ppl(fp8_run) -> None:
    res = fp8_run("--no-verify", "--no-ppl")
    assert res.code == 0, res.err[-2000:]
    report = json.loads((res.out_dir / "qwenquant_report.json").read_text())
    assert report["verification"] is None
    assert "source" not in report["evaluation"] and report["evaluation"]["kl_vs_source"]["mean_kl"] >= 0
    assert "Skipped (--no-verify)" in (res.out_dir / "REPORT.md").read_text()


def test_verification_failure_exits_4_and_keeps_folder(cli, tiny_args, tmp_path) -> None:
    """A KL threshold nothing can meet: exit 4, one error line, the folder and its report kept for inspection."""
    out = tmp_path / "strict"
    res = cli(["fp8", *tiny_args, "--out", str(out), "--quiet", "--verify-max-kl", "1e-12", "--json"])
    assert res.code == 4, res.err[-2000:]
    errors = [l for l in res.err.splitlines() if l.startswith("qwenquant: error:")]
    assert len(errors) == 1 and "verification failed" in errors[0] and str(out) in errors[0]
    assert json.loads(res.out) == {"ok": False, "error": errors[0].removeprefix("qwenquant: error: "), "exit_code": 4}
    report = json.loads((out / "qwenquant_report.json").read_text())
    assert report["verification"]["passed"] is False and "KL" in report["verification"]["reason"]
    assert "FAILED" in (out / "REPORT.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strict"]


def test_report_records_the_command_given_to_main(fp8_run) -> None:
    res = fp8_run("--weights", "tensor", "--activations", "static")
    report = json.loads((res.out_dir / "qwenquant_report.json").read_text())
    assert "--weights tensor --activations static" in report["command"]


def test_quiet_prints_nothing(cli, tiny_args, tmp_path, monkeypatch) -> None:
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        monkeypatch.delenv(var, raising=False)
    res = cli(["fp8", *tiny_args, "--out", str(tmp_path / "q"), "--quiet"])
    assert res.code == 0
    assert res.out == "" and res.err == "", res.err[:500]


def test_builtin_calibration_data_is_packaged() -> None:
    import tomllib
    from pathlib import Path

    import qwenquant
    from qwenquant.calibration import BUILTIN_DIR

    pkg = Path(qwenquant.__file__).resolve().parent
    pyproject = tomllib.loads((pkg.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["qwenquant"]
    packaged = {p.resolve() for pattern in patterns for p in pkg.glob(pattern)}
    for lang in ("en", "zh"):
        assert (BUILTIN_DIR / f"{lang}.jsonl").resolve() in packaged


@pytest.mark.slow
def test_qwen3_mini_end_to_end(cli, mini_model, calib_txt, eval_text, tmp_path) -> None:
    """The trained fixture: FP8 channel/dynamic barely moves perplexity and reloads bit-exact."""
    out = tmp_path / "mini-fp8"
    res = cli(["fp8", "--model", mini_model, "--out", out, "--calib", calib_txt, "--num-samples", "8",
               "--seq-len", "64", "--eval-text", eval_text, "--eval-window", "128", "--eval-windows", "4",
               "--device", "cpu", "--json"])
    assert res.code == 0, res.err[-3000:]
    summary = json.loads(res.out)
    report = _check_folder(out, mini_model)
    ev = report["evaluation"]
    # measured (CPU): perplexity 86.16 -> -0.16 %, mean KL 0.0022 nats, top-1 agreement 0.943, size ratio 0.657
    assert summary["ok"] is True
    assert abs(ev["delta_ppl_pct"]) < 3.0, ev
    assert ev["kl_vs_source"]["mean_kl"] < 0.02
    assert ev["kl_vs_source"]["top1_agreement"] > 0.9
    assert report["verification"]["weights_checked"] == 6 * 7
    assert report["sizes"]["ratio"] < 0.75  # FP8 Linears, bf16 embeddings (tied, stored once)
