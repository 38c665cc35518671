"""`--kv-cache fp8` end to end on the tiny random model: the written kv_cache_scheme and k_scale / v_scale tensors are
what compressed-tensors itself parses and allocates, equal the scales the run reports, are used by verification;
formats that cannot carry a KV scheme, a bad recipe key and --offload-dir are refused in one line, writing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.cli.test_bad_input import assert_fails, assert_nothing_written

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 32  # tests/conftest.py TINY


def _stored_scales(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.endswith(("k_scale", "v_scale"))}


@pytest.mark.parametrize("strategy,ct_strategy", [("tensor", "tensor"), ("head", "attn_head")])
def test_rtn_writes_a_kv_cache_scheme_compressed_tensors_reads(cli, tiny_args, tmp_path, strategy, ct_strategy):
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams

    out = tmp_path / "out"
    res = cli(["rtn", *tiny_args, "--group-size", "32", "--kv-cache", "fp8", "--kv-cache-strategy", strategy,
               "--out", str(out), "--quiet"])
    assert res.code == 0, res.err[-2000:]
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qconfig)  # compressed-tensors' own schema
    kv = parsed.kv_cache_scheme
    assert (kv.num_bits, kv.type, kv.symmetric, kv.dynamic, kv.strategy) == (8, "float", True, False, ct_strategy)

    stored = _stored_scales(out)
    assert len(stored) == 2 * LAYERS
    holder = torch.nn.Module()  # the shape compressed-tensors allocates for this strategy: [1] or [kv_heads, 1, 1]
    initialize_qparams(holder, "k", kv, observed_shape=(KV_HEADS, None, HEAD_DIM), observed_dtype=torch.bfloat16,
                       force_zero_point=False)
    for name, t in stored.items():
        assert t.shape == holder.k_scale.shape and t.dtype == torch.bfloat16, (name, t.shape, holder.k_scale.shape)
        assert bool((t > 0).all())

    report = json.loads((out / "qwenquant_report.json").read_text())
    assert report["recipe"]["kv_cache"] == {"scheme": "fp8", "strategy": strategy}
    for layer in report["layers"]:
        kv_report = layer["kv_cache"]
        k = stored[f"model.layers.{layer['layer']}.self_attn.k_scale"]
        assert kv_report["k_scale"] == k.float().flatten().tolist()  # the report states what was written
        # s = max|K| / 448, rounded to bf16
        assert torch.equal(k.flatten(), (torch.tensor(kv_report["k_absmax"]) / 448).to(torch.bfloat16))
    verification = report["verification"]
    assert verification["passed"] and verification["kv_cache"]["scales_checked"] == LAYERS
    assert verification["vs_quantized_in_memory"]["mean_kl"] < 1e-6  # same simulated cache on reload
    assert "## FP8 KV cache" in (out / "REPORT.md").read_text()


@pytest.mark.parametrize("fmt", ["gptq", "awq", "gguf"])
def test_formats_without_a_kv_scheme_refuse_it(cli, tiny_args, tmp_path, fmt):
    res = cli(["gptq", *tiny_args, "--group-size", "32", "--format", fmt, "--kv-cache", "fp8", "--out",
               str(tmp_path / "out"), "--quiet"])
    assert_fails(res, 2, f"--format {fmt}", "KV-cache", "--format compressed-tensors")
    assert_nothing_written(tmp_path)


def test_hf_fp8_refuses_it_and_offload_is_refused(cli, tiny_args, tmp_path):
    res = cli(["fp8", *tiny_args, "--weights", "block", "--format", "hf-fp8", "--kv-cache", "fp8", "--out",
               str(tmp_path / "a"), "--quiet"])
    assert_fails(res, 2, "--format hf-fp8", "KV-cache")
    res = cli(["fp8", *tiny_args, "--kv-cache", "fp8", "--offload-dir", str(tmp_path / "off"), "--out",
               str(tmp_path / "b"), "--quiet"])
    assert_fails(res, 2, "--kv-cache fp8", "--offload-dir")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_recipe_key_is_validated(cli, tiny_qwen3, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - rtn: {bits: 4, group_size: 32}\nkv_cache:\n  scheme: int8\n")
    res = cli(["run", str(recipe), "--model", str(tiny_qwen3), "--out", str(tmp_path / "out"), "--quiet"])
    assert_fails(res, 2, "kv_cache.scheme", "int8", "fp8")


def test_strategy_without_the_scheme_is_refused(cli, tiny_args, tmp_path):
    res = cli(["fp8", *tiny_args, "--kv-cache-strategy", "head", "--out", str(tmp_path / "out"), "--quiet"])
    assert_fails(res, 2, "kv_cache.strategy", "--kv-cache fp8")
    assert_nothing_written(tmp_path)
