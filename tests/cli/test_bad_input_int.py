"""Bad input through `qwenquant gptq | awq | rtn`: exit 2, exactly one `qwenquant: error: ...` line naming the
problem and the fix, no traceback, and no output folder (or `.partial` leftovers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import MINI, build_tiny_qwen3
from test_bad_input import assert_fails, assert_nothing_written


@pytest.fixture
def quant(cli, tiny_qwen3, calib_txt, eval_text, tmp_path):
    """quant(cmd, *flags, model=None) -> CliResult; writes (if at all) to tmp_path/'work'/'out'."""
    work = tmp_path / "work"
    work.mkdir()

    def run(cmd: str, *flags: str, model: Path | None = None):
        args = ["--model", str(model or tiny_qwen3), "--eval-windows", "1", "--eval-window", "128",
                "--eval-text", str(eval_text), "--device", "cpu"]
        if cmd != "rtn":
            args += ["--calib", str(calib_txt), "--num-samples", "4", "--seq-len", "64"]
        return cli([cmd, *args, "--out", str(work / "out"), "--quiet", *flags])

    run.work = work
    return run


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def _edit_weights(model: Path, edit) -> None:
    path = model / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen3 variants with shapes the INT layouts cannot all take:
    - inter320: intermediate 320, so down_proj has K = 320 (not a multiple of 128);
    - hd34: head_dim 34, so k/v_proj have N = 68 (not a multiple of 8) and o_proj K = 136 (not of 32)."""
    if not MINI.exists():
        pytest.skip("qwen3-mini (its tokenizer is reused by the tiny random model) not found")
    root = tmp_path_factory.mktemp("odd-models")
    return {
        "inter320": build_tiny_qwen3(root / "inter320", MINI, intermediate_size=320),
        "hd34": build_tiny_qwen3(root / "hd34", MINI, head_dim=34),
    }


# ---- flags the recipe refuses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["gptq", "awq", "rtn"])
def test_unsupported_bit_width(quant, cmd) -> None:
    line = assert_fails(quant(cmd, "--bits", "5"), 2, "bits", "5", "2, 3, 4, 8")
    assert "not allowed" in line
    assert_nothing_written(quant.work)


@pytest.mark.parametrize("cmd", ["gptq", "awq", "rtn"])
def test_unsupported_group_size(quant, cmd) -> None:
    assert_fails(quant(cmd, "--group-size", "100"), 2, "group_size", "100", "-1, 32, 64, 128")
    assert_nothing_written(quant.work)


@pytest.mark.parametrize("cmd,flags,words", [
    ("gptq", ("--format", "awq", "--act-order", "group"), ("awq", "act-order 'group'", "static", "format gptq")),
    ("gptq", ("--format", "compressed-tensors", "--act-order", "group"),
     ("compressed-tensors", "act-order 'group'", "static", "format gptq")),
    # the default format is compressed-tensors
    ("gptq", ("--act-order", "group"), ("compressed-tensors", "act-order 'group'", "format gptq")),
    ("gptq", ("--format", "gptq", "--bits", "3"), ("gptq", "bits 3", "2, 4 or 8", "compressed-tensors")),
    ("gptq", ("--dampening", "1.5"), ("dampening", "[0, 1)", "1.5")),
    ("gptq", ("--act-order", "foo"), ("--act-order", "foo", "static")),
    ("awq", ("--format", "onnx"), ("--format", "onnx", "compressed-tensors")),
    # rtn takes calibration flags for its data-dependent options (scale search, compensation, keep-sensitive)
    ("rtn", ("--scale-search", "--calib", "x.txt"), ("x.txt", "does not exist")),
])
def test_bad_int_flags(quant, cmd, flags, words) -> None:
    assert_fails(quant(cmd, *flags), 2, *words)
    assert_nothing_written(quant.work)


