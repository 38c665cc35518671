"""Resumable runs (qwenquant/journal.py): a run killed mid-way (SIGKILL after its first decoder layer, from a real
subprocess) continues with --resume and writes exactly the checkpoint an uninterrupted run writes; finished layers'
records leave memory; Ctrl-C keeps the progress and says how to resume; a mismatched resume is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenquant.export.writer import partial_dir

CASES = {
    "gptq": ["gptq", "--group-size", "64"],
    "gptq-compensate-float": ["gptq", "--group-size", "64", "--compensate", "--compensate-steps", "4"],
    "fp8-static-smooth-search": ["fp8", "--activations", "static", "--smooth", "--scale-search"],
}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert (a / "recipe.yaml").read_text() == (b / "recipe.yaml").read_text()


def run_killed(args: list[str], kill_after_layer: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, QWENQUANT_FAULT_KILL_AFTER_LAYER=str(kill_after_layer), QWENQUANT_TEST_THREADS="1",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "qwenquant", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("case", list(CASES))
def test_killed_run_resumes_to_the_identical_checkpoint(case, cli, tiny_args, tmp_path) -> None:
    cmd = CASES[case]
    whole = cli([*cmd, *tiny_args, "--out", tmp_path / "whole", "--quiet"])
    assert whole.code == 0, whole.err

    out = tmp_path / "resumed"
    killed = run_killed([*cmd, *tiny_args, "--out", str(out), "--quiet"], kill_after_layer=0)
    assert killed.returncode == -9, killed.stderr[-2000:]  # really killed, after layer 0 was journaled
    assert not out.exists()
    meta = json.loads((partial_dir(out) / "_journal" / "journal.json").read_text())
    assert meta["layers_done"] == 1

    resumed = cli([*cmd, *tiny_args, "--out", out, "--quiet", "--resume"])
    assert resumed.code == 0, resumed.err
    assert not partial_dir(out).exists() and not (out / "_journal").exists()
    report = json.loads((out / "qwenquant_report.json").read_text())
    assert report["resumed_after_layers"] == 1
    assert report["verification"]["passed"]
    assert_same_checkpoint(tmp_path / "whole", out)
    whole_report = json.loads((tmp_path / "whole" / "qwenquant_report.json").read_text())
    assert report["evaluation"]["kl_vs_source"] == whole_report["evaluation"]["kl_vs_source"]


def test_resume_refuses_a_different_recipe_and_a_fresh_run_replaces_stale_progress(cli, tiny_args, tmp_path) -> None:
    out = tmp_path / "out"
    killed = run_killed(["gptq", *tiny_args, "--out", str(out), "--quiet"], kill_after_layer=0)
    assert killed.returncode == -9
    other = cli(["gptq", *tiny_args, "--out", out, "--quiet", "--resume", "--bits", "8"])
    assert other.code == 2 and len(other.error_lines) == 1
    assert "different recipe" in other.error_lines[0] and "without --resume" in other.error_lines[0]
    meta = json.loads((partial_dir(out) / "_journal" / "journal.json").read_text())
    assert meta["layers_done"] == 1 and not out.exists()  # the refused resume left the progress as it was
    fresh = cli(["gptq", *tiny_args, "--out", out, "--quiet", "--bits", "8"])  # no --resume: starts over
    assert fresh.code == 0, fresh.err
    assert "resumed_after_layers" not in json.loads((out / "qwenquant_report.json").read_text())
    assert not partial_dir(out).exists()


@pytest.mark.parametrize("target, edit", [
    ("layer-00000.safetensors", "bytes"),  # a changed tensor
    ("layer-00000.json", "code"),  # a changed skeleton: whatever it holds is data, checked by its hash first
    ("inputs-00000.sha256", "delete"),  # inputs the run counted as written are missing
])
def test_a_tampered_journal_is_refused_and_holds_no_pickle(cli, tiny_args, tmp_path, target, edit) -> None:
    """Nothing in the journal is a pickle (reading it back cannot run code); a file that fails its hash, or is
    missing, makes --resume refuse with one line that names the fix, leaving nothing half-written."""
    out = tmp_path / "out"
    killed = run_killed(["gptq", *tiny_args, "--out", str(out), "--quiet"], kill_after_layer=0)
    assert killed.returncode == -9
    folder = partial_dir(out) / "_journal"
    suffixes = {f.suffix for f in folder.iterdir()}
    assert suffixes <= {".json", ".safetensors", ".sha256"}, suffixes  # no torch.save / pickle files
    path = folder / target
    if edit == "bytes":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    elif edit == "code":
        path.write_text(path.read_text().replace('"data"', '"data", "__reduce__": "os.system"', 1))
    else:
        path.unlink()
    res = cli(["gptq", *tiny_args, "--out", out, "--quiet", "--resume"])
    assert res.code == 2 and len(res.error_lines) == 1, res.err
    line = res.error_lines[0]
    if edit == "delete":
        assert "did not keep" in line and "without --resume" in line, line
    else:
        assert "integrity check" in line and target.split(".")[0] in line and "without --resume" in line, line
    assert not out.exists()


def test_ctrl_c_keeps_progress_and_says_how_to_resume(cli, tiny_args, tmp_path, monkeypatch) -> None:
    from qwenquant import journal

    real = journal.Journal.save_layer

    def interrupted(self, i, *args, **kwargs):
        real(self, i, *args, **kwargs)
        if i == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(journal.Journal, "save_layer", interrupted)
    out = tmp_path / "out"
    res = cli(["gptq", *tiny_args, "--out", out, "--quiet"])
    assert res.code == 130 and len(res.error_lines) == 1
    assert "--resume" in res.error_lines[0] and not out.exists() and partial_dir(out).is_dir()
    monkeypatch.setattr(journal.Journal, "save_layer", real)
    assert cli(["gptq", *tiny_args, "--out", out, "--quiet", "--resume"]).code == 0


def test_finished_layers_records_leave_memory(tiny_qwen3, calib_txt, tmp_path) -> None:
    """With a journal, only the layer in progress keeps its records in memory; the rest load from disk on demand."""
    from qwenquant.calibration import load_calibration
    from qwenquant.journal import Journal
    from qwenquant.model.loader import load_model, resolve_model
    from qwenquant.state import QuantState
    from qwenquant.pipeline import run_sequential
    from qwenquant.stages.gptq import GPTQStage
    from qwenquant.recipe import Recipe, ModelConfig

    resolved = resolve_model(str(tiny_qwen3))
    model, tok = load_model(resolved, "bfloat16")
    calib = load_calibration(str(calib_txt), tok, 4, 64, 0)
    recipe = Recipe(model=ModelConfig(id=str(tiny_qwen3)), stages=[GPTQStage(group_size=64)])
    journal = Journal(tmp_path, "fingerprint")
    state = QuantState()
    state.records = journal.records
    seen_in_memory = []
    real = journal.save_layer

    def spy(i, *args, **kwargs):
        seen_in_memory.append(len(journal.records._memory))
        real(i, *args, **kwargs)

    journal.save_layer = spy
    run_sequential(model, resolved.adapter, calib, recipe.stages, torch.device("cpu"), state, journal=journal)
    assert seen_in_memory == [7, 7]  # one layer's Linears at a time
    assert len(journal.records._memory) == 0 and len(state.records) == 14
    for name in state.records:  # loaded back from the layer files, equal to the live (fake-quantized) weights
        w = model.get_submodule(name).weight
        assert torch.equal(state.records[name].dequantize(w.dtype), w.detach())


def test_a_source_evaluation_alone_is_fingerprinted(tmp_path) -> None:
    """A run interrupted after the source evaluation, before its first layer finished, leaves journal.json (0 layers
    done), so a --resume of another recipe or model is refused instead of reusing that evaluation."""
    from qwenquant.errors import BadInputError
    from qwenquant.journal import Journal, layers_done_in

    Journal(tmp_path, "recipe-a").save_source_eval({"kl_tokens": 1024})
    assert layers_done_in(tmp_path, "recipe-a") == 0
    with pytest.raises(BadInputError, match="different recipe or model"):
        layers_done_in(tmp_path, "recipe-b")
    assert Journal(tmp_path, "recipe-a").load_source_eval() == {"kl_tokens": 1024}
