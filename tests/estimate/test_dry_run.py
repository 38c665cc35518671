"""`--dry-run` on the quantize commands (qwenquant/estimate/), in process on the tiny random Qwen3: it prints an
estimate and writes nothing, `--json` has the documented keys, the output size it predicts matches the checkpoint a
real run writes (fp8 and W4A16 in each INT format), a run that cannot fit exits 5 with one line, and a bad model
fails as it does without --dry-run. Most tests replace the few-second speed probe with fixed rates (sizes and memory
do not depend on it); one runs the real probe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import qwenquant.estimate as estimate
import qwenquant.estimate.probe as probe_mod

JSON_KEYS = {"ok", "dry_run", "model", "recipe", "run", "sizes", "memory", "disk", "timings_s", "fits", "reasons",
             "notes", "probe", "dominant_stage", "streaming", "ranks"}
TIMING_KEYS = {"startup", "load", "calibration_data", "eval_source", "quantize", "eval_quantized", "export", "verify",
               "report", "stages", "total"}
STREAM_TIMING_KEYS = {"startup", "load", "quantize_and_write", "verify", "report", "stages", "total"}  # runner/stream.py


def _fixed_probe(*_args, **_kwargs) -> probe_mod.Probe:
    return probe_mod.Probe(device="cpu", threads=1, layer_s_per_token=1e-5, attn_s_per_token2=1e-9,
                           layer_s_per_call=1e-3, lm_head_s_per_token=1e-5, fp32_gflops=50.0,
                           logits_s_per_element=1e-9, kl_s_per_element=1e-9, act_quant_s_per_element=1e-9,
                           quant_s_per_weight=1e-8, quant_s_per_linear=1e-3, export_s_per_weight=1e-8, isfinite_s_per_weight=1e-9,
                           seconds=0.0)


@pytest.fixture
def quick_probe(monkeypatch):
    monkeypatch.setattr(probe_mod, "run_probe", _fixed_probe)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _args(cmd: str, tiny_args: list[str]) -> list[str]:
    """The tiny model's fast flags; `rtn` takes no calibration flags."""
    if cmd != "rtn":
        return list(tiny_args)
    out, skip = [], False
    for a in tiny_args:
        if skip:
            skip = False
        elif a in ("--calib", "--num-samples", "--seq-len"):
            skip = True
        else:
            out.append(a)
    return out


def _dry(cli, cmd: str, tiny_args: list[str], out: Path, *flags: str):
    return cli([cmd, *_args(cmd, tiny_args), "--out", str(out), "--dry-run", *flags])


def test_dry_run_prints_estimate_and_writes_nothing(cli, tiny_args, tmp_path) -> None:
    """The real probe, the rich tables, exit 0, and not a file written (no output, no hidden partial folder)."""
    work = tmp_path / "work"
    work.mkdir()
    before = _listing(tmp_path)
    res = _dry(cli, "fp8", tiny_args, work / "out")
    assert res.code == 0, res.err[-2000:]
    assert _listing(tmp_path) == before
    for words in ("peak host memory", "output safetensors", "quantize_and_write", "total", "fits", "dominant: ",
                  "data-free streaming: time ~ reading source + writing output at disk speed"):
        assert words in res.out, words
    assert "propagate" not in res.out  # FP8 dynamic is data-free: no calibration phase
    assert not res.error_lines


@pytest.mark.parametrize("cmd,flags", [("fp8", ()), ("gptq", ()), ("awq", ("--format", "awq")), ("rtn", ())],
                         ids=["fp8", "gptq", "awq", "rtn"])
def test_json_has_documented_keys(cli, tiny_args, tmp_path, quick_probe, cmd, flags) -> None:
    res = _dry(cli, cmd, tiny_args, tmp_path / "out", "--json", *flags)
    assert res.code == 0, res.err[-2000:]
    data = json.loads(res.out)  # the whole of stdout is one JSON document
    assert JSON_KEYS <= set(data), sorted(set(data))
    assert data["ok"] is True and data["dry_run"] is True and data["reasons"] == []
    streamed = data["run"]["streamed"]
    assert streamed == (cmd in ("fp8", "rtn"))  # data-free with their defaults
    assert (STREAM_TIMING_KEYS if streamed else TIMING_KEYS) <= set(data["timings_s"]), sorted(data["timings_s"])
    assert data["timings_s"]["stages"] == {} if streamed else cmd in data["timings_s"]["stages"]
    assert data["timings_s"]["total"] > 0
    mem = data["memory"]
    if streamed:  # no model is built: the workers' jobs, then the layer-streamed verification
        assert mem["peak_host_bytes"] >= mem["host_phases"]["quantize_and_write"] > mem["host_phases"]["load"] > 0
    else:
        assert mem["peak_host_bytes"] > mem["peak_host_breakdown"]["model"] > 0
    assert mem["peak_device_bytes"] is None and mem["device"] == "cpu"  # CPU: device memory is host memory
    assert set(data["fits"]) == {"host", "device", "disk"} and data["fits"]["host"] and data["fits"]["disk"]
    assert data["sizes"]["output_bytes"] > 0 and data["sizes"]["quantized_linears"] == 14
    assert data["disk"]["free_bytes"] > data["disk"]["need_bytes"] > data["sizes"]["output_bytes"]
    assert not (tmp_path / "out").exists()
    dominant, timings = data["dominant_stage"], data["timings_s"]
    parts = {k: v for k, v in timings.items() if isinstance(v, float) and k not in ("quantize", "total")}
    parts |= timings["stages"]
    assert dominant["name"] == max(parts, key=parts.get) and dominant["seconds"] == parts[dominant["name"]]
    assert dominant["share"] == pytest.approx(dominant["seconds"] / timings["total"])
    assert data["model"]["sizes_from"] == "safetensors headers"