@pytest.mark.parametrize("cmd", ["awq", "gptq", "rtn"])
def test_awq_format_needs_4_bits(quant, cmd) -> None:
    """The problem is named ("awq stores 4-bit weights only, got bits 3")."""
    assert_fails(quant(cmd, "--format", "awq", "--bits", "3"), 2, "awq", "4-bit", "bits 3")
    assert_nothing_written(quant.work)


def test_awq_format_bits_error_names_a_fix(quant) -> None:
    assert_fails(quant("awq", "--format", "awq", "--bits", "3"), 2, "bits 3", "compressed-tensors")


# ---- shapes the layout cannot take -------------------------------------------------------------------------------


def test_group_size_not_dividing_in_features(quant, odd_models) -> None:
    """Refused up front (run.check_layout), before the model is loaded or calibrated."""
    res = quant("gptq", "--group-size", "128", model=odd_models["inter320"])
    assert_fails(res, 2, "mlp.down_proj", "320", "--group-size 128", "-1")
    assert_nothing_written(quant.work)
    # a divisor of every width works on the same model
    assert quant("awq", "--group-size", "64", "--no-verify", "--no-ppl", model=odd_models["inter320"]).code == 0


def test_gptq_format_needs_out_features_multiple_of_8(quant, odd_models) -> None:
    res = quant("gptq", "--format", "gptq", "--group-size", "-1", model=odd_models["hd34"])
    assert_fails(res, 2, "k_proj", "68 output features", "gptq", "compressed-tensors")
    assert_nothing_written(quant.work)


@pytest.mark.parametrize("flags,words", [
    (("--asym", "--group-size", "-1"), ("k_proj", "68")),  # zero points pack 8 per word along N
    (("--bits", "3", "--group-size", "-1"), ("o_proj", "136")),  # 136 x 3 bits is not whole int32 words
])
def test_pack_quantized_word_filling_checked_up_front(quant, odd_models, flags, words) -> None:
    assert_fails(quant("gptq", *flags, model=odd_models["hd34"]), 2, *words)
    assert_nothing_written(quant.work)


# ---- the weights -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("cmd", ["gptq", "awq"])
def test_non_finite_source_weight(quant, tiny_qwen3, tmp_path, cmd, value) -> None:
    model = _copy_model(tiny_qwen3, tmp_path / "broken")

    def poison(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = value

    _edit_weights(model, poison)
    line = assert_fails(quant(cmd, model=model), 2, "model.layers.1.mlp.up_proj.weight", "NaN or Inf")
    assert "re-download" in line or "re-export" in line
    assert_nothing_written(quant.work)


@pytest.mark.parametrize("cmd,flags", [("gptq", ("--asym",)), ("awq", ())])  # awq is asymmetric by default
def test_gptq_format_zero_point_0(quant, tiny_qwen3, tmp_path, cmd, flags) -> None:
    """One all-positive weight row: its asymmetric group has min 0, so z = 0."""
    model = _copy_model(tiny_qwen3, tmp_path / "positive-row")

    def positive_row(tensors):
        w = tensors["model.layers.0.self_attn.q_proj.weight"]
        w[0] = w[0].abs() + 0.01

    _edit_weights(model, positive_row)
    assert_fails(quant(cmd, *flags, "--format", "gptq", model=model), 2, "zero point", "compressed-tensors")
    assert_nothing_written(quant.work)


# ---- calibration -------------------------------------------------------------------------------------------------


def test_rtn_needs_no_calibration_data(quant, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("qwenquant.calibration.BUILTIN_DIR", tmp_path / "no-data")
    res = quant("rtn")
    assert res.code == 0, res.err[-2000:]


def test_calibration_error_for_gptq(quant, tmp_path, monkeypatch) -> None:
    """Commands that do take --calib get the same one-line calibration errors as fp8."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_fails(quant("gptq", "--calib", str(empty)), 2, "calibration data is empty", "--calib")
    assert_fails(quant("awq", "--num-samples", "1000", "--seq-len", "2048"), 2, "too short", "--num-samples")
    assert_nothing_written(quant.work)
