"""`qwenquant bench` and the kernel loader, in process on CPU: checkpoints of every export format (made with the CLI
on the tiny random Qwen3) load with the right kernel module per Linear and read back the exact weights the spec
readers give; generation through the kernel modules follows the dequantized reference model; the CLI writes
qwenquant_bench.json / BENCH.md / plots, refuses bad input with exit 2 and survives out-of-memory points; compare
and report pick the bench figures up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qwenquant.bench import runner
from qwenquant.bench.timing import PointSettings, measure_point
from qwenquant.export import awq_gemm, ct_packed, gptq_v1, hf_fp8
from qwenquant.eval.verify import read_checkpoint_tensors
from qwenquant.kernels import loader as kloader
from qwenquant.kernels.checkpoint_records import record_from_tensors
from qwenquant.kernels.fp8_linear import FP8Linear
from qwenquant.kernels.int4_linear import Int4Linear

CPU = torch.device("cpu")
FAST_BENCH = ["--device", "cpu", "--batch-sizes", "1,2", "--context", "16,32", "--decode-tokens", "3"]

# name: (command and flags, kernel module class, label fragment, spec reader)
VARIANTS = {
    "fp8-dynamic": (["fp8"], FP8Linear, "row-wise", None),
    "fp8-static": (["fp8", "--weights", "tensor", "--activations", "static"], FP8Linear, "static per-tensor input", None),
    "fp8-weight-only": (["fp8", "--activations", "none"], FP8Linear, "FP8 weight-only", None),
    "fp8-block": (["fp8", "--weights", "block", "--format", "hf-fp8"], kloader.DenseLinear, "block checkpoint", hf_fp8),
    "w4-ct": (["rtn"], Int4Linear, "group 128", ct_packed),
    "w4-ct-asym-g32": (["rtn", "--asym", "--group-size", "32"], Int4Linear, "group 32, asymmetric", ct_packed),
    "w4-gptq-act-order": (["gptq", "--format", "gptq", "--act-order", "group", "--group-size", "64"], Int4Linear,
                          "act-order permuted", gptq_v1),
    "w4-awq": (["awq", "--format", "awq"], Int4Linear, "asymmetric", awq_gemm),
    "w8-ct": (["rtn", "--bits", "8"], kloader.DenseLinear, "INT8", ct_packed),
}


@pytest.fixture(scope="session")
def checkpoint(cli, tiny_qwen3, calib_txt, eval_text, tmp_path_factory):
    """checkpoint(name) -> folder of VARIANTS[name] written by the CLI (no perplexity / verification: fast)."""
    root, made = tmp_path_factory.mktemp("bench-ckpts"), {}

    def make(name: str) -> Path:
        if name not in made:
            cmd = VARIANTS[name][0]
            calib = [] if cmd[0] == "rtn" else ["--calib", calib_txt, "--num-samples", "4", "--seq-len", "64"]
            out = root / name
            res = cli([*cmd, "--model", tiny_qwen3, *calib, "--eval-text", eval_text, "--eval-window", "128",
                       "--eval-windows", "1", "--device", "cpu", "--no-ppl", "--no-verify", "--quiet", "--out", out])
            assert res.code == 0, res.err[-2000:]
            made[name] = out
        return made[name]

    return make


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if ".layers." in n and n.rsplit(".", 1)[-1].endswith("_proj")}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loader_replaces_quantized_linears(checkpoint, name) -> None:
    folder = checkpoint(name)
    _, cls, label, reader = VARIANTS[name]
    loaded = kloader.load_inference_model(folder, CPU)
    linears = _linears(loaded.model)
    assert len(linears) == 14
    for lname, module in linears.items():
        assert type(module) is cls and label in module.kernel_label, (lname, module.kernel_label)
    # embeddings, norms and lm_head stay bf16 torch modules; the tied table stays one tensor
    assert type(loaded.model.lm_head) is nn.Linear and loaded.model.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.get_input_embeddings().weight.data_ptr()
    assert not any(t.is_meta for t in loaded.model.state_dict().values())
    kinds = loaded.kernels()
    assert set(kinds) == {n.split(".", 3)[-1] for n in linears} | {"lm_head"}
    # the record read back for the kernel is exactly what the format's independent spec reader dequantizes
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = read_checkpoint_tensors(folder)
    for lname in linears:
        local = {k[len(lname) + 1:]: v for k, v in tensors.items() if k.startswith(lname + ".")}
        qw = record_from_tensors(local, qconfig)
        if reader is hf_fp8:
            expected = hf_fp8.read_linear(local, 128)
        elif reader is not None:
            expected = reader.read_linear(local, qconfig)
        else:  # compressed-tensors float-quantized: weight * weight_scale (per channel or per tensor)
            expected = local["weight"].float() * local["weight_scale"].float()
        assert torch.equal(qw.dequantize(), expected), lname


@pytest.mark.parametrize("name", ["fp8-dynamic", "fp8-static", "w4-ct-asym-g32", "w4-gptq-act-order"])
def test_kernel_logits_follow_the_dequantized_reference(checkpoint, tiny_qwen3, name) -> None:
    """Kernel vs dequantize-then-matmul reference differ far less than the reference differs from the source."""
    folder = checkpoint(name)
    ids = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))
    kernel_model = kloader.load_inference_model(folder, CPU).model
    reference_model = kloader.load_inference_model(folder, CPU, reference=True).model
    assert isinstance(kernel_model.model.layers[0].mlp.up_proj, (FP8Linear, Int4Linear))
    assert isinstance(reference_model.model.layers[0].mlp.up_proj, kloader.ReferenceLinear)
    with torch.no_grad():
        kernel, reference = kernel_model(ids).logits.float(), reference_model(ids).logits.float()
        source = kloader.load_inference_model(tiny_qwen3, CPU).model(ids).logits.float()
    kernel_err = (kernel - reference).norm() / reference.norm()
    quant_err = (reference - source).norm() / source.norm()
    assert float(kernel_err) < 0.1 * float(quant_err), (float(kernel_err), float(quant_err))


def _greedy(folder: Path, reference: bool, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy tokens from the bench's own decode loop (static cache, one step per token)."""
    loaded = kloader.load_inference_model(folder, CPU, reference=reference)
    settings = PointSettings(batch=prompt.shape[0], context=prompt.shape[1], decode_tokens=steps, warmup_steps=0,
                             kv_cache="bf16", compile=False)
    return measure_point(loaded.model, settings, CPU, prompt=prompt)["generated"]


