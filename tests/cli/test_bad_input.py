"""Bad input through `qwenquant fp8`: documented exit code (2 bad input, 5 resources), exactly one
`qwenquant: error: ...` line naming the problem and the fix, and no output folder or `.partial` leftovers."""

from __future__ import annotations

import errno
import json
import shutil
import time
from pathlib import Path

import pytest
import torch


def assert_fails(res, code: int, *words: str) -> str:
    """Exit code, one error line (the last thing on stderr), containing every word (case-insensitive)."""
    assert res.code == code, (res.code, res.err[-2000:])
    assert len(res.error_lines) == 1, res.err[-2000:]
    line = res.error_lines[0]
    assert res.err.rstrip("\n").splitlines()[-1] == line  # no traceback or chatter after it
    for w in words:
        assert w.lower() in line.lower(), (w, line)
    return line


def assert_nothing_written(parent: Path, allowed: set[str] = frozenset()) -> None:
    left = {p.name for p in parent.iterdir()} - set(allowed)
    assert not left, f"left behind: {sorted(left)}"


@pytest.fixture
def fp8(cli, tiny_args, tmp_path):
    """fp8(*flags, model=None) -> CliResult; writes (if at all) to tmp_path/'work'/'out'."""
    work = tmp_path / "work"
    work.mkdir()

    def run(*flags, model: Path | None = None, out: Path | None = None):
        args = list(tiny_args)
        if model is not None:
            args[args.index("--model") + 1] = str(model)
        return cli(["fp8", *args, "--out", str(out or work / "out"), "--quiet", *flags])

    run.work = work
    return run


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


