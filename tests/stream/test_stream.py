"""The data-free streaming path writes the in-memory path's bytes, refuses broken sources in one line, and
verifies what it wrote."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from conftest import MINI, TOKENIZER_FILES, build_tiny_moe
from qwenquant.errors import BadInputError
from qwenquant.export.writer import ShardWriter
from qwenquant.stream.shards import ShardLayout
from qwenquant.stream.source import read_header

ALL_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2, torch.int16,
              torch.float16, torch.bfloat16, torch.int32, torch.float32, torch.int64, torch.float64]


def _digests(folder: Path) -> dict[str, str]:
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.index.json"))
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.parametrize("max_bytes", [700, 10**9])
def test_layout_writes_the_files_shardwriter_writes(tmp_path, max_bytes) -> None:
    """Every dtype, several shards, tensors written in reverse order and one in two pieces: same files."""
    g = torch.Generator().manual_seed(0)
    tensors = [(f"model.layers.{i}.t{j}", (torch.randn(7, 5, generator=g) * 50).to(d))
               for i in range(3) for j, d in enumerate(ALL_DTYPES)] + [("scalar", torch.tensor(3.0))]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    writer = ShardWriter(a, max_bytes)
    for name, t in tensors:
        writer.add(name, t)
    layout = ShardLayout([(n, t.dtype, tuple(t.shape)) for n, t in tensors], max_bytes)
    layout.create(b)
    first, *rest = reversed(tensors)
    layout.write(first[0], first[1])
    for name, t in rest:
        if t.dim() == 2:
            layout.write(name, t[:3])
            layout.write(name, t[3:], at=t[:3].numel() * t.element_size())
        else:
            layout.write(name, t)
    assert writer.finish() == layout.finish()
    assert _digests(a) == _digests(b) and len(_digests(a)) == (1 if max_bytes > 10**6 else len(layout.headers) + 1)


def test_layout_refuses_a_tensor_unlike_its_plan(tmp_path) -> None:
    layout = ShardLayout([("w", torch.bfloat16, (4, 4))], 10**6)
    layout.create(tmp_path)
    with pytest.raises(RuntimeError, match="planned"):
        layout.write("w", torch.zeros(4, 4))
    layout.close()


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("moe") / "tiny-moe"
    build_tiny_moe().save_pretrained(folder)
    for f in TOKENIZER_FILES:
        if (MINI / f).exists():
            shutil.copy(MINI / f, folder / f)
    return folder


CASES = {
    "fp8-channel": ["fp8"],
    "fp8-tensor-shared-scales": ["fp8", "--weights", "tensor"],
    "fp8-block": ["fp8", "--weights", "block", "--block-size", "32"],
    "fp8-weight-only": ["fp8", "--activations", "none", "--weights", "tensor"],
    "hf-fp8": ["fp8", "--weights", "block", "--block-size", "32", "--format", "hf-fp8"],
    "rtn-w4-g32": ["rtn", "--group-size", "32"],
    "rtn-w4-asym-gptq": ["rtn", "--group-size", "32", "--asym", "--format", "gptq"],
    "rtn-w4-awq": ["rtn", "--group-size", "32", "--asym", "--format", "awq"],
    "rtn-w8-channel": ["rtn", "--bits", "8", "--group-size", "-1"],
}


def _run_both(cli, model: Path, flags: list[str], tmp_path: Path, eval_text: Path):
    common = ["--model", str(model), "--eval-windows", "1", "--eval-window", "64", "--eval-text", str(eval_text),
              "--device", "cpu", "--quiet"]
    streamed = cli([*flags, *common, "--out", str(tmp_path / "streamed")])
    in_memory = cli([*flags, *common, "--out", str(tmp_path / "memory"), "--no-stream"])
    assert streamed.code == 0, streamed.err
    assert in_memory.code == 0, in_memory.err
    return tmp_path / "streamed", tmp_path / "memory"


def _quantization_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_checkpoint_equals_the_in_memory_one(cli, tiny_qwen3, eval_text, tmp_path, case) -> None:
    streamed, memory = _run_both(cli, tiny_qwen3, CASES[case], tmp_path, eval_text)
    assert _digests(streamed) == _digests(memory)
    assert _quantization_config(streamed) == _quantization_config(memory)
    for name in ("quantize_config.json", "generation_config.json", "tokenizer.json"):
        assert (streamed / name).is_file() == (memory / name).is_file()
    report = json.loads((streamed / "qwenquant_report.json").read_text())
    assert report["path"]["streamed"] is True and report["timings_s"].get("calibration_data") is None
    v = report["verification"]
    assert v["passed"] and v["mode"] == "streamed" and not v["weights_mismatched"]
    assert v["weights_checked"] == 14 and v["other_tensors_checked"] >= 2 * 4 + 2  # norms, embeddings
    memory_report = json.loads((memory / "qwenquant_report.json").read_text())
    assert memory_report["path"] == {"streamed": False, "why": ["--no-stream"]}
    # the same checkpoint, evaluated two ways (float32 from the stored values vs the in-memory model): close KL
    kl_s, kl_m = report["evaluation"]["kl_vs_source"]["mean_kl"], memory_report["evaluation"]["kl_vs_source"]["mean_kl"]
    assert abs(kl_s - kl_m) <= 0.2 * max(kl_s, kl_m) + 1e-4, (kl_s, kl_m)


@pytest.mark.parametrize("flags", [["fp8", "--weights", "tensor"], ["rtn", "--group-size", "32"]], ids=["fp8", "rtn"])
def test_streamed_moe_equals_in_memory(cli, tiny_moe, eval_text, tmp_path, flags) -> None:
    streamed, memory = _run_both(cli, tiny_moe, flags, tmp_path, eval_text)
    assert _digests(streamed) == _digests(memory)
    assert _quantization_config(streamed) == _quantization_config(memory)
    v = json.loads((streamed / "qwenquant_report.json").read_text())["verification"]
    assert v["passed"] and v["weights_checked"] == 2 * (4 + 8 * 3) + (4 + 3)  # 2 sparse layers, 1 dense


def test_calibrated_recipes_do_not_stream_and_say_why(fp8_run) -> None:
    r = fp8_run("--activations", "static", "--smooth")
    report = json.loads((r.out_dir / "qwenquant_report.json").read_text())
    assert report["path"]["streamed"] is False
    assert any("smooth" in why for why in report["path"]["why"])
    assert any("calibration" in why for why in report["path"]["why"])


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_is_refused_in_one_line(cli, tiny_qwen3, tmp_path) -> None:
    model = _copy_model(tiny_qwen3, tmp_path / "model")
    f = model / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    r = cli(["fp8", "--model", str(model), "--out", str(tmp_path / "out"), "--quiet"])
    assert r.code == 2 and len(r.error_lines) == 1, r.err
    assert "truncated" in r.err and "re-download" in r.err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_header_that_lies_about_sizes_is_refused(cli, tiny_qwen3, tmp_path) -> None:
    model = _copy_model(tiny_qwen3, tmp_path / "model")
    f = model / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k.endswith("q_proj.weight"))
    header[name]["shape"] = [header[name]["shape"][0] * 2, header[name]["shape"][1]]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    r = cli(["fp8", "--model", str(model), "--out", str(tmp_path / "out"), "--quiet"])
    assert r.code == 2 and len(r.error_lines) == 1, r.err
    assert "model.safetensors" in r.err and "re-download" in r.err
    assert not (tmp_path / "out").exists()
    with pytest.raises(BadInputError, match=f"{name}.*needs"):  # the streamer's own header check says which tensor
        read_header(f)


def test_nan_weight_is_refused_and_nothing_is_left(cli, tiny_qwen3, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model = _copy_model(tiny_qwen3, tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[name][3, 5] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    r = cli(["rtn", "--model", str(model), "--out", str(tmp_path / "out"), "--quiet"])
    assert r.code == 2 and len(r.error_lines) == 1, r.err
    assert name in r.err and "NaN" in r.err
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_no_evaluation_pass_when_nothing_is_asked(cli, tiny_qwen3, eval_text, tmp_path) -> None:
    """--no-ppl --no-verify --kl-tokens 0: the checkpoint alone (a pipeline that evaluates elsewhere)."""
    common = ["--model", str(tiny_qwen3), "--eval-text", str(eval_text), "--eval-window", "64", "--quiet"]
    r = cli(["fp8", *common, "--out", str(tmp_path / "a"), "--no-ppl", "--no-verify", "--kl-tokens", "0"])
    assert r.code == 0, r.err
    report = json.loads((tmp_path / "a" / "qwenquant_report.json").read_text())
    assert report["evaluation"]["kl_vs_source"] is None and report["verification"] is None
    assert "verify" not in report["timings_s"] and "not measured" in (tmp_path / "a" / "REPORT.md").read_text()
    b = cli(["fp8", *common, "--out", str(tmp_path / "b"), "--no-ppl", "--no-verify", "--no-stream"])
    assert b.code == 0 and _digests(tmp_path / "a") == _digests(tmp_path / "b")


@pytest.mark.parametrize("flags, words", [
    (["fp8", "--kl-tokens", "0"], "needs --no-verify"),
    (["gptq", "--kl-tokens", "0", "--no-verify"], "streamed runs only"),
    (["fp8", "--kl-tokens", "0", "--no-verify", "--no-stream"], "streamed runs only"),
])
def test_no_kl_is_refused_where_it_cannot_apply(cli, tiny_qwen3, tmp_path, flags, words) -> None:
    r = cli([*flags, "--model", str(tiny_qwen3), "--out", str(tmp_path / "out"), "--quiet"])
    assert r.code == 2 and len(r.error_lines) == 1 and words in r.error_lines[0], r.err
    assert not (tmp_path / "out").exists()
