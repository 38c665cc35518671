"""`qwenquant int8` end to end, in process, on the tiny random model: the default (GPTQ weights, smoothing with
per-layer searched alphas) and RTN / no-smoothing variants write compressed-tensors int-quantized folders that
transformers reloads bit for bit; the chosen alphas are in the report and recipe.yaml; bad input is one line,
exit 2, nothing written. On qwen3-mini (where KL means something) smoothing with searched alphas must not be worse
than no smoothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from qwenquant.export import ct_int8
from qwenquant.kernels import int8_linear
from test_bad_input import assert_fails, assert_nothing_written

LAYERS = 2
LINEAR_TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def int8_run(cli, tiny_args, tmp_path_factory):
    """int8_run(*flags) -> (CliResult, out folder), one run per flag list per module."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("int8-runs")

    def run(*flags: str):
        if flags not in cache:
            out = root / f"out{len(cache)}"
            cache[flags] = (cli(["int8", *tiny_args, "--out", str(out), "--quiet", *flags]), out)
        return cache[flags]

    return run


def _tensors(out: Path) -> dict:
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("flags,method,smooth", [
    ((), "gptq", "search"),
    (("--method", "rtn", "--no-alpha-search"), "rtn", "global"),
    (("--method", "rtn", "--no-smooth"), "rtn", None),
])
def test_int8_writes_a_verified_int_quantized_folder(int8_run, flags, method, smooth) -> None:
    res, out = int8_run(*flags)
    assert res.code == 0, res.err[-3000:]
    report = json.loads((out / "qwenquant_report.json").read_text())
    assert report["verification"]["passed"], report["verification"]
    streamed = smooth is None and method == "rtn"  # data-free: streamed, read back through the spec reader
    assert report["verification"]["loader"].startswith("qwenquant spec reader" if streamed else "transformers")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["ignore"] == ["lm_head"]
    assert qc["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"
    tensors = _tensors(out)
    for i in range(LAYERS):
        for t in LINEAR_TYPES:
            name = f"model.layers.{i}.{t}"
            assert tensors[f"{name}.weight"].dtype.is_floating_point is False  # int8 codes
            assert tensors[f"{name}.weight_scale"].shape[1] == 1
            w = ct_int8.read_linear({"weight": tensors[f"{name}.weight"],
                                     "weight_scale": tensors[f"{name}.weight_scale"]}, qc)
            assert w.shape == tensors[f"{name}.weight"].shape
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    stages = {k: v for st in recipe["stages"] for k, v in st.items()}
    assert stages["int8"] == {"method": method, "group_size": -1}
    if smooth == "search":  # the searched alphas are written into recipe.yaml and the report, the search off
        assert stages["smooth"]["alpha_search"] is False and sorted(stages["smooth"]["layer_alpha"]) == [0, 1]
        for i, layer in enumerate(report["layers"]):
            record = layer["smooth"]["alpha_search"]
            assert record["alpha"] == stages["smooth"]["layer_alpha"][i]
            assert record["error"] <= record["error_at_default"]
        assert "smooth alpha" in (out / "REPORT.md").read_text()
    elif smooth == "global":
        assert stages["smooth"]["layer_alpha"] == {} and stages["smooth"]["alpha"] == 0.5
    else:
        assert "smooth" not in stages


def test_rtn_streams_the_same_bytes_as_in_memory(int8_run) -> None:
    (res_a, a), (res_b, b) = int8_run("--method", "rtn", "--no-smooth"), int8_run("--method", "rtn", "--no-smooth",
                                                                                  "--no-stream")
    assert res_a.code == 0 and res_b.code == 0, (res_a.err[-2000:], res_b.err[-2000:])
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((b / "qwenquant_report.json").read_text())["verification"]["loader"].startswith("transformers")


def test_bench_runs_it_on_int_mm(int8_run, cli) -> None:
    """`qwenquant bench` on the written folder: every quantized Linear on torch._int_mm, the scheme named as the
    engines' (int8-w8a8, which the GPU projections check against each GPU)."""
    res, out = int8_run("--method", "rtn", "--no-smooth")
    assert res.code == 0
    bench = cli(["bench", str(out), "--batch-sizes", "1", "--context", "32", "--decode-tokens", "2", "--no-compile",
                 "--device", "cpu", "--quiet"])
    assert bench.code == 0, bench.err[-2000:]
    doc = json.loads((out / "bench" / "qwenquant_bench.json").read_text())
    assert doc["model"]["scheme"] == "int8-w8a8" and doc["model"]["activations"] == "token"
    for t in LINEAR_TYPES:
        assert list(doc["kernels"][t]) == [int8_linear.LABEL] and doc["kernels"][t][int8_linear.LABEL] == LAYERS
    assert {g["serving_scheme"] for g in doc["projections"]["gpus"]} == {"int8-w8a8"}


def test_default_output_folder_names(cli, tiny_args) -> None:
    from qwenquant.cli.int8 import folder_suffix
    from qwenquant.recipe_builder import quantize_recipe

    def suffix(sections: dict) -> str:
        return folder_suffix(quantize_recipe(sections))

    model = {"model": {"id": "m"}}
    assert suffix(model | {"smooth": {"alpha_search": True}, "int8": {}}) == "W8A8-INT8"
    assert suffix(model | {"smooth": {}, "int8": {}}) == "W8A8-INT8-SMOOTH"
    assert suffix(model | {"int8": {"method": "rtn"}}) == "W8A8-INT8-RTN-NOSMOOTH"


@pytest.fixture
def quant(cli, tiny_args, tmp_path):
    work = tmp_path / "work"
    work.mkdir()

    def run(*flags: str):
        return cli(["int8", *tiny_args, "--out", str(work / "out"), "--quiet", *flags])

    run.work = work
    return run


@pytest.mark.parametrize("flags,words", [
    (("--group-size", "128"), ("int8.group_size", "128", "per output channel", "-1")),
    (("--method", "awq"), ("--method", "awq", "gptq")),
    (("--smooth-alpha", "1.5"), ("smooth.alpha", "[0, 1]")),
    (("--format", "gptq"), ("--format", "gptq", "compressed-tensors")),
    (("--keep-sensitive", "1"), ("keep_sensitive", "int8", "mixed_precision.keep")),
])
def test_bad_input_is_one_line_and_writes_nothing(quant, flags, words) -> None:
    assert_fails(quant(*flags), 2, *words)
    assert_nothing_written(quant.work)


def test_int8_on_qwen3_mini_smoothing_helps(cli, mini_model, calib_txt, tmp_path) -> None:
    """The trained fixture: smoothing with searched alphas gives a lower KL than no smoothing (RTN weights, so
    the difference is the activations'), both far below verification's threshold."""
    args = ["--model", str(mini_model), "--calib", str(calib_txt), "--num-samples", "8", "--seq-len", "256",
            "--eval-windows", "1", "--kl-tokens", "2048", "--device", "cpu", "--method", "rtn", "--quiet"]
    kl = {}
    for label, flags in (("smooth", ()), ("none", ("--no-smooth", "--no-stream"))):
        res = cli(["int8", *args, "--out", str(tmp_path / label), *flags])
        assert res.code == 0, res.err[-3000:]
        report = json.loads((tmp_path / label / "qwenquant_report.json").read_text())
        assert report["verification"]["passed"]
        kl[label] = report["evaluation"]["kl_vs_source"]["mean_kl"]
    print(f"qwen3-mini INT8 W8A8 RTN mean KL: no smoothing {kl['none']:.4g}, searched smoothing {kl['smooth']:.4g}")
    assert kl["smooth"] < kl["none"] < 0.1
