"""`--dry-run` before the weights are downloaded: a folder holding only config.json (with or without a tokenizer) is
sized from the architecture, a hub id not in the local cache from its config.json and the safetensors headers read
from the hub (huggingface_hub mocked here: no network), HF_HUB_OFFLINE with nothing cached is one line (exit 2), and
a real run still refuses a folder without weights. The numbers must equal those of the same model with its weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from conftest import MINI, TOKENIZER_FILES, build_tiny_moe
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

import qwenquant.estimate.probe as probe_mod
from qwenquant.estimate.facts import NO_WEIGHTS_NOTE

REPO = "org/tiny-qwen3"


@pytest.fixture
def quick_probe(monkeypatch):
    """Fixed rates instead of the few-second speed probe (sizes and memory do not depend on it)."""
    rates = probe_mod.Probe(device="cpu", threads=1, layer_s_per_token=1e-5, attn_s_per_token2=1e-9,
                            layer_s_per_call=1e-3, lm_head_s_per_token=1e-5, fp32_gflops=50.0,
                            logits_s_per_element=1e-9, kl_s_per_element=1e-9, act_quant_s_per_element=1e-9,
                            quant_s_per_weight=1e-8, quant_s_per_linear=1e-3, export_s_per_weight=1e-8,
                            isfinite_s_per_weight=1e-9, seconds=0.0)
    monkeypatch.setattr(probe_mod, "run_probe", lambda *args, **kwargs: rates)


def _config_only(model: Path, folder: Path, tokenizer: bool) -> Path:
    """`folder` with `model`'s config.json (and its tokenizer files), no weights."""
    folder.mkdir(parents=True)
    shutil.copy(model / "config.json", folder / "config.json")
    for f in TOKENIZER_FILES if tokenizer else ():
        if (model / f).exists():
            shutil.copy(model / f, folder / f)
    return folder


def _with_model(args: list[str], model) -> list[str]:
    args = list(args)
    args[args.index("--model") + 1] = str(model)
    return args


def _estimate(cli, args: list[str], out: Path, *flags: str) -> dict:
    res = cli(["gptq", *args, "--out", str(out), "--dry-run", "--json", *flags])
    assert res.code == 0, res.err[-2000:]
    return json.loads(res.out)


def _assert_same_numbers(derived: dict, real: dict, same_tokenizer: bool = True) -> None:
    """Everything a config.json or the hub's headers decide equals the local-weights estimate; the source's size
    on disk only to its header's estimate (the process RSS and the probe differ between two runs of a process).
    Without the same tokenizer the evaluation windows differ, and with them the log-prob and KL memory."""
    assert derived["timings_s"]["stages"] == pytest.approx(real["timings_s"]["stages"], rel=1e-9)
    assert derived["model"]["parameters"] == real["model"]["parameters"]
    assert derived["sizes"]["quantized_tensor_bytes"] == real["sizes"]["quantized_tensor_bytes"]
    assert derived["sizes"]["other_tensor_bytes"] == real["sizes"]["other_tensor_bytes"]
    assert derived["sizes"]["tensors"] == real["sizes"]["tensors"]
    assert derived["sizes"]["output_bytes"] == pytest.approx(real["sizes"]["output_bytes"], rel=1e-4)
    assert derived["sizes"]["source_bytes"] == pytest.approx(real["sizes"]["source_bytes"], rel=1e-3)
    assert derived["memory"]["host_phases"].keys() == real["memory"]["host_phases"].keys()
    if not same_tokenizer:
        return
    d_parts, r_parts = derived["memory"]["peak_host_breakdown"], real["memory"]["peak_host_breakdown"]
    assert {k: v for k, v in d_parts.items() if k != "process"} == {k: v for k, v in r_parts.items() if k != "process"}
    assert derived["memory"]["peak_host_phase"] == real["memory"]["peak_host_phase"]
    assert derived["disk"]["journal_bytes"] == real["disk"]["journal_bytes"]