@pytest.fixture(scope="session")
def mini_checkpoints(cli, mini_model, calib_txt, eval_text, tmp_path_factory):
    root, made = tmp_path_factory.mktemp("mini-ckpts"), {}

    def make(cmd: tuple[str, ...]) -> Path:
        if cmd not in made:
            out = root / "-".join(cmd)
            calib = [] if cmd[0] == "rtn" else ["--calib", calib_txt, "--num-samples", "4", "--seq-len", "64"]
            res = cli([*cmd, "--model", mini_model, *calib, "--eval-text", eval_text, "--eval-window", "128",
                       "--eval-windows", "1", "--device", "cpu", "--no-ppl", "--no-verify", "--quiet", "--out", out])
            assert res.code == 0, res.err[-2000:]
            made[cmd] = out
        return made[cmd]

    return make


def test_bench_decode_loop_matches_transformers_generate(mini_model) -> None:
    """The bench's static-cache decode (chunked prefill, explicit positions) is ordinary greedy decoding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mini_model)
    ids = torch.tensor([t[:4] for t in tok(["The history of the city begins", "Water boils when it"]).input_ids])
    ours = _greedy(mini_model, False, ids, 12)
    model = AutoModelForCausalLM.from_pretrained(mini_model, dtype=torch.bfloat16)
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=13, do_sample=False)
    assert torch.equal(ours, theirs[:, 4:])


@pytest.mark.parametrize("cmd", [("rtn",), ("fp8",)])
def test_greedy_generation_through_kernels_matches_reference(mini_checkpoints, mini_model, cmd) -> None:
    """On the trained qwen3-mini, every token the kernel modules pick greedily (bench decode loop, static cache) is
    the dequantized reference's greedy choice on the same prefix, up to near-ties, and the logits agree closely."""
    from transformers import AutoTokenizer

    folder = mini_checkpoints(cmd)
    ids = AutoTokenizer.from_pretrained(mini_model)(["The history of the city begins with"], return_tensors="pt").input_ids
    generated = _greedy(folder, False, ids, 16)  # [1, 17]
    sequence = torch.cat([ids, generated[:, :-1]], dim=1)
    with torch.no_grad():  # both models teacher-forced on the kernel's sequence
        ref = kloader.load_inference_model(folder, CPU, reference=True).model(sequence).logits[0, ids.shape[1] - 1:].float()
        ker = kloader.load_inference_model(folder, CPU).model(sequence).logits[0, ids.shape[1] - 1:].float()
    chosen = generated[0]
    margin = ref.max(-1).values - ref.gather(1, chosen[:, None])[:, 0]  # 0 where the reference agrees
    assert float(margin.max()) <= 0.05 * float(ref.std()), margin
    assert float((ker - ref).norm() / ref.norm()) < 0.02
    assert float((ref.argmax(-1) == chosen).float().mean()) >= 0.9


