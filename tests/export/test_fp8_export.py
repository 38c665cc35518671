"""FP8 checkpoints written by `qwenquant fp8` on a tiny random Qwen3, one run per variant, checked against
docs formats.md (names, dtypes, shapes, config) and reloaded with transformers/compressed-tensors on CPU, whose
dequantized weights must equal our own float64 dequantization of the safetensors file, bit for bit."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
N_LAYERS = 2

# name -> (CLI flags, weight granularity, activation mode, format)
VARIANTS = {
    "channel-dynamic": ((), "channel", "dynamic", "compressed-tensors"),
    "tensor-static": (("--weights", "tensor", "--activations", "static"), "tensor", "static", "compressed-tensors"),
    "block-dynamic": (("--weights", "block"), "block", "dynamic", "compressed-tensors"),
    "channel-none": (("--activations", "none"), "channel", "none", "compressed-tensors"),
    "block-hf-fp8": (("--weights", "block", "--format", "hf-fp8"), "block", "dynamic", "hf-fp8"),
    "smooth-tensor-static": (("--weights", "tensor", "--activations", "static", "--smooth"), "tensor", "static",
                             "compressed-tensors"),
}


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """(tensors, safetensors dtype strings, metadata) of one file."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, dtypes, meta


def linear_modules() -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(N_LAYERS) for n in LINEARS]


def own_dequant(q: torch.Tensor, scale: torch.Tensor, granularity: str, block: int = 128) -> torch.Tensor:
    """float64 w_hat = q * scale per granule (formats.md), rounded once to bf16 as the reloaded model stores it."""
    n, k = q.shape
    s = scale.double()
    if granularity == "tensor":
        full = s.reshape(1, 1).expand(n, k)
    elif granularity == "channel":
        full = s.reshape(n, 1).expand(n, k)
    else:
        full = s[torch.arange(n) // block][:, torch.arange(k) // block]
    return (q.double() * full).to(torch.bfloat16)


@pytest.fixture(scope="module")
def source(tiny_qwen3):
    tensors, dtypes, _ = read_tensors(tiny_qwen3 / "model.safetensors")
    return tensors, dtypes


def _run_variant(name: str, fp8_run):
    flags, gran, acts, fmt = VARIANTS[name]
    res = fp8_run(*flags)
    assert res.code == 0, res.err[-3000:]
    return name, res.out_dir, gran, acts, fmt


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, fp8_run):
    return _run_variant(request.param, fp8_run)


def test_tensor_names_dtypes_shapes(variant, source) -> None:
    name, out, gran, acts, fmt = variant
    src, src_dtypes = source
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    tensors, dtypes, meta = read_tensors(out / "model.safetensors")
    assert meta == {"format": "pt"}

    expected: dict[str, tuple[str, tuple]] = {}
    quantized = set(linear_modules())
    for key, t in src.items():
        module = key.rsplit(".", 1)[0]
        if module not in quantized:
            expected[key] = (src_dtypes[key], tuple(t.shape))  # embeddings and every norm: unchanged bf16
            continue
        n, k = t.shape
        expected[f"{module}.weight"] = ("F8_E4M3", (n, k))
        if fmt == "hf-fp8":
            expected[f"{module}.weight_scale_inv"] = ("F32", (math.ceil(n / 128), math.ceil(k / 128)))
            continue
        scale_shape = {"channel": (n, 1), "tensor": (1,), "block": (math.ceil(n / 128), math.ceil(k / 128))}[gran]
        expected[f"{module}.weight_scale"] = ("BF16", scale_shape)
        if acts == "static":
            expected[f"{module}.input_scale"] = ("BF16", (1,))
    got = {k: (dtypes[k], tuple(t.shape)) for k, t in tensors.items()}
    assert got == expected
    # tied embeddings: one table, no lm_head copy; norms (q_norm/k_norm included) and embeddings stay bf16
    assert "lm_head.weight" not in tensors and "lm_head.weight" not in src
    assert all(dtypes[k] == "BF16" for k in tensors if "norm" in k or "embed" in k)
    # scales are positive and finite
    for k, t in tensors.items():
        if "scale" in k:
            assert torch.isfinite(t.float()).all() and (t.float() > 0).all(), k


def test_unquantized_tensors_equal_source(variant, source) -> None:
    name, out, *_ = variant
    src, _ = source
    tensors, _, _ = read_tensors(out / "model.safetensors")
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_norm.weight",
                "model.layers.1.self_attn.k_norm.weight"):
        assert torch.equal(tensors[key], src[key]), key
    smoothed = name.startswith("smooth")
    for i in range(N_LAYERS):  # smoothing folds into these two norms (and nothing else that is stored unquantized)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            key = f"model.layers.{i}.{norm}.weight"
            assert torch.equal(tensors[key], src[key]) != smoothed, key


