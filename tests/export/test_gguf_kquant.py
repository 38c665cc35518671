"""K-quants from llama.cpp's quantizer fed our importance matrix (qwenquant/export/gguf_imatrix.py,
gguf_kquant.py, runner/gguf_kquant.py): the statistic per GGUF tensor, the refusals, and Q4_K_M / Q6_K from
`qwenquant export gguf` on qwen3-mini verified in llama.cpp."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package (pip install gguf) is not installed")

from qwenquant.eval.gguf_verify import llama_cpp_module  # noqa: E402

HAS_LLAMA = llama_cpp_module() is not None
NEEDS_LLAMA = pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (pip install "
                                 "'qwenquant[gguf]'): K-quants are made by llama.cpp's quantizer")


def test_importance_matrix_is_the_mean_square_of_each_input_column(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    from qwenquant.export.gguf_imatrix import importance_matrix

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    calib = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0][0].clone()))
    imatrix = importance_matrix(model, calib)
    hook.remove()
    assert len(imatrix) == 2 * 7  # every decoder Linear, by GGUF name
    x = torch.cat(seen)  # [3 * 16, intermediate]
    expected = (x * x).mean(0)
    got = imatrix["blk.1.ffn_down.weight"]
    assert got.shape == (384,) and torch.allclose(got, expected, rtol=1e-6), (got - expected).abs().max()
    # q, k and v read the same normalized input, so their statistics are the same numbers
    assert torch.equal(imatrix["blk.0.attn_q.weight"], imatrix["blk.0.attn_k.weight"])
    assert torch.equal(imatrix["blk.0.ffn_gate.weight"], imatrix["blk.0.ffn_up.weight"])


def _export(cli, folder, out, *flags):
    return cli(["export", "gguf", folder, "--out", out, "--device", "cpu", "--quiet", *flags])


def test_kquant_refusals_are_one_line_and_write_nothing(cli, tiny_qwen3, tmp_path, monkeypatch):
    folder = tmp_path / "int"  # a folder that already holds INT codes (only its config is read before refusing)
    folder.mkdir()
    config = json.loads((tiny_qwen3 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((tiny_qwen3 / "model.safetensors").read_bytes())
    res = _export(cli, folder, tmp_path / "o", "--type", "q4_k_m")
    assert res.code == 2 and len(res.error_lines) == 1, res.err
    assert "already holds gptq weights: pass the bf16 source folder" in res.error_lines[0]
    res = _export(cli, tiny_qwen3, tmp_path / "o", "--type", "q6_k", "--num-samples", "0")
    assert res.code == 2 and "calibration.num_samples" in res.error_lines[0], res.err
    import qwenquant.export.gguf_kquant as kq

    monkeypatch.setattr(kq, "llama_cpp_module", lambda: None)
    res = _export(cli, tiny_qwen3, tmp_path / "o", "--type", "q6_k")
    assert res.code == 2 and "pip install 'qwenquant[gguf]'" in res.error_lines[0], res.err
    assert not (tmp_path / "o").exists() and not any(tmp_path.glob(".o*"))


@NEEDS_LLAMA
def test_the_importance_matrix_reaches_llama_cpp(cli, mini_model, tmp_path):
    """Same source, same type: with our importance matrix llama.cpp picks other block scales (different bytes);
    without it the file is what llama.cpp makes alone (two runs byte-identical)."""
    paths = {}
    for label, flags in (("plain", ["--no-imatrix"]), ("plain2", ["--no-imatrix"]),
                         ("imatrix", ["--num-samples", "4", "--seq-len", "128"])):
        res = _export(cli, mini_model, tmp_path / label, "--type", "q4_k_m", "--no-verify", *flags)
        assert res.code == 0, res.err
        paths[label] = (tmp_path / label / "model.gguf").read_bytes()
    assert paths["plain"] == paths["plain2"]
    assert len(paths["plain"]) == len(paths["imatrix"]) and paths["plain"] != paths["imatrix"]
    report = json.loads((tmp_path / "imatrix" / "qwenquant_report.json").read_text())
    assert report["importance_matrix"]["tensors"] == 6 * 7 and report["importance_matrix"]["num_samples"] == 4
    assert report["gguf"]["tensor_types"]["Q4_K"] > 0 and not (tmp_path / "imatrix" / ".source-bf16.gguf").exists()


@pytest.mark.slow
@NEEDS_LLAMA
@pytest.mark.parametrize("qtype,max_kl", [
    # measured on qwen3-mini in llama.cpp 0.3.36, 4096 WikiText-2 tokens: Q4_K_M 5.1e-3 nats (Q6_K, 1.4e-3, passes
    # the same checks with 5e-3; one type keeps the suite short)
    ("q4_k_m", 1.5e-2),
])
def test_kquant_from_the_cli_verified_in_llama_cpp(cli, mini_model, tmp_path, qtype, max_kl):
    out = tmp_path / "k"
    res = _export(cli, mini_model, out, "--type", qtype, "--num-samples", "16", "--kl-tokens", "1024")
    assert res.code == 0, res.err
    report = json.loads((out / "qwenquant_report.json").read_text())
    v = report["verification"]
    kl = v["runtime"]["vs_source"]
    assert v["passed"] and v["loader"].startswith("llama.cpp") and kl["tokens"] == 1024
    assert kl["mean_kl"] < max_kl and kl["top1_agreement"] > 0.9, kl
    assert v["weights"]["quantized_by_llama_cpp"] == 6 * 7 + 1  # every Linear and the embedding table
    # gguf-py's dequantization of the file in transformers agrees with llama.cpp running it, up to llama.cpp's
    # 8-bit activation blocks (measured Q6_K 0.94e-3 vs 1.39e-3; RTN Q8_0 3.5e-5 vs 1.3e-4)
    assert abs(v["gguf_reader_vs_source"]["mean_kl"] - kl["mean_kl"]) < max(0.5 * kl["mean_kl"], 5e-4)
    assert "llama.cpp's quantizer" in (out / "REPORT.md").read_text()