def test_cli_bench_on_cpu_writes_json_md_png(cli, checkpoint, tmp_path) -> None:
    folder = checkpoint("fp8-dynamic")
    out = tmp_path / "bench"
    res = cli(["bench", folder, *FAST_BENCH, "--kv-cache", "fp8", "--memory-budget", "0.01", "--out", out, "--json"])
    assert res.code == 0, res.err[-2000:]
    s = json.loads(res.out)
    assert s["ok"] and s["scheme"] == "fp8-w8a8-dynamic" and "CPU numbers are not GPU numbers" in s["cpu_note"]
    assert [(p["batch"], p["context"], p["status"]) for p in s["points"]] == [
        (1, 16, "ok"), (1, 32, "ok"), (2, 16, "ok"), (2, 32, "ok")]
    assert sorted(p.name for p in out.iterdir()) == ["BENCH.md", "memory_vs_context.png", "qwenquant_bench.json",
                                                     "tokens_per_s_vs_batch.png"]
    r = json.loads((out / "qwenquant_bench.json").read_text())
    assert r["schema_version"] == 1 and r["kind"] == "qwenquant_bench" and r["device"]["type"] == "cpu"
    assert r["environment"]["torch"] == torch.__version__ and r["created"].endswith("Z")
    assert all("row-wise" in next(iter(v)) for k, v in r["kernels"].items() if k != "lm_head")
    p = r["points"][0]
    assert p["prefill_tokens_per_s"] > 0 and p["decode_tokens_per_s"] > 0 and p["decode_steps"] == 3
    assert p["bound_tokens_per_s"] > 0 and p["bytes_per_decode_step"] > r["weights"]["tensor_bytes"] // 2
    # fp8 KV cache: one byte per element, 2 layers x 2 kv heads x 32 dims x (K, V); exact cache tensors
    assert r["kv_cache"]["bytes_per_token"] == 256 and p["memory"]["kv_cache_bytes"] == 256 * p["max_cache_len"]
    assert r["kv_saving"]["at"][-1]["context"] == 512 and r["kv_saving"]["at"][-1]["saved_bytes"] == 256 * 512
    assert r["max_context"]["computed"] and r["max_context"]["max_context"]["1"] > 0
    gpus = r["projections"]["gpus"]
    assert [g["name"] for g in gpus] == ["RTX 4090", "RTX 3090", "A10G", "RTX 3060 12GB", "RTX 5090", "T4"]
    assert all(g["label"] == "projection, not measured" and g["decode_expected_tokens_per_s"] is None for g in gpus)
    # FP8 W8A8 needs FP8 tensor cores (sm89+): the Ada and Blackwell cards run it, Ampere and Turing do not
    assert {g["key"]: g["runs_scheme"] for g in gpus} == {"rtx4090": True, "rtx3090": False, "a10g": False,
                                                         "rtx3060": False, "rtx5090": True, "t4": False}
    assert all(g["serving_scheme"] == "fp8-w8a8" for g in gpus) and "8.9+; T4 is 7.5" in gpus[-1]["runs_note"]
    md = (out / "BENCH.md").read_text()
    assert "CPU numbers are not GPU numbers" in md and "projection, not measured" in md and "| 2 | 32 |" in md
    res = cli(["bench", folder, *FAST_BENCH, "--out", out, "--quiet"])  # a previous bench folder is replaced
    assert res.code == 0 and json.loads((out / "qwenquant_bench.json").read_text())["kv_cache"]["dtype"] == "bf16"


def test_cli_bench_int4_default_out(cli, checkpoint) -> None:
    folder = checkpoint("w4-awq")
    res = cli(["bench", folder, "--device", "cpu", "--batch-sizes", "1", "--context", "8", "--decode-tokens", "2", "--quiet"])
    assert res.code == 0, res.err[-2000:]
    r = json.loads((folder / "bench" / "qwenquant_bench.json").read_text())
    assert r["model"]["scheme"] == "w4a16-awq" and "_weight_int4pack_mm_for_cpu" in str(r["kernels"])


def test_bench_bad_input(cli, checkpoint, tmp_path) -> None:
    folder = checkpoint("fp8-dynamic")
    if not torch.cuda.is_available():
        res = cli(["bench", folder, "--device", "cuda", "--context", "8"])
        assert res.code == 2 and len(res.error_lines) == 1 and "CUDA is not available" in res.error_lines[0]
    res = cli(["bench", folder, *FAST_BENCH[:-4], "--context", "600", "--json"])  # tiny model: 512 positions
    assert res.code == 2 and "max_position_embeddings" in res.error_lines[0] and not json.loads(res.out)["ok"]
    res = cli(["bench", folder, "--device", "cpu", "--context", "510", "--decode-tokens", "4"])  # 510 + 5 > 512
    assert res.code == 2 and "contexts <= 507" in res.error_lines[0]
    res = cli(["bench", folder, "--device", "cpu", "--batch-sizes", "1,x"])
    assert res.code == 2 and "--batch-sizes" in res.error_lines[0]
    res = cli(["bench", tmp_path / "missing", "--device", "cpu"])
    assert res.code == 2 and "no such directory" in res.error_lines[0]
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    res = cli(["bench", folder, *FAST_BENCH, "--out", other])
    assert res.code == 2 and "not a qwenquant bench folder" in res.error_lines[0] and (other / "keep.txt").exists()


