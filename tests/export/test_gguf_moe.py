"""Qwen3-MoE as GGUF `qwen3moe` (qwenquant/export/gguf_experts.py): experts stacked per projection, the router as
ffn_gate_inp, expert counts in the metadata; the file read back exactly and run in llama.cpp; layouts llama.cpp
cannot load refused before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package (pip install gguf) is not installed")

from conftest import MINI, MOE, small_args  # noqa: E402
from qwenquant.eval.gguf_verify import llama_cpp_module  # noqa: E402

HAS_LLAMA = llama_cpp_module() is not None


def _save_moe(folder, **overrides):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**(MOE | overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.to(torch.bfloat16).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (MINI / f).exists():
            shutil.copy(MINI / f, folder / f)
    return folder


@pytest.fixture(scope="module")
def sparse_moe(tmp_path_factory):
    """3 layers, all sparse (8 experts of intermediate 64, top-2), untied: the layout llama.cpp's qwen3moe loads."""
    if not MINI.is_dir():
        pytest.skip("qwen3-mini (its tokenizer is reused by the tiny MoE) not found in ../shared")
    return _save_moe(tmp_path_factory.mktemp("moe") / "sparse", mlp_only_layers=[])


def test_moe_gguf_written_read_back_and_run(cli, sparse_moe, calib_txt, eval_text, tmp_path):
    out = tmp_path / "g"
    res = cli(["rtn", *small_args(sparse_moe, calib_txt, eval_text), "--group-size", "32", "--format", "gguf",
               "--out", out, "--kl-tokens", "256", "--quiet"])
    assert res.code == 0, res.err
    report = json.loads((out / "qwenquant_report.json").read_text())
    v = report["verification"]
    # 3 layers x (4 attention Linears + 8 experts x 3 projections), each expert compared as its slice, bit for bit
    assert v["passed"] and v["weights_checked"] == 84 and v["weights"]["exact_mismatched"] == []

    from qwenquant.export.gguf import read_metadata, read_tensors

    meta = read_metadata(out / "model.gguf")
    assert meta["general.architecture"] == "qwen3moe" and meta["qwen3moe.expert_count"] == 8
    assert meta["qwen3moe.expert_used_count"] == 2 and meta["qwen3moe.expert_feed_forward_length"] == 64
    tensors = read_tensors(out / "model.gguf")
    assert tensors["blk.0.ffn_gate_exps.weight"][1].shape == (8, 64, 128)
    assert tensors["blk.2.ffn_down_exps.weight"][1].shape == (8, 128, 64)
    assert tensors["blk.1.ffn_gate_inp.weight"][1].shape == (8, 128)
    assert report["gguf"]["tensor_types"]["Q4_0"] == 3 * (4 + 3)  # one stacked tensor per projection
    if HAS_LLAMA:  # llama.cpp routes and mixes the experts as transformers does: the same weights, the same KL
        kl, ours = v["runtime"]["vs_source"], report["evaluation"]["kl_vs_source"]
        # measured with 512 KL tokens: 1.603e-3 nats in llama.cpp, 1.596e-3 in transformers
        assert abs(kl["mean_kl"] - ours["mean_kl"]) < 0.1 * ours["mean_kl"] + 2e-4, (kl, ours)
    else:
        assert not v["runtime"]["available"]


def test_moe_layouts_llama_cpp_cannot_load_are_refused_first(cli, calib_txt, eval_text, tmp_path):
    if not MINI.is_dir():
        pytest.skip("qwen3-mini (its tokenizer is reused by the tiny MoE) not found in ../shared")
    model = _save_moe(tmp_path / "mixed")  # layer 1 dense (mlp_only_layers=[1])
    res = cli(["rtn", *small_args(model, calib_txt, eval_text), "--group-size", "32", "--format", "gguf", "--out",
               tmp_path / "o"])
    assert res.code == 2 and len(res.error_lines) == 1, res.err
    assert "dense layers [1]" in res.error_lines[0] and "quantize (" not in res.err
    assert not (tmp_path / "o").exists()