@pytest.mark.parametrize("cmd,flags,data_free", [("fp8", (), True), ("fp8", ("--weights", "block"), True),
                                                 ("fp8", ("--activations", "none"), True), ("rtn", (), True),
                                                 ("fp8", ("--activations", "static"), False), ("gptq", (), False)],
                         ids=["fp8-dynamic", "fp8-block", "fp8-weight-only", "rtn", "fp8-static", "gptq"])
def test_data_free_recipes_have_no_calibration_phase(cli, tiny_args, tmp_path, quick_probe, cmd, flags,
                                                     data_free) -> None:
    """Recipes the data-free streaming path takes (qwenquant.stream.eligibility.streams) are charged no capture,
    propagation or calibration data, and get the streaming line's bytes; calibrated ones keep them."""
    res = _dry(cli, cmd, tiny_args, tmp_path / "out", "--json", *flags)
    assert res.code == 0, res.err[-2000:]
    data = json.loads(res.out)
    stages = data["timings_s"]["stages"]
    if data_free:
        assert data["run"]["calibration_tokens"] == 0 and data["run"]["streamed"] and stages == {}
        assert "calibration_data" not in data["timings_s"] and "quantize_and_write" in data["timings_s"]
        assert data["streaming"]["read_bytes"] == data["sizes"]["source_bytes"]
        assert data["streaming"]["write_bytes"] == data["sizes"]["output_bytes"] and data["streaming"]["seconds"] > 0
        assert data["disk"]["journal_bytes"] == 0  # the streaming path keeps no run journal
        # --no-stream: the layer-by-layer path, still without calibration
        res = _dry(cli, cmd, tiny_args, tmp_path / "out", "--json", "--no-stream", *flags)
        in_memory = json.loads(res.out)
        assert in_memory["run"]["streamed"] is False and in_memory["streaming"] is None
        assert in_memory["run"]["calibration_tokens"] == 0 and in_memory["timings_s"]["calibration_data"] == 0.0
        assert cmd in in_memory["timings_s"]["stages"] and "propagate" not in in_memory["timings_s"]["stages"]
    else:
        assert data["run"]["calibration_tokens"] == 4 * 64 and stages["propagate"] > 0
        assert data["streaming"] is None and data["run"]["streamed"] is False


SIZE_CASES = [
    ("fp8", ()),
    ("fp8", ("--weights", "block", "--format", "hf-fp8")),
    ("fp8", ("--weights", "tensor", "--activations", "static")),
    ("rtn", ()),
    ("rtn", ("--asym",)),
    ("rtn", ("--format", "gptq")),
    ("rtn", ("--format", "awq", "--group-size", "64")),
]


@pytest.mark.parametrize("cmd,flags", SIZE_CASES, ids=["-".join((c, *f)).replace("--", "") for c, f in SIZE_CASES])
def test_size_matches_written_checkpoint(cli, tiny_args, tmp_path, quick_probe, cmd, flags) -> None:
    """Predicted safetensors bytes == what the run writes, within 1% (headers are estimated)."""
    dry = _dry(cli, cmd, tiny_args, tmp_path / "out", "--json", *flags)
    assert dry.code == 0, dry.err[-2000:]
    predicted = json.loads(dry.out)["sizes"]["output_bytes"]
    real = cli([cmd, *_args(cmd, tiny_args), "--out", str(tmp_path / "out"), "--no-verify", "--no-ppl", "--quiet", *flags])
    assert real.code == 0, real.err[-2000:]
    written = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert predicted == pytest.approx(written, rel=0.01), (predicted, written)