def test_contexts_beyond_the_model_are_recorded_and_the_others_run(cli, checkpoint, tmp_path) -> None:
    """The default grid (1024,8192,32768) on a model with fewer positions runs what fits: a newcomer's
    `qwenquant bench OUT` on qwen3-mini (4096 positions) measures 1024 and says why 8192 and 32768 did not run."""
    folder = checkpoint("fp8-dynamic")
    res = cli(["bench", folder, "--device", "cpu", "--batch-sizes", "1", "--context", "16,600", "--decode-tokens", "2",
               "--out", tmp_path / "b", "--json"])
    assert res.code == 0, res.err
    points = {p["context"]: p for p in json.loads((tmp_path / "b" / "qwenquant_bench.json").read_text())["points"]}
    assert points[16]["status"] == "ok" and points[600]["status"] == "too_long"
    assert "512 positions" in points[600]["error"] and "too_long" in (tmp_path / "b" / "BENCH.md").read_text()


def test_out_of_memory_points_are_recorded_and_smaller_ones_continue(cli, checkpoint, tmp_path, monkeypatch) -> None:
    folder = checkpoint("w4-ct")
    real = runner.measure_point

    def fake(model, settings, device, kv_scales=None):
        if (settings.batch, settings.context) == (2, 16):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if (settings.batch, settings.context) == (1, 32):
            raise MemoryError()
        return real(model, settings, device, kv_scales)

    monkeypatch.setattr(runner, "measure_point", fake)
    out = tmp_path / "b"
    res = cli(["bench", folder, "--device", "cpu", "--batch-sizes", "1,2", "--context", "16,32",
               "--decode-tokens", "2", "--out", out, "--json"])
    assert res.code == 0, res.err[-2000:]
    status = {(p["batch"], p["context"]): p["status"] for p in json.loads(res.out)["points"]}
    assert status == {(1, 16): "ok", (1, 32): "oom", (2, 16): "oom", (2, 32): "skipped"}
    points = json.loads((out / "qwenquant_bench.json").read_text())["points"]
    errors = {(p["batch"], p["context"]): p.get("error", "") for p in points}
    assert "OutOfMemoryError" in errors[(2, 16)] and "MemoryError" in errors[(1, 32)]
    assert "oom" in (out / "BENCH.md").read_text()


def test_report_merge_picks_up_bench(cli, checkpoint, tmp_path) -> None:
    folder = checkpoint("fp8-static")
    assert cli(["bench", folder, "--device", "cpu", "--batch-sizes", "1", "--context", "8", "--decode-tokens", "2",
                "--quiet"]).code == 0
    res = cli(["report", folder, checkpoint("w4-ct"), "--out", tmp_path / "merged", "--json"])
    assert res.code == 0, res.err[-2000:]
    rows = json.loads(res.out)["rows"]
    assert rows[0]["bench"]["decode_tokens_per_s"] > 0 and "bench" not in rows[1]
    md = (tmp_path / "merged" / "COMPARE.md").read_text()
    assert "decode tok/s" in md and "CPU numbers are not GPU numbers" in md


def test_compare_bench_columns(cli, tiny_qwen3, calib_txt, eval_text, tmp_path) -> None:
    import yaml

    recipe = tmp_path / "dyn.yaml"
    recipe.write_text(yaml.safe_dump({"version": 1, "stages": [{"fp8": {"weights": "channel", "activations": "dynamic"}}],
                                      "calibration": {"dataset": str(calib_txt), "num_samples": 4, "seq_len": 64}}))
    res = cli(["compare", "--model", tiny_qwen3, "--recipes", recipe, "--out", tmp_path / "cmp", "--eval-text", eval_text,
               "--eval-window", "128", "--eval-windows", "1", "--device", "cpu", "--bench", "--json"])
    assert res.code == 0, res.err[-2000:]
    row = json.loads(res.out)["rows"][0]
    assert row["bench"]["scheme"] == "fp8-w8a8-dynamic" and row["bench"]["decode_tokens_per_s"] > 0
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["meta"]["source_bench"]["scheme"] == "bf16"
    assert (tmp_path / "cmp" / "bench" / "dyn" / "qwenquant_bench.json").is_file()
    md = (tmp_path / "cmp" / "COMPARE.md").read_text()
    assert "decode tok/s" in md and "Source model: decode" in md and "CPU numbers are not GPU numbers" in md
