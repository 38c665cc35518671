"""`--format gguf` on the INT commands and `qwenquant export gguf DIR`, end to end in process on the tiny random model:
the folder holds model.gguf + report + recipe, weights read back exactly, the report says whether llama.cpp ran;
bad input is one line, exit 2, nothing written; a disagreeing export exits 4 with its folder kept."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("gguf", reason="the gguf package (pip install gguf) is not installed")

from qwenquant.eval.gguf_verify import llama_cpp_module  # noqa: E402

HAS_LLAMA = llama_cpp_module() is not None


def _report(folder):
    return json.loads((folder / "qwenquant_report.json").read_text())


@pytest.fixture(scope="module")
def runs(cli, tiny_args, tmp_path_factory):
    cache = {}
    root = tmp_path_factory.mktemp("gguf-runs")

    def run(cmd: str, *flags: str):
        key = (cmd, *flags)
        if key not in cache:
            out = root / f"run{len(cache)}"
            res = cli([cmd, *tiny_args, "--out", out, "--quiet", *flags])
            res.out_dir = out
            cache[key] = res
        return cache[key]

    return run


@pytest.mark.parametrize("cmd,flags,qtype", [
    ("rtn", ("--group-size", "32"), "Q4_0"),
    ("gptq", ("--group-size", "32", "--bits", "8"), "Q8_0"),
    ("awq", ("--group-size", "32"), "Q4_1"),  # AWQ is asymmetric by default
])
def test_format_gguf_run(runs, cmd, flags, qtype):
    res = runs(cmd, *flags, "--format", "gguf")
    assert res.code == 0, res.err
    files = sorted(p.name for p in res.out_dir.iterdir())
    assert files == ["README.md", "REPORT.md", "model.gguf", "qwenquant_report.json", "recipe.yaml"]
    report = _report(res.out_dir)
    v = report["verification"]
    assert v["passed"] and v["weights_checked"] == 14
    assert v["weights"]["exact_mismatched"] == []
    assert report["gguf"]["tensor_types"][qtype] == 14
    assert report["path"]["streamed"] is False  # its own writer, not streamed shards
    assert v["runtime"]["available"] is HAS_LLAMA
    if not HAS_LLAMA:
        assert "llama-cpp-python is not installed" in v["runtime"]["reason"]
        assert "llama.cpp not run" in v["loader"] and "llama.cpp not run" in (res.out_dir / "REPORT.md").read_text()
    else:
        assert v["runtime"]["version"] and v["loader"].startswith("llama.cpp")
        vs_source = v["runtime"]["greedy_vs_source"]  # llama.cpp's answers against the source model's own
        assert len(vs_source["prompts"]) == 3 and "source model" in vs_source["reference"]
        assert "Against the source model" in (res.out_dir / "README.md").read_text()
    card = (res.out_dir / "README.md").read_text()
    assert "library_name: gguf" in card and "llama-cli -m model.gguf" in card


@pytest.mark.parametrize("flags,message", [
    (("rtn", "--format", "gguf"), "use --group-size 32"),
    (("rtn", "--format", "gguf", "--group-size", "32", "--bits", "3"), "use --bits 4, 5 or 8"),
    (("rtn", "--format", "gguf", "--group-size", "32", "--bits", "8", "--asym"), "use --sym"),
    (("gptq", "--format", "gguf", "--group-size", "32", "--act-order", "group"), "act-order `group`"),
    (("rtn", "--format", "gguf", "--group-size", "32", "--offload-dir", "OFF"), "drop --offload-dir"),
])
def test_format_gguf_refusals(cli, tiny_args, tmp_path, flags, message):
    out = tmp_path / "out"
    args = [str(tmp_path / "off") if f == "OFF" else f for f in flags]
    res = cli([args[0], *tiny_args, "--out", out, *args[1:]])
    assert res.code == 2 and len(res.error_lines) == 1 and message in res.error_lines[0], res.err
    assert not out.exists() and not any(tmp_path.glob(".out*"))


@pytest.fixture(scope="module")
def ct_w4g32(runs):
    res = runs("rtn", "--group-size", "32", "--no-stream")
    assert res.code == 0, res.err
    return res.out_dir


def _export(cli, folder, out, tiny_qwen3, eval_text, *flags):
    return cli(["export", "gguf", folder, "--out", out, "--eval-text", eval_text, "--eval-window", "128",
                "--kl-tokens", "256", "--source", tiny_qwen3, "--device", "cpu", "--quiet", *flags])


def test_export_gguf_from_a_qwenquant_folder(cli, ct_w4g32, tiny_qwen3, eval_text, tmp_path):
    res = _export(cli, ct_w4g32, tmp_path / "g", tiny_qwen3, eval_text)
    assert res.code == 0, res.err
    report = _report(tmp_path / "g")
    assert report["kind"] == "export-gguf" and report["gguf"]["tensor_types"]["Q4_0"] == 14
    assert "as they are" in report["codes"]
    v = report["verification"]
    assert v["passed"] and v["weights"]["exact_mismatched"] == [] and v["runtime"]["available"] is HAS_LLAMA
    # the run's own KL (same codes, evaluated by the run) and the exported file's agree: same weights
    assert v["vs_quantized_in_memory"]["mean_kl"] == 0.0


def test_export_gguf_from_bf16_and_refusals(cli, ct_w4g32, tiny_qwen3, eval_text, tmp_path):
    res = _export(cli, tiny_qwen3, tmp_path / "b", tiny_qwen3, eval_text, "--type", "q5_1")
    assert res.code == 0, res.err
    assert _report(tmp_path / "b")["gguf"]["tensor_types"]["Q5_1"] == 14
    res = _export(cli, tiny_qwen3, tmp_path / "b", tiny_qwen3, eval_text)
    assert res.code == 2 and "already exists" in res.error_lines[0]
    res = _export(cli, ct_w4g32, tmp_path / "c", tiny_qwen3, eval_text, "--type", "q4_1")
    assert res.code == 2 and "quantize with --asym --bits 4" in res.error_lines[0], res.err
    res = _export(cli, ct_w4g32, tmp_path / "c", tiny_qwen3, eval_text, "--type", "q3_k")
    assert res.code == 2 and "--type q3_k" in res.error_lines[0]
    res = _export(cli, tmp_path / "missing", tmp_path / "c", tiny_qwen3, eval_text)
    assert res.code == 2 and "no config.json" in res.error_lines[0]
    assert not (tmp_path / "c").exists() and not any(tmp_path.glob(".c*"))


def test_export_gguf_disagreement_exits_4_and_keeps_the_folder(cli, ct_w4g32, tiny_qwen3, eval_text, tmp_path):
    res = _export(cli, ct_w4g32, tmp_path / "d", tiny_qwen3, eval_text, "--verify-max-kl", "1e-9")
    assert res.code == 4 and "verification failed" in res.error_lines[0]
    assert (tmp_path / "d" / "model.gguf").is_file() and not _report(tmp_path / "d")["verification"]["passed"]


def test_missing_gguf_package_is_one_line(monkeypatch):
    from qwenquant.errors import BadInputError
    from qwenquant.export.gguf_meta import gguf_module

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(BadInputError, match="pip install gguf"):
        gguf_module()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (pip install 'qwenquant[gguf]'): the "
                    "GGUF file cannot be run in llama.cpp here")
@pytest.mark.parametrize("bits,sym,max_kl", [
    # measured on qwen3-mini, 4096 WikiText-2 tokens: Q8_0 1.30e-4 nats in llama.cpp (3.5e-5 in transformers),
    # top-1 98.8%; Q4_1 6.08e-3 (5.99e-3), top-1 92.5%
    ("8", "--sym", 1e-3), ("4", "--asym", 1.5e-2),
])
def test_llama_cpp_agrees_with_the_source_on_mini(cli, mini_model, tmp_path, bits, sym, max_kl):
    out = tmp_path / "g"
    res = cli(["rtn", "--model", mini_model, "--group-size", "32", "--bits", bits, sym, "--format", "gguf",
               "--out", out, "--eval-windows", "1", "--quiet"])
    assert res.code == 0, res.err
    v = _report(out)["verification"]
    kl, ours = v["runtime"]["vs_source"], _report(out)["evaluation"]["kl_vs_source"]
    assert v["passed"] and v["loader"].startswith("llama.cpp") and kl["tokens"] == 4096
    assert kl["mean_kl"] < max_kl and kl["top1_agreement"] > 0.9
    # llama.cpp computes the same weights with 8-bit activation blocks: close to, not equal to, transformers' KL
    assert abs(kl["mean_kl"] - ours["mean_kl"]) < max(0.1 * ours["mean_kl"], 2e-4)
    assert v["runtime"]["greedy"]["prompts"] and v["runtime"]["greedy"]["token_agreement"] > 0.3
    if bits == "8":  # measured: Q8_0's three answers in llama.cpp equal the source model's (72 of 72 tokens)
        assert v["runtime"]["greedy_vs_source"]["token_agreement"] > 0.9, v["runtime"]["greedy_vs_source"]