def test_does_not_fit_in_memory_exits_5_with_one_line(cli, tiny_args, tmp_path, quick_probe, monkeypatch) -> None:
    monkeypatch.setattr(estimate, "available_host_bytes", lambda: (64 * 2**20, "test limit"))
    res = _dry(cli, "fp8", tiny_args, tmp_path / "out")
    assert res.code == 5
    assert len(res.error_lines) == 1 and len(res.err.strip().splitlines()) == 1, res.err
    line = res.error_lines[0]
    assert "peak host memory" in line and "0.06 GiB available (test limit)" in line
    assert "does not fit" in res.out  # the table still says what was estimated

    res = _dry(cli, "fp8", tiny_args, tmp_path / "out", "--json")
    assert res.code == 5
    data = json.loads(res.out)  # one document: the error with the estimate
    assert data["ok"] is False and data["exit_code"] == 5 and data["fits"]["host"] is False
    assert data["memory"]["peak_host_bytes"] > data["memory"]["available_host_bytes"]
    assert not (tmp_path / "out").exists()


def test_does_not_fit_on_disk_exits_5(cli, tiny_args, tmp_path, quick_probe, monkeypatch) -> None:
    monkeypatch.setattr(estimate, "free_disk_bytes", lambda out: (1000, tmp_path))
    res = _dry(cli, "rtn", tiny_args, tmp_path / "out")
    assert res.code == 5 and len(res.error_lines) == 1
    assert "on disk" in res.error_lines[0]


def test_unreadable_model_errors_as_usual(cli, tiny_args, tiny_qwen3, tmp_path, quick_probe) -> None:
    model = tmp_path / "broken"
    shutil.copytree(tiny_qwen3, model)
    weights = model / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    args = list(tiny_args)
    args[args.index("--model") + 1] = str(model)
    res = _dry(cli, "fp8", args, tmp_path / "out")
    assert res.code == 2 and len(res.error_lines) == 1
    assert "corrupt or truncated" in res.error_lines[0]
    args[args.index("--model") + 1] = str(tmp_path / "missing")
    res = _dry(cli, "gptq", args, tmp_path / "out")
    assert res.code == 2 and "no such directory" in res.error_lines[0]


def test_eval_text_shorter_than_a_window_is_refused(cli, tiny_args, tmp_path, quick_probe) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n")
    args = list(tiny_args)
    args[args.index("--eval-text") + 1] = str(short)
    res = _dry(cli, "fp8", args, tmp_path / "out")
    assert res.code == 2 and "fewer than one window" in res.error_lines[0]


def test_existing_out_is_refused_as_in_a_real_run(cli, tiny_args, tmp_path, quick_probe) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    res = _dry(cli, "fp8", tiny_args, tmp_path / "out")
    assert res.code == 2 and "already exists" in res.error_lines[0]


def test_recipe_file_dry_run(cli, tiny_qwen3, tmp_path, quick_probe) -> None:
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "w4a16-gptq.yaml"
    res = cli(["run", str(recipe), "--model", str(tiny_qwen3), "--out", str(tmp_path / "out"), "--device", "cpu",
               "--dry-run", "--json"])
    assert res.code == 0, res.err[-2000:]
    data = json.loads(res.out)
    assert "gptq" in data["timings_s"]["stages"] and not (tmp_path / "out").exists()


