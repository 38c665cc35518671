"""`qwenquant eval` end to end, in process: JSON summary, eval_report.json + EVAL.md, --baseline deltas and recovery,
and one-line errors (exit 2) for bad task names, model folders and task data, raised before any model loads."""

from __future__ import annotations

import json

import pytest

import qwenquant.cli.eval  # noqa: F401  (registers `eval` until qwenquant/cli/__init__.py imports it)

FAST = ["--limit", "10", "--eval-windows", "1", "--eval-window", "256", "--device", "cpu"]


@pytest.fixture(scope="session")
def tasks_dir(shared_dir):
    d = shared_dir / "data" / "tasks"
    if not d.is_dir():
        pytest.skip(f"task data not found at {d}")
    return d


@pytest.fixture(scope="session")
def single_run(cli, mini_model, tasks_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "report"
    res = cli(["eval", mini_model, "--tasks", "piqa,arc_easy", *FAST, "--tasks-dir", tasks_dir, "--json",
               "--out", out])
    res.out_dir = out
    return res


def test_json_summary(single_run, mini_model) -> None:
    res = single_run
    assert res.code == 0, res.err[-3000:]
    s = json.loads(res.out)  # the whole of stdout is one JSON document
    assert s["ok"] is True and s["model"] == str(mini_model) and s["baseline"] is None
    assert s["limit"] == 10 and s["window"] == 256
    assert s["perplexity"] > 1 and s["baseline_perplexity"] is None
    assert list(s["tasks"]) == ["piqa", "arc_easy"]
    for name, t in s["tasks"].items():
        assert t["n"] == 10
        for k in ("acc", "acc_norm"):
            assert 0 <= t[k] <= 1 and t[f"{k}_stderr"] > 0, (name, t)
        assert "recovery" not in t


def test_report_files(single_run, mini_model) -> None:
    out = single_run.out_dir
    assert sorted(p.name for p in out.iterdir()) == ["EVAL.md", "eval_report.json"]
    r = json.loads((out / "eval_report.json").read_text(encoding="utf-8"))
    assert r["schema_version"] == 1
    assert r["model"]["path"] == str(mini_model) and r["model"]["quantization"] is None
    assert r["settings"]["lm_eval_tasks"] == {"piqa": "qwenquant_piqa", "arc_easy": "qwenquant_arc_easy"}
    assert r["settings"]["num_fewshot"] == 0 and r["settings"]["limit"] == 10
    ppl = r["perplexity"]
    assert ppl["window"] == 256 and ppl["windows"] == 1 and "GPTQ" in ppl["convention"]
    assert ppl["tokens"] == 255 and ppl["text_windows"] > 1 and ppl["whole_text"] is False
    assert r["settings"]["dtype"] == "bfloat16" and r["settings"]["compute_dtype"] == "float32"  # --device cpu
    summary = json.loads(single_run.out)
    assert r["tasks"]["piqa"]["model"]["acc"] == summary["tasks"]["piqa"]["acc"]
    md = (out / "EVAL.md").read_text(encoding="utf-8")
    assert md.startswith("# qwenquant eval:")
    assert "window 256 tokens" in md and "| piqa | 10 |" in md and "±" in md
    assert f"the first 1 of its {ppl['text_windows']} windows, not the whole text" in md
    assert "computed in float32" in md


def test_baseline_same_model_gives_zero_deltas(cli, mini_model, tasks_dir) -> None:
    res = cli(["eval", mini_model, "--tasks", "piqa,arc_easy", *FAST, "--tasks-dir", tasks_dir, "--json",
               "--baseline", mini_model])
    assert res.code == 0, res.err[-3000:]
    s = json.loads(res.out)
    assert s["baseline"] == str(mini_model)
    assert s["baseline_perplexity"] == pytest.approx(s["perplexity"])
    assert s["delta_ppl_pct"] == pytest.approx(0.0, abs=1e-9)
    for name, t in s["tasks"].items():
        assert t["delta_acc"] == 0.0 and t["delta_acc_norm"] == 0.0, (name, t)
        assert t["baseline_acc"] == t["acc"] and t["baseline_acc_stderr"] == t["acc_stderr"]
        if t["acc"] > 0:
            assert t["recovery"] == pytest.approx(1.0)
        if t["acc_norm"] > 0:
            assert t["recovery_norm"] == pytest.approx(1.0)


def _one_line_error(res, code: int = 2) -> str:
    assert res.code == code, (res.code, res.err[-2000:])
    assert len(res.error_lines) == 1, res.err
    return res.error_lines[0]


def test_unknown_task(cli, mini_model, tasks_dir) -> None:
    res = cli(["eval", mini_model, "--tasks", "piqa,bogus_task_qq", "--tasks-dir", tasks_dir, "--no-ppl", "--json"])
    line = _one_line_error(res)
    assert "bogus_task_qq" in line and "hellaswag, piqa, arc_easy, winogrande, ceval" in line
    assert json.loads(res.out) == {"ok": False, "error": line.removeprefix("qwenquant: error: "), "exit_code": 2}


def test_missing_model_dir(cli, tmp_path, tasks_dir) -> None:
    line = _one_line_error(cli(["eval", tmp_path / "absent", "--tasks", "piqa", "--tasks-dir", tasks_dir]))
    assert "no such directory" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_line_error(cli(["eval", empty, "--tasks", "piqa", "--tasks-dir", tasks_dir]))
    assert "no config.json" in line
    line = _one_line_error(cli(["eval", tmp_path / "absent-too", "--baseline", empty, "--tasks", "piqa"]))
    assert "absent-too" in line


def test_missing_baseline_config(cli, mini_model, tmp_path, tasks_dir) -> None:
    line = _one_line_error(cli(["eval", mini_model, "--baseline", tmp_path, "--tasks", "piqa", "--tasks-dir", tasks_dir]))
    assert "--baseline" in line and "no config.json" in line


def test_missing_data_dir(cli, mini_model, tmp_path, monkeypatch) -> None:
    line = _one_line_error(cli(["eval", mini_model, "--tasks", "piqa", "--tasks-dir", tmp_path / "nowhere"]))
    assert "does not exist" in line
    monkeypatch.setenv("QWENQUANT_TASKS_DIR", str(tmp_path))  # exists, but holds no task files
    line = _one_line_error(cli(["eval", mini_model, "--tasks", "winogrande", "--no-ppl"]))
    assert "winogrande_dev.jsonl is missing" in line


def test_bad_flags(cli, mini_model, tasks_dir) -> None:
    assert "--limit must be >= 1" in _one_line_error(cli(["eval", mini_model, "--limit", "0"]))
    assert "nothing to measure" in _one_line_error(cli(["eval", mini_model, "--tasks", "none", "--no-ppl"]))
    assert "--device" in _one_line_error(cli(["eval", mini_model, "--device", "tpu", "--tasks-dir", tasks_dir,
                                              "--tasks", "piqa", "--no-ppl"]))
