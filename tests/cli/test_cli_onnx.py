"""`qwenquant export onnx DIR` end to end in process on the tiny random model: our GPTQ/AWQ codes survive the builder
(every MatMulNBits weight dequantizes to exactly our (q - z) * s, so onnxruntime computes our model), an fp32 build
reproduces the source, QDQ works on a tied-embedding model (the builder's Gather trap), a disagreement exits 4 with
its folder kept, and bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import contextlib
import importlib.util
import json

import pytest

from qwenquant.export.onnx_build import missing_packages

MISSING = missing_packages()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"ONNX export needs {', '.join(MISSING)} "
                                "(pip install 'qwenquant[onnx]')")


def _report(folder):
    return json.loads((folder / "qwenquant_report.json").read_text())


def _export(cli, folder, out, tiny_qwen3, eval_text, *flags):
    return cli(["export", "onnx", folder, "--out", out, "--source", tiny_qwen3, "--eval-text", eval_text,
                "--eval-window", "128", "--kl-tokens", "256", "--device", "cpu", "--quiet", *flags])


@pytest.fixture(scope="module")
def quantized_g32(cli, tiny_args, tmp_path_factory):
    """quantized_g32("gptq" | "awq") -> a `--format gptq|awq --group-size 32` folder of the tiny model, made once."""
    root, made = tmp_path_factory.mktemp("onnx-src"), {}

    def make(method: str):
        if method not in made:
            out = root / method
            res = cli([method, *tiny_args, "--group-size", "32", "--format", method, "--out", out, "--quiet"])
            assert res.code == 0, res.err
            made[method] = out
        return made[method]

    return make


@pytest.fixture(scope="module")
def gptq_g32(quantized_g32):
    return quantized_g32("gptq")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_codes_survive_into_onnxruntime(cli, quantized_g32, method, tiny_qwen3, eval_text, tmp_path):
    res = _export(cli, quantized_g32(method), tmp_path / "o", tiny_qwen3, eval_text)
    assert res.code == 0, res.err
    out = tmp_path / "o"
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "builder.log", "REPORT.md",
            "qwenquant_report.json"} <= {p.name for p in out.iterdir()}
    report = _report(out)
    v, w = report["verification"], report["verification"]["weights"]
    assert report["kind"] == "export-onnx" and report["onnx"]["precision"] == "int4"
    assert v["passed"] and w["checked"] == 14 and w["mismatched"] == [] and w["missing"] == []
    assert w["max_abs_deviation_from_ours"] == 0.0  # bit for bit in float32
    # GPTQ act-order static: contiguous groups, so the builder is given desc_act false and writes no g_idx (with
    # one, onnxruntime's CPU kernel decoded ~7x slower); AWQ: asymmetric, zero points
    assert w["stored_as"] == ["MatMulNBits 4-bit block 32 with zero points"]
    assert ("no g_idx" in report["codes"]) is (method == "gptq")
    # onnxruntime vs the same (our) model in transformers (its Linears read back, its norms: AWQ folds scales into
    # them): only the runtime's arithmetic (int8 activations at accuracy level 4) differs; vs the source it
    # carries the quantization error on top
    runtime_only = v["runtime"]["vs_readback_in_transformers"]["mean_kl"]
    vs_source = v["runtime"]["vs_source"]["mean_kl"]
    print(f"{method}: onnxruntime vs our weights {runtime_only:.2e}, vs source {vs_source:.2e}")
    assert runtime_only < 0.25 * vs_source
    assert abs(vs_source - v["readback_in_transformers_vs_source"]["mean_kl"]) < 0.25 * vs_source
    assert len(v["runtime"]["greedy"]["prompts"]) == 3 and v["runtime"]["version"]
    assert "onnxruntime" in (out / "REPORT.md").read_text()


@pytest.mark.slow  # ~20 s idle, ~65 s loaded: one builder run and its verification
def test_fp32_build_reproduces_the_source(cli, tiny_qwen3, eval_text, tmp_path):
    res = _export(cli, tiny_qwen3, tmp_path / "f", tiny_qwen3, eval_text, "--precision", "fp32")
    assert res.code == 0, res.err
    v = _report(tmp_path / "f")["verification"]
    assert v["weights"]["max_abs_deviation_from_source"] == 0.0 and v["weights"]["stored_as"] == ["MatMul float"]
    kl = v["runtime"]["vs_source"]["mean_kl"]
    print(f"fp32 onnxruntime vs source KL {kl:.2e}, top-1 {v['runtime']['vs_source']['top1_agreement']:.4f}")
    assert kl < 1e-5 and v["runtime"]["vs_source"]["top1_agreement"] > 0.99
    assert v["runtime"]["greedy"]["prompts_identical"] >= 2


@pytest.mark.slow  # ~20 s idle, ~60 s loaded
def test_qdq_on_tied_embeddings_and_disagreement_exits_4(cli, tiny_qwen3, eval_text, tmp_path):
    res = _export(cli, tiny_qwen3, tmp_path / "q", tiny_qwen3, eval_text, "--qdq", "--verify-max-kl", "1e-9")
    assert res.code == 4, res.err
    assert "verification failed" in res.error_lines[0] and len(res.error_lines) == 1
    report = _report(tmp_path / "q")  # folder kept with its report
    assert report["onnx"]["builder_options"]["shared_embeddings"] == "false"
    w = report["verification"]["weights"]
    assert w["stored_as"] == ["QDQ DequantizeLinear int4 block 32"] and w["checked"] == 14
    assert 0 < w["max_abs_deviation_from_source"] < 0.5


@pytest.mark.parametrize("flags,message", [
    (("--precision", "int8", "--qdq"), "--qdq holds 4-bit weights"),
    (("--group-size", "24"), "powers of two"),
    (("--precision", "fp16"), "--precision fp16: choose one of"),
    (("--ep", "webgpu"), "--ep webgpu: choose one of"),
])
def test_bad_options_are_one_line(cli, tiny_qwen3, eval_text, tmp_path, flags, message):
    res = _export(cli, tiny_qwen3, tmp_path / "x", tiny_qwen3, eval_text, *flags)
    assert res.code == 2 and len(res.error_lines) == 1 and message in res.error_lines[0], res.err
    assert not (tmp_path / "x").exists() and not any(tmp_path.glob(".x*"))


def test_folders_the_builder_cannot_hold(cli, gptq_g32, tiny_qwen3, eval_text, tmp_path):
    res = _export(cli, gptq_g32, tmp_path / "x", tiny_qwen3, eval_text, "--precision", "int8")
    assert res.code == 2 and "cannot hold this folder's 4-bit gptq codes" in res.error_lines[0]
    res = _export(cli, gptq_g32, tmp_path / "x", tiny_qwen3, eval_text, "--qdq")
    assert res.code == 2 and "--qdq from a gptq/awq folder" in res.error_lines[0]
    moe = tmp_path / "moe"
    moe.mkdir()
    cfg = json.loads((tiny_qwen3 / "config.json").read_text()) | {"architectures": ["Qwen3MoeForCausalLM"]}
    (moe / "config.json").write_text(json.dumps(cfg))
    (moe / "model.safetensors").write_bytes((tiny_qwen3 / "model.safetensors").read_bytes())
    res = _export(cli, moe, tmp_path / "x", tiny_qwen3, eval_text)
    assert res.code == 2 and "does not know Qwen3MoeForCausalLM" in res.error_lines[0]
    qcfg = json.loads((gptq_g32 / "config.json").read_text())["quantization_config"]
    for change, message in [({"bits": 3}, "--bits 4"),
                            ({"group_size": 24}, "powers of two"),
                            ({"quant_method": "compressed-tensors"}, "--format gptq or --format awq")]:
        (moe / "config.json").write_text(json.dumps(cfg | {"architectures": ["Qwen3ForCausalLM"],
                                                           "quantization_config": qcfg | change}))
        res = _export(cli, moe, tmp_path / "x", tiny_qwen3, eval_text)
        assert res.code == 2 and len(res.error_lines) == 1 and message in res.error_lines[0], (change, res.err)
    assert not (tmp_path / "x").exists()


def test_missing_builder_dependency_is_one_line(cli, tiny_qwen3, eval_text, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx_ir" else real(name, *a))
    res = _export(cli, tiny_qwen3, tmp_path / "x", tiny_qwen3, eval_text)
    assert res.code == 2 and "needs onnx-ir" in res.error_lines[0] and "qwenquant[onnx]" in res.error_lines[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # ~20 s idle: one builder run and its verification
def test_cuda_build_where_onnxruntime_cannot_run_it(cli, gptq_g32, tiny_qwen3, eval_text, tmp_path):
    from qwenquant.eval.onnx_verify import provider_for

    missing = provider_for("cuda") is None
    with pytest.warns(UserWarning, match="CUDAExecutionProvider") if missing else contextlib.nullcontext():
        res = _export(cli, gptq_g32, tmp_path / "c", tiny_qwen3, eval_text, "--ep", "cuda")
    assert res.code == 0, res.err
    report = _report(tmp_path / "c")
    v = report["verification"]
    assert report["onnx"]["execution_provider"] == "cuda" and v["weights"]["mismatched"] == []
    assert v["weights"]["max_abs_deviation_from_ours"] == 0.0
    if missing:  # the CPU provider refuses the fused q/k-norm attention of a cuda build
        assert v["runtime"]["available"] is False and "CUDAExecutionProvider" in v["runtime"]["reason"]
        assert "onnxruntime not run" in v["loader"] and v["vs_source"] == v["readback_in_transformers_vs_source"]
        assert "onnxruntime not run" in (tmp_path / "c" / "REPORT.md").read_text()
    else:
        assert v["runtime"]["available"] and v["passed"]