def test_kl_statistics_dominate_large_vocabularies() -> None:
    """Pure model: at Qwen3's vocabulary the float32 KL temporaries (5 x tokens x vocab x 4 B) set the peak."""
    from qwenquant.stages.fp8 import FP8Stage
    from qwenquant.recipe import ModelConfig, Recipe

    recipe = Recipe(model=ModelConfig(id="x"), stages=[FP8Stage()])
    n_layers, hidden, inter, vocab = 28, 1024, 3072, 151936
    shapes = {"self_attn.q_proj": (2048, hidden), "self_attn.k_proj": (1024, hidden), "self_attn.v_proj": (1024, hidden),
              "self_attn.o_proj": (hidden, 2048), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    tensors = {"model.embed_tokens.weight": estimate.TensorInfo("BF16", (vocab, hidden))}
    linears = []
    for i in range(n_layers):
        for local, (n, k) in shapes.items():
            tensors[f"model.layers.{i}.{local}.weight"] = estimate.TensorInfo("BF16", (n, k))
            linears.append(estimate.LinearInfo(f"model.layers.{i}.{local}", n, k, i, local))
    facts = estimate.ModelFacts("x", "x", "Qwen3ForCausalLM", {"num_hidden_layers": n_layers}, n_layers, hidden, vocab,
                                True, 40960, tensors, linears, sum(t.nbytes for t in tensors.values()), 0)
    shape = estimate.run_shape(recipe, facts, 300_000, True)
    assert shape.kl_tokens == 4096 and shape.window == 2048
    out = estimate.output_size(recipe, facts)
    fp8_weights = sum(n * k for n, k in shapes.values()) * n_layers
    assert out.quantized_bytes == pytest.approx(fp8_weights, rel=0.01)
    phases = estimate.memory_phases(recipe, facts, shape, out, 0, estimate.Traits(journal=False), cuda=False)
    peak = max(phases, key=lambda p: p.host_total)
    assert peak.host["KL statistics"] == 5 * 4 * 4096 * vocab
    assert peak.name in ("verify (KL)", "report")


def test_offload_dir_is_estimated_layer_by_layer(cli, tiny_args, tiny_qwen3, tmp_path, quick_probe) -> None:
    """--offload-dir: the phases hold the resident tensors and one decoder layer instead of the model, the layer
    files need disk, and the dry run creates nothing (not even DIR)."""
    from safetensors import safe_open

    in_memory = json.loads(_dry(cli, "gptq", tiny_args, tmp_path / "out", "--json").out)
    res = _dry(cli, "gptq", tiny_args, tmp_path / "out", "--json", "--offload-dir", str(tmp_path / "off"))
    assert res.code == 0, res.err[-2000:]
    data = json.loads(res.out)
    assert data["run"]["offload"] is True and not (tmp_path / "off").exists() and not (tmp_path / "out").exists()
    with safe_open(str(tiny_qwen3 / "model.safetensors"), "pt") as f:
        layers = sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape()[1:] or [1])[0] * 2
                     for k in f.keys() if k.startswith("model.layers."))
        resident = sum(2 * f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape()[1:] or [1])[0]
                       for k in f.keys() if not k.startswith("model.layers."))
    assert data["disk"]["offload_bytes"] == layers and data["disk"]["offload_same_disk"] is True
    assert data["disk"]["need_bytes"] == in_memory["disk"]["need_bytes"] + layers
    parts = data["memory"]["peak_host_breakdown"]
    assert "model" not in parts and "resident tensors (embeddings, norm, lm_head)" in parts
    process, process_in_memory = parts["process"], in_memory["memory"]["peak_host_breakdown"]["process"]
    quantize = data["memory"]["host_phases"]["quantize"] - process
    assert quantize < in_memory["memory"]["host_phases"]["quantize"] - process_in_memory  # one layer, not the model
    assert data["timings_s"]["stages"]["offload"] > 0
    phase = {p: v for p, v in data["memory"]["host_phases"].items()}
    assert set(phase) == {"load", "eval_source", "quantize", "eval_quantized", "export", "verify", "verify (KL)", "report"}
    assert phase["load"] == process + resident


def test_offload_dir_refusals_match_the_run(cli, tiny_args, tmp_path, quick_probe) -> None:
    res = _dry(cli, "gptq", tiny_args, tmp_path / "out", "--offload-dir", str(tmp_path / "off"), "--keep-sensitive", "1")
    assert res.code == 2 and len(res.error_lines) == 1 and "--offload-dir drop it" in res.error_lines[0]
    res = _dry(cli, "gptq", tiny_args, tmp_path / "out", "--offload-dir", str(tmp_path / "out" / "off"))
    assert res.code == 2 and len(res.error_lines) == 1 and "inside --out" in res.error_lines[0]


def test_offload_dir_with_a_data_free_recipe_says_it_is_not_used(cli, tiny_args, tmp_path, quick_probe) -> None:
    res = _dry(cli, "rtn", tiny_args, tmp_path / "out", "--json", "--offload-dir", str(tmp_path / "off"))
    data = json.loads(res.out)
    assert data["run"]["streamed"] is True and data["run"]["offload"] is False and data["disk"]["offload_bytes"] == 0
    assert any(n.startswith("--offload-dir is not used") for n in data["notes"])


def test_kl_tokens_zero(cli, tiny_args, tmp_path, quick_probe) -> None:
    """--kl-tokens 0: no KL windows in a streamed estimate (with --no-ppl no evaluation pass at all); refused in one
    line, as the run refuses it, for a run that quantizes in memory."""
    res = _dry(cli, "fp8", tiny_args, tmp_path / "out", "--json", "--kl-tokens", "0", "--no-verify")
    data = json.loads(res.out)
    assert data["run"]["kl_tokens"] == 0 and "verify (KL)" in data["memory"]["host_phases"]
    res = _dry(cli, "fp8", tiny_args, tmp_path / "out", "--json", "--kl-tokens", "0", "--no-verify", "--no-ppl")
    data = json.loads(res.out)
    assert "verify" not in data["timings_s"] and set(data["memory"]["host_phases"]) == {"load", "quantize_and_write",
                                                                                        "report"}
    res = _dry(cli, "gptq", tiny_args, tmp_path / "out", "--kl-tokens", "0", "--no-verify")
    assert res.code == 2 and len(res.error_lines) == 1 and "drop --kl-tokens 0" in res.error_lines[0]