def test_quantization_config(variant) -> None:
    name, out, gran, acts, fmt = variant
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["tie_word_embeddings"] is True
    if fmt == "hf-fp8":
        assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                      "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
        return
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "float-quantized"
    assert qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]
    assert list(qc["config_groups"]) == ["group_0"]
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    w = group["weights"]
    assert {k: w[k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == \
        {"num_bits": 8, "type": "float", "symmetric": True, "strategy": gran, "dynamic": False}
    if gran == "block":
        assert w["block_structure"] == [128, 128]
    a = group["input_activations"]
    if acts == "none":
        assert a is None
    else:
        want = {"dynamic": ("token", True), "static": ("tensor", False)}[acts]
        if gran == "block":
            want = ("group", True)
            assert a["group_size"] == 128
        assert (a["num_bits"], a["type"], a["symmetric"], a["strategy"], a["dynamic"]) == (8, "float", True, *want)
    for args in (w, a or {}):  # formats.md: keys older compressed-tensors loaders reject must be absent
        assert "scale_dtype" not in args and "zp_dtype" not in args
    # the library itself accepts the config
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(qc)


@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items() if v[1] == "tensor"])
def test_fused_groups_share_per_tensor_scales(name, fp8_run) -> None:
    """vLLM fuses q/k/v and gate/up and requantizes per-tensor shards to their max scale: they must agree."""
    _, out, *_ = _run_variant(name, fp8_run)
    tensors, _, _ = read_tensors(out / "model.safetensors")
    for i in range(N_LAYERS):
        for group in FUSED:
            for local in ("weight_scale", "input_scale"):
                vals = {float(tensors[f"model.layers.{i}.{n}.{local}"]) for n in group}
                assert len(vals) == 1, (i, group, local, vals)


def test_reloaded_weights_equal_own_dequantization(variant, source) -> None:
    """transformers (+ compressed-tensors) reloads the folder on CPU; after one forward every quantized Linear
    computes with q * scale exactly as our float64 reading of the file; lm_head stays tied to the embedding."""
    from transformers import AutoModelForCausalLM

    name, out, gran, acts, fmt = variant
    src, _ = source
    tensors, _, _ = read_tensors(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(1, 33).unsqueeze(0), use_cache=False).logits
    assert torch.isfinite(logits.float()).all()
    for module in linear_modules():
        scale = tensors[f"{module}.weight_scale_inv" if fmt == "hf-fp8" else f"{module}.weight_scale"]
        ours = own_dequant(tensors[f"{module}.weight"], scale, gran)
        theirs = model.get_submodule(module).weight
        assert theirs.dtype == torch.bfloat16, (module, theirs.dtype)
        assert torch.equal(theirs, ours), module
        if not name.startswith("smooth"):  # and it is FP8 close to the source weight
            w = src[f"{module}.weight"].double()
            assert float((ours.double() - w).norm() / w.norm()) < 0.05, module
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(model.model.embed_tokens.weight, src["model.embed_tokens.weight"])


def test_report_verification_passed(variant) -> None:
    name, out, *_ = variant
    report = json.loads((out / "qwenquant_report.json").read_text())
    v = report["verification"]
    assert v["passed"] is True, v
    assert v["weights_checked"] == len(linear_modules())
    assert v.get("weights_mismatched", []) == []
    assert report["evaluation"]["kl_vs_source"]["mean_kl"] < 0.01


def test_weights_file_is_readable_like_the_rest(variant) -> None:
    """model.safetensors gets the same permissions as config.json (safetensors alone would write it 0600)."""
    name, out, *_ = variant
    mode = stat.S_IMODE(os.stat(out / "model.safetensors").st_mode)
    assert mode == stat.S_IMODE(os.stat(out / "config.json").st_mode), oct(mode)


def test_sharded_output_reloads(tiny_qwen3, calib_txt, eval_text, tmp_path) -> None:
    """max_shard_size_mb (recipe only) splits the weights into model-0000i-of-0000n files with an index that
    transformers follows; the run's verification reloads the sharded folder."""
    from qwenquant.recipe import recipe_from_dict
    from qwenquant.runner.options import RunOptions
    from qwenquant.runner.run import run_recipe

    recipe = recipe_from_dict({
        "model": {"id": str(tiny_qwen3)},
        "calibration": {"dataset": str(calib_txt), "num_samples": 4, "seq_len": 64},
        "stages": [{"fp8": {"weights": "channel", "activations": "dynamic"}}],
        "export": {"format": "compressed-tensors", "max_shard_size_mb": 1},
        "eval": {"eval_text": str(eval_text), "window": 128, "max_windows": 1},
        "device": "cpu",
    })
    out = tmp_path / "sharded"
    report = run_recipe(recipe, RunOptions(out))
    assert report["verification"]["passed"] is True
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names, total = {}, 0
    for shard in shards:
        tensors, _, meta = read_tensors(out / shard)
        assert meta == {"format": "pt"}
        names.update({k: shard for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["weight_map"] == names
    assert index["metadata"]["total_size"] == total
    assert not (out / "model.safetensors").exists()
