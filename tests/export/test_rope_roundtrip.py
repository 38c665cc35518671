"""RoPE scaling survives every export format: a tiny Qwen3 with YaRN (factor 2, original 512 positions, 1024 max)
goes through quantize + export + reload, and the reloaded config's rope settings equal the source's; the GGUF's
llama.cpp keys are read back with gguf-py and, where llama-cpp-python is installed, by llama.cpp itself."""

from __future__ import annotations

import json

import pytest

from conftest import MINI, build_tiny_qwen3, small_args

YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512, "rope_theta": 1000000.0}
RUNS = {
    "fp8 compressed-tensors (streamed)": ["fp8"],
    "fp8 block hf-fp8": ["fp8", "--weights", "block", "--format", "hf-fp8"],
    "gptq compressed-tensors": ["gptq"],
    "gptq v1": ["gptq", "--format", "gptq"],
    "awq gemm": ["awq", "--format", "awq"],
    "int8 w8a8": ["int8", "--method", "rtn", "--no-smooth"],
    "nvfp4": ["nvfp4", "--method", "rtn"],
}


@pytest.fixture(scope="module")
def yarn_model(tmp_path_factory, mini_model):
    return build_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-yarn", MINI, max_position_embeddings=1024,
                            rope_parameters=dict(YARN))


@pytest.fixture(scope="module")
def legacy_yarn_model(tmp_path_factory, yarn_model):
    """The same model with config.json as Qwen's model cards tell users to enable YaRN (transformers 4 keys)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-yarn-legacy"
    folder.mkdir()
    for f in yarn_model.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "config.json").unlink()
    cfg = json.loads((yarn_model / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = YARN["rope_theta"]
    cfg["rope_scaling"] = {k: v for k, v in YARN.items() if k != "rope_theta"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _rope(folder):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    return dict(cfg.rope_parameters), cfg.max_position_embeddings


@pytest.mark.parametrize("name", list(RUNS))
def test_yarn_survives_export(name, cli, yarn_model, calib_txt, eval_text, tmp_path):
    out = tmp_path / "out"
    res = cli([*RUNS[name], *small_args(yarn_model, calib_txt, eval_text), "--out", out, "--quiet"])
    assert res.code == 0, res.err
    written = json.loads((out / "config.json").read_text())
    assert written["rope_parameters"] == YARN and written["max_position_embeddings"] == 1024
    assert _rope(out) == _rope(yarn_model) == (YARN, 1024)


def test_legacy_rope_scaling_survives_export(cli, legacy_yarn_model, calib_txt, eval_text, tmp_path):
    out = tmp_path / "out"
    res = cli(["fp8", *small_args(legacy_yarn_model, calib_txt, eval_text), "--out", out, "--quiet"])
    assert res.code == 0, res.err
    assert _rope(out) == _rope(legacy_yarn_model) == (YARN, 1024)


def test_yarn_survives_gguf(cli, yarn_model, calib_txt, eval_text, tmp_path):
    gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install gguf)")
    out = tmp_path / "out"
    res = cli(["gptq", *small_args(yarn_model, calib_txt, eval_text), "--group-size", "32", "--format", "gguf",
               "--out", out, "--quiet"])
    assert res.code == 0, res.err
    reader = gguf.GGUFReader(out / "model.gguf")
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("qwen3.")}
    assert meta["qwen3.rope.scaling.type"] == "yarn"
    assert meta["qwen3.rope.scaling.factor"] == 2.0
    assert meta["qwen3.rope.scaling.original_context_length"] == 512
    assert meta["qwen3.context_length"] == 1024 and meta["qwen3.rope.freq_base"] == 1e6
    try:
        import llama_cpp
    except ImportError:
        return  # gguf-py's reading above is the check without llama.cpp
    llm = llama_cpp.Llama(str(out / "model.gguf"), n_ctx=64, verbose=False)
    try:
        assert llm._model.n_ctx_train() == 1024  # llama.cpp read context_length
        assert llm.metadata["qwen3.rope.scaling.type"] == "yarn"
        assert float(llm.metadata["qwen3.rope.scaling.factor"]) == 2.0
    finally:
        llm.close()