# ---- the model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["/nonexistent/qwen3-model", "./no-such-model-dir", "../no/such/dir"])
def test_missing_model_dir(fp8, ref, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_fails(fp8(model=ref), 2, ref, "no such directory")
    assert_nothing_written(fp8.work)


def test_model_dir_without_config(fp8, tmp_path) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    assert_fails(fp8(model=empty), 2, "no config.json", "--model")
    assert_nothing_written(fp8.work)


@pytest.mark.parametrize("content", ["[]", "{not json"])
def test_config_json_not_an_object(fp8, tiny_qwen3, tmp_path, content) -> None:
    model = _copy_model(tiny_qwen3, tmp_path / "badconfig")
    (model / "config.json").write_text(content)
    assert_fails(fp8(model=model), 2, "config.json")
    assert_nothing_written(fp8.work)


def test_model_path_is_a_file(fp8, tmp_path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    assert_fails(fp8(model=f), 2, "not a directory")
    assert_nothing_written(fp8.work)


def test_truncated_safetensors(fp8, tiny_qwen3, tmp_path) -> None:
    model = _copy_model(tiny_qwen3, tmp_path / "truncated")
    weights = model / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert_fails(fp8(model=model), 2, "model.safetensors", "corrupt or truncated", "re-download")
    assert_nothing_written(fp8.work)


def test_garbage_safetensors_header(fp8, tiny_qwen3, tmp_path) -> None:
    model = _copy_model(tiny_qwen3, tmp_path / "garbage")
    (model / "model.safetensors").write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_fails(fp8(model=model), 2, "corrupt or truncated")
    assert_nothing_written(fp8.work)


def test_wrong_architecture(fp8, tiny_qwen3, tmp_path) -> None:
    model = _copy_model(tiny_qwen3, tmp_path / "llama")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    config["model_type"] = "llama"
    (model / "config.json").write_text(json.dumps(config))
    assert_fails(fp8(model=model), 2, "LlamaForCausalLM", "not supported", "Qwen3ForCausalLM")
    assert_nothing_written(fp8.work)


def test_already_quantized_model(fp8, fp8_run) -> None:
    quantized = fp8_run().out_dir
    assert_fails(fp8(model=quantized), 2, "already quantized", "compressed-tensors", "bf16")
    assert_nothing_written(fp8.work)


def test_hub_id_offline_fails_fast(fp8, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))  # read at import time otherwise
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    t = time.perf_counter()
    res = fp8(model="Qwen3-4B")
    elapsed = time.perf_counter() - t
    assert_fails(res, 2, "Qwen/Qwen3-4B", "HF_HUB_OFFLINE", "local directory")
    assert elapsed < 15, f"took {elapsed:.1f}s: must not wait on the network"
    assert_nothing_written(fp8.work)


# ---- calibration -------------------------------------------------------------------------------------------------

CALIBRATED = ("--activations", "static")  # FP8 dynamic is data-free and reads no calibration data


def test_empty_calibration_file(fp8, tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    assert_fails(fp8("--calib", str(empty), *CALIBRATED), 2, "calibration data is empty", "--calib")
    assert_nothing_written(fp8.work)


def test_missing_calibration_file(fp8, tmp_path) -> None:
    assert_fails(fp8("--calib", str(tmp_path / "nope.txt"), *CALIBRATED), 2, "nope.txt", "does not exist")
    assert_nothing_written(fp8.work)


def test_builtin_calibration_missing(fp8, tmp_path, monkeypatch) -> None:
    """As in a wheel install today (the data is not packaged): a one-line error, not a FileNotFoundError."""
    monkeypatch.setattr("qwenquant.calibration.BUILTIN_DIR", tmp_path / "no-data")
    assert_fails(fp8("--calib", "builtin", *CALIBRATED), 2, "builtin calibration data is missing", "--calib")
    assert_nothing_written(fp8.work)


def test_calibration_too_short(fp8) -> None:
    line = assert_fails(fp8("--num-samples", "1000", "--seq-len", "2048", *CALIBRATED), 2, "too short", "--num-samples",
                        "--seq-len")
    assert "1000 x 2048" in line
    assert_nothing_written(fp8.work)


@pytest.mark.parametrize("flags,words", [
    (("--num-samples", "0"), ("num_samples", "positive")),
    (("--seq-len", "4"), ("seq_len", ">= 8")),
])
def test_bad_calibration_sizes(fp8, flags, words) -> None:
    assert_fails(fp8(*flags, *CALIBRATED), 2, *words)
    assert_nothing_written(fp8.work)


def test_missing_eval_text(fp8, tmp_path) -> None:
    assert_fails(fp8("--eval-text", str(tmp_path / "nope.txt")), 2, "--eval-text", "no such file")
    assert_nothing_written(fp8.work)


def test_eval_text_shorter_than_one_window(fp8, tmp_path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    assert_fails(fp8("--eval-text", str(short)), 2, "fewer than one window", "128")
    assert_nothing_written(fp8.work)


# ---- flags -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,words", [
    (("--weights", "foo"), ("--weights", "foo", "channel")),
    (("--activations", "bar"), ("--activations", "bar", "dynamic")),
    (("--format", "gguf"), ("--format", "gguf")),
    (("--smooth", "--smooth-alpha", "1.5"), ("alpha", "[0, 1]", "1.5")),
    (("--smooth", "--smooth-alpha", "-0.1"), ("alpha", "[0, 1]")),
    (("--weights", "block", "--activations", "static"), ("block", "dynamic")),
    (("--format", "hf-fp8"), ("hf-fp8", "block")),
    (("--block-size", "0"), ("block_size", "positive")),
    (("--bogus-flag",), ("--bogus-flag",)),
])
def test_bad_flags(fp8, flags, words) -> None:
    assert_fails(fp8(*flags), 2, *words)
    assert_nothing_written(fp8.work)


def test_json_error_summary(fp8) -> None:
    res = fp8("--weights", "foo", "--json")
    assert_fails(res, 2, "--weights")
    summary = json.loads(res.out)
    assert summary["ok"] is False and summary["exit_code"] == 2 and "--weights" in summary["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_gpu(fp8) -> None:
    assert_fails(fp8("--device", "cuda"), 2, "cuda", "--device cpu")
    assert_nothing_written(fp8.work)


def test_block_size_not_dividing_hidden(fp8) -> None:
    assert_fails(fp8("--weights", "block", "--block-size", "96"), 2, "block", "96")
    assert_nothing_written(fp8.work)


# ---- the output folder -------------------------------------------------------------------------------------------


def test_out_exists_without_overwrite(fp8) -> None:
    out = fp8.work / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_fails(fp8(), 2, str(out), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert_nothing_written(fp8.work, {"out"})


def test_out_is_a_file(fp8) -> None:
    out = fp8.work / "out"
    out.write_text("x")
    assert_fails(fp8(), 2, "is a file")
    assert out.read_text() == "x"


def test_overwrite_refuses_a_folder_that_is_not_a_qwenquant_output(fp8) -> None:
    out = fp8.work / "out"
    out.mkdir()
    (out / "precious.txt").write_text("not ours")
    assert_fails(fp8("--overwrite"), 2, str(out), "not a qwenquant output folder")
    assert (out / "precious.txt").read_text() == "not ours"


def test_overwrite_replaces_existing_folder(fp8) -> None:
    out = fp8.work / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    (out / "qwenquant_report.json").write_text("{}")
    res = fp8("--overwrite")
    assert res.code == 0, res.err[-2000:]
    names = {p.name for p in out.iterdir()}
    assert "stale.txt" not in names and {"model.safetensors", "qwenquant_report.json"} <= names
    assert_nothing_written(fp8.work, {"out"})


def _safetensors_io_error(code: int, text: str) -> Exception:
    """What safetensors 0.8 raises when a write fails (checked in test_safetensors_io_error_becomes_oserror)."""
    from safetensors import SafetensorError

    return SafetensorError(f"Error while serializing: I/O error: {text} (os error {code})")


DISK_ERRORS = {
    "oserror-enospc": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "safetensors-enospc": lambda: _safetensors_io_error(errno.ENOSPC, "No space left on device"),
    "oserror-edquot": lambda: OSError(errno.EDQUOT, "Disk quota exceeded"),
}


def _disk_full(monkeypatch, kind: str = "oserror-enospc") -> None:
    def full(*args, **kwargs):
        raise DISK_ERRORS[kind]()

    monkeypatch.setattr("qwenquant.export.writer.save_file", full)
    monkeypatch.setattr("safetensors.torch.save_file", full)
    if kind.startswith("oserror"):  # the streaming path writes its shards with os.pwrite
        monkeypatch.setattr("qwenquant.stream.shards.os.pwrite", full)


@pytest.mark.parametrize("kind", list(DISK_ERRORS))
def test_disk_full_while_writing(fp8, monkeypatch, kind) -> None:
    """OS errors on the (default) streaming path; safetensors' own errors on the in-memory path's writer."""
    _disk_full(monkeypatch, kind)
    assert_fails(fp8(*(["--no-stream"] if kind.startswith("safetensors") else [])), 5, "quota exceeded" if "edquot" in kind else "disk full", "free space")
    assert_nothing_written(fp8.work)


def test_safetensors_io_error_becomes_oserror(tmp_path) -> None:
    """A real failed write (file size limit, in a child process) reaches ShardWriter as SafetensorError with
    "(os error N)"; the writer turns it into OSError(N) so atomic_output_dir can classify ENOSPC/EDQUOT."""
    import subprocess
    import sys

    code = f"""
import resource, signal, errno, torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
from qwenquant.export.writer import ShardWriter
w = ShardWriter({str(tmp_path)!r}, 1 << 30)
w.add("a", torch.zeros(100000))
try:
    w.flush()
except OSError as err:
    print("OSError", err.errno == errno.EFBIG)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "OSError True", res.stdout + res.stderr[-2000:]


def test_disk_full_with_overwrite_keeps_old_folder(fp8, monkeypatch) -> None:
    out = fp8.work / "out"
    out.mkdir()
    (out / "previous.txt").write_text("previous run")
    (out / "qwenquant_report.json").write_text("{}")
    _disk_full(monkeypatch)
    assert_fails(fp8("--overwrite"), 5, "disk full")
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt", "qwenquant_report.json"]
    assert_nothing_written(fp8.work, {"out"})


def test_out_equal_to_model_is_refused(fp8, tiny_qwen3, tmp_path) -> None:
    model = _copy_model(tiny_qwen3, tmp_path / "victim")
    res = fp8("--overwrite", model=model, out=model)
    assert "quantization_config" not in json.loads((model / "config.json").read_text()), "source model was replaced"
    assert_fails(res, 2, "--out")  # refused as "not a qwenquant output" (or as overlapping the model)


def test_out_inside_model_is_refused(fp8, tiny_qwen3, tmp_path) -> None:
    model = _copy_model(tiny_qwen3, tmp_path / "victim")
    res = fp8(model=model, out=model / "fp8")
    assert_fails(res, 2, "--out", "overlaps the source model")
    assert not (model / "fp8").exists()
