"""--offload-dir (qwenquant/model/offload.py): decoder layers stay on disk and are materialized one at a time.

The checkpoint, config and KL are bit-identical to a run without it; the layer-streamed evaluation equals the full
model's; at no moment is more than one decoder layer in memory; a killed offloaded run resumes to the same checkpoint;
what needs the whole model in memory is refused with one line (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenquant.model.offload import LayerStore, _is_meta

# fp8 --scale-search also searches channel/block granularity per fused group: on the tiny model it writes two
# config groups, which the offload verification must read back per Linear
CASES = {"fp8": ["fp8", "--no-stream"],  # data-free FP8 streams unless told not to
         "gptq": ["gptq", "--group-size", "64"], "fp8-search": ["fp8", "--scale-search"]}
FILES = ("config.json", "generation_config.json", "recipe.yaml")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def assert_same_checkpoint(a: Path, b: Path, files: tuple[str, ...] = FILES) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k
    for f in files:
        assert (a / f).read_text() == (b / f).read_text(), f


@pytest.fixture(scope="module")
def offload_runs(cli, tiny_args, tmp_path_factory):
    """Each case run without and with --offload-dir (a DIR that does not exist yet), the latter with a spy on
    `LayerStore.materialize` recording how many decoder layers are in memory right after each call."""
    root = tmp_path_factory.mktemp("offload")
    runs = {}
    for case, cmd in CASES.items():
        (root / f"{case}-dir").mkdir()  # DIR = <this>/nested: the run creates it
        live: list[int] = []
        original = LayerStore.materialize

        def spy(self, i, original=original, live=live):
            layer = original(self, i)
            live.append(sum(not _is_meta(l) for l in self.layers))
            return layer

        whole = cli([*cmd, *tiny_args, "--out", root / f"{case}-whole", "--quiet"])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(LayerStore, "materialize", spy)
            offloaded = cli([*cmd, *tiny_args, "--out", root / f"{case}-offload", "--quiet",
                             "--offload-dir", root / f"{case}-dir" / "nested"])
        runs[case] = (whole, offloaded, live, root)
    return runs


@pytest.mark.parametrize("case", list(CASES))
def test_offloaded_run_writes_the_identical_checkpoint(offload_runs, case) -> None:
    whole, offloaded, _, root = offload_runs[case]
    assert whole.code == 0, whole.err
    assert offloaded.code == 0, offloaded.err
    a, b = root / f"{case}-whole", root / f"{case}-offload"
    assert_same_checkpoint(a, b)
    ra, rb = (json.loads((d / "qwenquant_report.json").read_text()) for d in (a, b))
    for key in ("source", "quantized", "kl_vs_source"):
        assert ra["evaluation"][key] == rb["evaluation"][key], key
    v = rb["verification"]
    assert v["passed"] and v["mode"] == "offload" and not v["weights_mismatched"] and not v["other_tensors_mismatched"]
    assert v["weights_checked"] == ra["verification"]["weights_checked"] == 14 and v["other_tensors_checked"] == 10
    assert "no full-model reload" in v["loader"] and "spec reader" in v["loader"]
    assert rb["memory"]["offload_dir"] == str((root / f"{case}-dir" / "nested").resolve())
    assert not (root / f"{case}-dir" / "nested").exists()  # created by the run, removed at its end
    assert (root / f"{case}-dir").is_dir() and not any((root / f"{case}-dir").iterdir())  # existed before: kept


@pytest.mark.parametrize("case", list(CASES))
def test_at_most_one_decoder_layer_is_in_memory(offload_runs, case) -> None:
    _, offloaded, live, _ = offload_runs[case]
    assert offloaded.code == 0, offloaded.err
    # source eval 2 + quantize 2 + quantized eval 2 + export 2 + verify 2 materializations of the 2 layers
    assert len(live) == 10, live
    assert max(live) == 1, live


def test_layerwise_evaluation_equals_the_full_model(tiny_qwen3, tmp_path) -> None:
    from qwenquant.eval.layerwise import evaluate_layerwise
    from qwenquant.eval.perplexity import next_token_logprobs, perplexity
    from qwenquant.eval.precision import evaluation_precision
    from qwenquant.model.loader import load_model, resolve_model
    from qwenquant.model.offload import load_offloaded
    from qwenquant.state import ActivationSpec
    from qwenquant.activations import activation_quantization

    resolved = resolve_model(str(tiny_qwen3))
    full, _ = load_model(resolved)
    lazy, _, store = load_offloaded(resolved, "bfloat16", tmp_path)
    assert all(p.is_meta for p in store.layers.parameters())
    assert lazy.lm_head.weight is lazy.model.embed_tokens.weight  # tied, as from_pretrained leaves it
    for name, buf in full.named_buffers():
        assert torch.equal(buf, dict(lazy.named_buffers())[name]), name  # rotary inv_freq rebuilt identically
    torch.manual_seed(0)
    windows = torch.randint(0, 8192, (3, 96))
    cpu = torch.device("cpu")
    # FP8 dynamic activation quantization on every decoder Linear: hooks by name reach the offloaded layers too
    specs = {f"model.layers.{i}.{n}": ActivationSpec("token") for i in range(2)
             for n in resolved.adapter.linears}
    results = {}
    for label, act in (("plain", None), ("fp8 acts", specs)):
        with activation_quantization(full, act or {}), evaluation_precision(full, cpu):  # float32, as layerwise
            ref_ppl, ref_logp = perplexity(full, windows, cpu), next_token_logprobs(full, windows[:2], cpu)
        with activation_quantization(lazy, act or {}):
            ppl, logp = evaluate_layerwise(lazy, store, windows, windows[:2], cpu)
        assert ppl.perplexity == pytest.approx(ref_ppl.perplexity, rel=1e-6), label
        assert (ppl.tokens, ppl.windows, ppl.window) == (ref_ppl.tokens, ref_ppl.windows, ref_ppl.window)
        assert logp.dtype == ref_logp.dtype and logp.shape == ref_logp.shape
        assert torch.allclose(logp.float(), ref_logp.float(), atol=1e-3, rtol=0), label
        results[label] = logp
    assert not torch.equal(results["plain"], results["fp8 acts"])  # the hooks did apply
    assert not store.materialized and all(p.is_meta for p in store.layers.parameters())


def test_killed_offloaded_run_resumes_to_the_identical_checkpoint(offload_runs, cli, tiny_args, tmp_path) -> None:
    from qwenquant.export.writer import partial_dir

    _, _, _, root = offload_runs["gptq"]
    out, off = tmp_path / "resumed", ["--offload-dir", str(tmp_path / "dir")]
    env = dict(os.environ, QWENQUANT_FAULT_KILL_AFTER_LAYER="0", QWENQUANT_TEST_THREADS="1", OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-m", "qwenquant", *CASES["gptq"], *map(str, tiny_args), "--out", str(out),
                             "--quiet", *off], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((partial_dir(out) / "_journal" / "journal.json").read_text())["layers_done"] == 1
    resumed = cli([*CASES["gptq"], *tiny_args, "--out", out, "--quiet", "--resume", *off])
    assert resumed.code == 0, resumed.err
    report = json.loads((out / "qwenquant_report.json").read_text())
    assert report["resumed_after_layers"] == 1 and report["verification"]["passed"]
    assert_same_checkpoint(root / "gptq-whole", out)
    assert not any((tmp_path / "dir").iterdir())  # the killed run's work folder was replaced, then removed


@pytest.mark.parametrize("flags, words", [
    (["--tasks", "piqa"], "--tasks"),
    (["--keep-sensitive", "1"], "--keep-sensitive"),
])
def test_whole_model_features_are_refused(cli, tiny_args, tmp_path, flags, words) -> None:
    res = cli(["fp8", *tiny_args, "--out", tmp_path / "out", "--quiet", "--offload-dir", tmp_path / "dir", *flags])
    assert res.code == 2, res.err
    assert len(res.error_lines) == 1 and words in res.error_lines[0] and "--offload-dir" in res.error_lines[0]
    assert not (tmp_path / "dir").exists() and not (tmp_path / "out").exists()


def test_bad_offload_dirs_are_refused(cli, tiny_args, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    res = cli(["fp8", *tiny_args, "--out", tmp_path / "out", "--quiet", "--offload-dir", tmp_path / "file"])
    assert res.code == 2 and len(res.error_lines) == 1 and "is a file" in res.error_lines[0]
    res = cli(["fp8", *tiny_args, "--out", tmp_path / "out", "--quiet", "--offload-dir", tmp_path / "out" / "scratch"])
    assert res.code == 2 and len(res.error_lines) == 1 and "inside --out" in res.error_lines[0]


def test_moe_offloaded_run_writes_the_identical_checkpoint(cli, tiny_args, tmp_path) -> None:
    """Qwen3-MoE: the experts are split into per-expert Linears on the meta skeleton, named as on disk."""
    import shutil

    from conftest import MINI, TOKENIZER_FILES
    from conftest import build_tiny_moe as build_model

    model = tmp_path / "moe"
    build_model().save_pretrained(model)
    for f in TOKENIZER_FILES:
        if (MINI / f).exists():
            shutil.copy(MINI / f, model / f)
    args = list(tiny_args)
    args[args.index("--model") + 1] = str(model)
    whole = cli(["fp8", *args, "--out", tmp_path / "whole", "--quiet", "--no-verify", "--no-stream"])
    offloaded = cli(["fp8", *args, "--out", tmp_path / "offload", "--quiet", "--offload-dir", tmp_path / "dir",
                     "--no-stream"])
    assert whole.code == 0 and offloaded.code == 0, whole.err + offloaded.err
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "offload", FILES[:2])  # recipes differ in eval.verify
    ra, rb = (json.loads((tmp_path / d / "qwenquant_report.json").read_text()) for d in ("whole", "offload"))
    assert ra["evaluation"]["kl_vs_source"] == rb["evaluation"]["kl_vs_source"]
    assert rb["verification"]["passed"] and rb["verification"]["weights_checked"] > 50  # attention + 16 experts x 3