def test_config_only_folder_equals_the_model_with_weights(cli, tiny_args, tiny_qwen3, tmp_path, quick_probe) -> None:
    real = _estimate(cli, tiny_args, tmp_path / "out")
    folder = _config_only(tiny_qwen3, tmp_path / "config-only", tokenizer=True)
    derived = _estimate(cli, _with_model(tiny_args, folder), tmp_path / "out")
    _assert_same_numbers(derived, real)
    assert derived["run"] == real["run"]  # same tokenizer: same evaluation windows
    assert derived["model"]["sizes_from"] == "config.json" and real["model"]["sizes_from"] == "safetensors headers"
    assert NO_WEIGHTS_NOTE in derived["notes"] and NO_WEIGHTS_NOTE not in real["notes"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", *TOKENIZER_FILES])  # nothing written

    res = cli(["gptq", *_with_model(tiny_args, folder), "--out", str(tmp_path / "out"), "--dry-run"])
    assert res.code == 0 and NO_WEIGHTS_NOTE in res.out.replace("\n", " ")


def test_config_only_moe_equals_the_model_with_weights(cli, tiny_args, tmp_path, quick_probe) -> None:
    """Qwen3-MoE: routers, per-expert projections and the dense (mlp_only_layers) layer all derived."""
    model = tmp_path / "moe"
    build_tiny_moe().save_pretrained(model)
    for f in TOKENIZER_FILES:
        if (MINI / f).exists():
            shutil.copy(MINI / f, model / f)
    flags = ("--group-size", "32")
    real = _estimate(cli, _with_model(tiny_args, model), tmp_path / "out", *flags)
    derived = _estimate(cli, _with_model(tiny_args, _config_only(model, tmp_path / "cfg", True)), tmp_path / "out",
                        *flags)
    _assert_same_numbers(derived, real)
    assert derived["sizes"]["quantized_linears"] == real["sizes"]["quantized_linears"] == 2 * (4 + 8 * 3) + 7


def test_config_only_without_tokenizer_estimates_eval_tokens(cli, tiny_args, tiny_qwen3, tmp_path,
                                                             quick_probe) -> None:
    real = _estimate(cli, tiny_args, tmp_path / "out")
    folder = _config_only(tiny_qwen3, tmp_path / "bare", tokenizer=False)
    derived = _estimate(cli, _with_model(tiny_args, folder), tmp_path / "out")
    note = next(n for n in derived["notes"] if n.startswith("no tokenizer in"))
    assert "evaluation tokens estimated" in note
    text = Path(tiny_args[tiny_args.index("--eval-text") + 1]).read_text(encoding="utf-8")
    assert derived["run"]["eval_text_tokens"] == int(len(text) / 4.3)
    assert derived["run"]["eval_text_tokens"] == pytest.approx(real["run"]["eval_text_tokens"], rel=0.5)
    assert derived["sizes"]["output_bytes"] == pytest.approx(real["sizes"]["output_bytes"], rel=1e-4)


def test_config_without_dtype_assumes_bf16_and_says_so(cli, tiny_args, tiny_qwen3, tmp_path, quick_probe) -> None:
    folder = _config_only(tiny_qwen3, tmp_path / "nodtype", tokenizer=True)
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    data = _estimate(cli, _with_model(tiny_args, folder), tmp_path / "out")
    assert "config.json names no dtype: the weights are assumed bf16" in data["notes"]
    assert data["sizes"]["source_bytes"] > 0


def test_a_real_run_still_refuses_a_folder_without_weights(cli, tiny_args, tiny_qwen3, tmp_path) -> None:
    folder = _config_only(tiny_qwen3, tmp_path / "config-only", tokenizer=True)
    res = cli(["rtn", *_with_model(tiny_args, folder), "--out", str(tmp_path / "out")])
    assert res.code == 2 and len(res.error_lines) == 1
    assert "no *.safetensors files" in res.error_lines[0] and "convert .bin weights first" in res.error_lines[0]
    assert not (tmp_path / "out").exists()


def test_dry_run_refuses_bin_weights_as_the_run_does(cli, tiny_args, tiny_qwen3, tmp_path, quick_probe) -> None:
    """Weights present but not as safetensors are not "before download": the run would refuse them."""
    folder = _config_only(tiny_qwen3, tmp_path / "bin", tokenizer=True)
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 64)
    res = cli(["gptq", *_with_model(tiny_args, folder), "--out", str(tmp_path / "out"), "--dry-run"])
    assert res.code == 2 and len(res.error_lines) == 1 and "convert .bin weights first" in res.error_lines[0]


# -- a hub id not in the local cache --------------------------------------------------------------------------------


