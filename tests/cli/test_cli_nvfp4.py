"""`qwenquant nvfp4` end to end, in process, on the tiny random model: both forms (W4A4 and weight-only NVFP4A16),
round-to-nearest and GPTQ, write a folder that verifies (transformers reloads it on the CPU, weights bit for bit,
and the W4A4 checkpoint's simulated FP4 activations agree with compressed-tensors' own); the default folder names;
bad input (group size, a Linear whose input features are not a multiple of 16) is one line, exit 2, no output;
`qwenquant bench` runs the folder dequantized, labelled so."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors import safe_open

from conftest import MINI, build_tiny_qwen3
from test_bad_input import assert_fails, assert_nothing_written

TRANSFORMERS = "transformers.AutoModelForCausalLM"
SPEC_READER = "qwenquant spec reader for compressed-tensors"


@pytest.fixture(scope="module")
def runs(tiny_qwen3, calib_txt, eval_text, tmp_path_factory):
    """runs(*flags) -> (CliResult, out folder) of `qwenquant nvfp4` on the tiny model, once per flag list."""
    from conftest import run_cli, small_args

    cache: dict = {}
    root = tmp_path_factory.mktemp("nvfp4-runs")

    def run(*flags: str):
        if flags not in cache:
            out = root / f"run{len(cache)}"
            cache[flags] = (run_cli(["nvfp4", *small_args(tiny_qwen3, calib_txt, eval_text), "--out", out,
                                     "--quiet", *flags]), out)
        return cache[flags]

    return run


@pytest.mark.parametrize("flags, w4a4, reader", [
    ((), True, TRANSFORMERS),
    (("--method", "gptq"), True, TRANSFORMERS),
    (("--activations", "none"), False, SPEC_READER),  # data-free: streamed, verified through the spec reader
    (("--activations", "none", "--no-stream"), False, TRANSFORMERS),
    (("--activations", "none", "--method", "gptq"), False, TRANSFORMERS),
])
def test_forms_write_a_folder_that_verifies(runs, flags, w4a4: bool, reader: str) -> None:
    res, out = runs(*flags)
    assert res.code == 0, res.err[-3000:]
    report = json.loads((out / "qwenquant_report.json").read_text())
    v = report["verification"]
    assert v["passed"] is True and v["loader"].startswith(reader), v
    assert not v["weights_mismatched"]
    if reader == TRANSFORMERS:
        # transformers' forward (compressed-tensors decompresses the weights and, for W4A4, quantizes each Linear's
        # input with the stored input_global_scale) gives exactly our in-memory model's log-probs
        assert v["vs_quantized_in_memory"]["mean_kl"] == 0.0, v
    assert 0 < report["evaluation"]["kl_vs_source"]["mean_kl"] < 0.05
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized"
    assert (qc["config_groups"]["group_0"]["input_activations"] is not None) == w4a4
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        p = "model.layers.1.mlp.down_proj."
        assert f.get_slice(p + "weight_packed").get_shape() == [128, 192]  # [N, K/2]
        assert f.get_slice(p + "weight_scale").get_dtype() == "F8_E4M3"
        assert f.get_slice(p + "weight_scale").get_shape() == [128, 24]
        assert f.get_slice(p + "weight_global_scale").get_dtype() == "F32"
    assert (p + "input_global_scale" in keys) == w4a4
    assert p + "weight" not in keys and "model.embed_tokens.weight" in keys
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["nvfp4"]["activations"] == \
        ("dynamic" if w4a4 else "none")


def test_w4a4_costs_more_than_weight_only(runs) -> None:
    """FP4 activations add error on top of the same weights (RTN: identical weights in both folders)."""
    kl = {acts: json.loads((runs(*f)[1] / "qwenquant_report.json").read_text())["evaluation"]["kl_vs_source"]["mean_kl"]
          for acts, f in (("w4a4", ()), ("a16", ("--activations", "none", "--no-stream")))}
    assert kl["w4a4"] > kl["a16"], kl


def test_default_output_names(cli, tiny_args, tiny_qwen3, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for flags, suffix in (((), "NVFP4"), (("--activations", "none"), "NVFP4A16"),
                          (("--method", "gptq"), "NVFP4-GPTQ")):
        res = cli(["nvfp4", *tiny_args, "--quiet", "--no-ppl", *flags])
        assert res.code == 0, res.err[-2000:]
        assert (tmp_path / f"{tiny_qwen3.name}-{suffix}" / "config.json").exists()


def test_bad_group_size(cli, tiny_args, tmp_path) -> None:
    res = cli(["nvfp4", *tiny_args, "--group-size", "32", "--out", tmp_path / "out"])
    assert_fails(res, 2, "nvfp4.group_size", "16")
    assert_nothing_written(tmp_path)


@pytest.fixture(scope="module")
def inter200(tmp_path_factory):
    """Tiny Qwen3 with intermediate 200: down_proj has K = 200, not a multiple of 16."""
    if not MINI.exists():
        pytest.skip("qwen3-mini (its tokenizer is reused by the tiny random model) not found")
    return build_tiny_qwen3(tmp_path_factory.mktemp("odd") / "inter200", MINI, intermediate_size=200)


def test_unpackable_linear_refused_or_kept_when_asked(cli, inter200, calib_txt, eval_text, tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = ["--model", inter200, "--calib", calib_txt, "--num-samples", "4", "--seq-len", "64", "--eval-windows", "1",
            "--eval-window", "128", "--eval-text", eval_text, "--device", "cpu", "--quiet"]
    res = cli(["nvfp4", *args, "--out", work / "out"])
    assert_fails(res, 2, "mlp.down_proj", "200", "multiple of 16", "mixed_precision")
    assert_nothing_written(work)
    # asked to keep them in bf16 (a recipe's keep list): the run writes them unquantized and lists them in ignore
    keep = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    recipe = {"version": 1, "model": {"id": str(inter200)},
              "calibration": {"dataset": str(calib_txt), "num_samples": 4, "seq_len": 64},
              "stages": [{"mixed_precision": {"keep": keep}}, {"nvfp4": {"activations": "dynamic"}}],
              "eval": {"eval_text": str(eval_text), "max_windows": 1, "window": 128}, "device": "cpu"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = cli(["run", tmp_path / "r.yaml", "--out", work / "kept", "--quiet"])
    assert res.code == 0, res.err[-3000:]
    qc = json.loads((work / "kept" / "config.json").read_text())["quantization_config"]
    assert set(keep) <= set(qc["ignore"])
    with safe_open(str(work / "kept" / "model.safetensors"), "pt") as f:
        assert f.get_slice(keep[0] + ".weight").get_dtype() == "BF16"
        assert "model.layers.0.mlp.up_proj.weight_packed" in set(f.keys())
    assert json.loads((work / "kept" / "qwenquant_report.json").read_text())["verification"]["passed"]


def test_refused_combinations(cli, tiny_args, tmp_path) -> None:
    assert_fails(cli(["nvfp4", *tiny_args, "--compensate", "--out", tmp_path / "o"]), 2, "compensate", "nvfp4")
    assert_fails(cli(["nvfp4", *tiny_args, "--keep-sensitive", "1", "--out", tmp_path / "o"]), 2,
                 "keep_sensitive", "NVFP4")
    assert_nothing_written(tmp_path)


def test_bench_dequantizes_and_labels(runs, cli, tmp_path) -> None:
    _, out = runs()
    res = cli(["bench", out, "--batch-sizes", "1", "--context", "32", "--decode-tokens", "2", "--device", "cpu",
               "--out", tmp_path / "b", "--quiet"])
    assert res.code == 0, res.err[-3000:]
    doc = json.loads((tmp_path / "b" / "qwenquant_bench.json").read_text())
    text = json.dumps(doc)
    assert "NVFP4 checkpoint: dequantized to bf16 at load" in text and "FP4 activations not simulated" in text