def _hub_metadata(model: Path) -> SafetensorsRepoMetadata:
    """What get_safetensors_metadata returns for a repo holding `model`'s safetensors (read from its headers)."""
    import struct

    files = {}
    for f in sorted(model.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        tensors = {k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
                   for k, v in header.items() if k != "__metadata__"}
        files[f.name] = SafetensorsFileMetadata(metadata=header.get("__metadata__", {}), tensors=tensors)
    weight_map = {t: name for name, fm in files.items() for t in fm.tensors}
    return SafetensorsRepoMetadata(metadata=None, sharded=len(files) > 1, weight_map=weight_map, files_metadata=files)


@pytest.fixture
def mocked_hub(monkeypatch, tmp_path, tiny_qwen3):
    """huggingface_hub with nothing cached and a remote repo REPO holding the tiny model: records every call."""
    calls: list[tuple] = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(("snapshot_download", repo_id, kwargs.get("local_files_only")))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        raise AssertionError("--dry-run must not download a snapshot")

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append(("hf_hub_download", repo_id, filename, kwargs.get("revision")))
        assert filename == "config.json", filename
        snap = tmp_path / "hub-cache" / "snapshots" / "0123abc"
        snap.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_qwen3 / filename, snap / filename)
        return str(snap / filename)

    def get_safetensors_metadata(repo_id, **kwargs):
        calls.append(("get_safetensors_metadata", repo_id, kwargs.get("revision")))
        return _hub_metadata(tiny_qwen3)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", get_safetensors_metadata)
    return calls


def test_hub_id_not_cached_is_sized_from_the_hub_headers(cli, tiny_args, tmp_path, quick_probe, mocked_hub) -> None:
    real = _estimate(cli, tiny_args, tmp_path / "out")
    mocked_hub.clear()
    remote = _estimate(cli, _with_model(tiny_args, REPO), tmp_path / "out", "--revision", "v1")
    assert [c[0] for c in mocked_hub] == ["snapshot_download", "hf_hub_download", "get_safetensors_metadata"]
    assert mocked_hub[0][2] is True and mocked_hub[1][3] == "v1" and mocked_hub[2][2] == "v1"
    _assert_same_numbers(remote, real, same_tokenizer=False)  # only config.json was fetched: no tokenizer
    assert remote["model"]["sizes_from"] == "hub safetensors headers"
    assert "sizes from the hub's safetensors headers: weights not downloaded" in remote["notes"]
    assert any(n.startswith("no tokenizer in") for n in remote["notes"])
    assert not list((tmp_path / "hub-cache").rglob("*.safetensors"))


def test_hub_without_safetensors_is_one_line(cli, tiny_args, tmp_path, quick_probe, mocked_hub,
                                             monkeypatch) -> None:
    from huggingface_hub.errors import NotASafetensorsRepoError

    def no_safetensors(repo_id, **kwargs):
        raise NotASafetensorsRepoError(f"{repo_id} has no model.safetensors")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", no_safetensors)
    res = cli(["fp8", *_with_model(tiny_args, REPO), "--out", str(tmp_path / "out"), "--dry-run"])
    assert res.code == 2 and len(res.error_lines) == 1
    assert "no safetensors weights" in res.error_lines[0]


def test_offline_with_nothing_cached_is_one_line(cli, tiny_args, tmp_path, quick_probe, mocked_hub,
                                                 monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = cli(["fp8", *_with_model(tiny_args, "Qwen3-4B"), "--out", str(tmp_path / "out"), "--dry-run"])
    assert res.code == 2 and len(res.error_lines) == 1 and len(res.err.strip().splitlines()) == 1, res.err
    line = res.error_lines[0]
    assert "Qwen/Qwen3-4B" in line and "HF_HUB_OFFLINE is set" in line and "not in the local cache" in line
    assert "unset HF_HUB_OFFLINE" in line  # the fix
    assert [c[0] for c in mocked_hub] == ["snapshot_download"]  # the cache was asked, the hub never


def test_offline_with_only_config_cached_derives_from_it(cli, tiny_args, tiny_qwen3, tmp_path, quick_probe,
                                                         mocked_hub, monkeypatch) -> None:
    cached = _config_only(tiny_qwen3, tmp_path / "snapshot", tokenizer=True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(cached))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _estimate(cli, _with_model(tiny_args, REPO), tmp_path / "out")
    assert data["model"]["sizes_from"] == "config.json" and NO_WEIGHTS_NOTE in data["notes"]
    assert [c[0] for c in mocked_hub] == []  # offline: the hub is never asked
