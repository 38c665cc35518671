"""`qwenquant rtn | gptq | awq` end to end, in process (`qwenquant.cli.main`), on the tiny random model: every
scheme and format exits 0, passes verification with the loader verify.py promises, and writes the tensors and
config that docs/formats.md (../shared/docs/formats.md) describes; embeddings, norms and lm_head stay untouched.
Plus one run per quantizer on the trained qwen3-mini, where the KL numbers mean something."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qwenquant.export import awq_gemm, ct_packed, gptq_v1

# tiny model (tests/conftest.py TINY): hidden 128, 4 heads x 32, 2 kv heads, intermediate 384, 2 layers, tied
SHAPES = {  # (N, K)
    "self_attn.q_proj": (128, 128),
    "self_attn.k_proj": (64, 128),
    "self_attn.v_proj": (64, 128),
    "self_attn.o_proj": (128, 128),
    "mlp.gate_proj": (384, 128),
    "mlp.up_proj": (384, 128),
    "mlp.down_proj": (128, 384),
}
LAYERS = 2
LINEARS = [f"model.layers.{i}.{n}" for i in range(LAYERS) for n in SHAPES]
TRANSFORMERS = "transformers.AutoModelForCausalLM"
SPEC_READER = {"compressed-tensors": "qwenquant spec reader for compressed-tensors (qwenquant.export.compressed_tensors)",
               "gptq": "qwenquant spec reader for gptq (qwenquant.export.gptq_v1)",
               "awq": "qwenquant spec reader for awq (qwenquant.export.awq_gemm)"}
READERS = {"compressed-tensors": ct_packed, "gptq": gptq_v1, "awq": awq_gemm}


@dataclass(frozen=True)
class Case:
    """One CLI variant and what its output must look like."""

    cmd: str
    flags: tuple[str, ...] = ()
    fmt: str = "compressed-tensors"
    bits: int = 4
    group: int = 128  # -1: per channel
    sym: bool = True
    actorder: str | None = None  # as declared in the checkpoint config

    @property
    def id(self) -> str:
        return "-".join((self.cmd, *(f.lstrip("-") for f in self.flags))) or self.cmd

    @property
    def reader(self) -> str:
        if self.cmd == "rtn" and "--no-stream" not in self.flags:  # data-free: streamed, read back layer by layer
            return SPEC_READER[self.fmt]
        return TRANSFORMERS if self.fmt == "compressed-tensors" and self.sym else SPEC_READER[self.fmt]

    def groups(self, k: int) -> int:
        return 1 if self.group == -1 else k // self.group


CASES = [
    Case("rtn"),
    Case("rtn", ("--no-stream",)),
    Case("gptq", actorder="static"),
    Case("gptq", ("--act-order", "none")),
    Case("gptq", ("--format", "gptq"), fmt="gptq", actorder="static"),
    Case("gptq", ("--format", "gptq", "--act-order", "group"), fmt="gptq", actorder="group"),
    Case("gptq", ("--asym",), sym=False, actorder="static"),
    Case("gptq", ("--bits", "3"), bits=3, actorder="static"),
    Case("gptq", ("--bits", "8"), bits=8, actorder="static"),
    Case("gptq", ("--group-size", "32"), group=32, actorder="static"),
    Case("gptq", ("--group-size", "-1"), group=-1, actorder="static"),
    Case("awq", sym=False),
    Case("awq", ("--format", "awq"), fmt="awq", sym=False),
    # beyond the defaults: other widths per format, symmetric AWQ GEMM (z = 8), 3-bit asymmetric zero points
    Case("gptq", ("--bits", "2", "--format", "gptq"), fmt="gptq", bits=2, actorder="static"),
    Case("gptq", ("--bits", "8", "--format", "gptq"), fmt="gptq", bits=8, actorder="static"),
    Case("gptq", ("--bits", "3", "--asym"), bits=3, sym=False, actorder="static"),
    Case("awq", ("--sym", "--format", "awq"), fmt="awq"),
]


def int_args(cmd: str, model: Path, calib: Path, eval_text: Path) -> list[str]:
    """Fast flags for the tiny model; `rtn` takes no calibration flags."""
    args = ["--model", str(model), "--eval-windows", "1", "--eval-window", "128", "--eval-text", str(eval_text),
            "--device", "cpu"]
    if cmd != "rtn":
        args += ["--calib", str(calib), "--num-samples", "4", "--seq-len", "64"]
    return args


@pytest.fixture(scope="module")
def int_run(cli, tiny_qwen3, calib_txt, eval_text, tmp_path_factory):
    """int_run(case) -> CliResult with out_dir, run once per module per case (with --quiet)."""
    cache = {}
    root = tmp_path_factory.mktemp("int-runs")

    def run(case: Case):
        if case not in cache:
            out = root / f"run{len(cache)}" / "out"
            res = cli([case.cmd, *int_args(case.cmd, tiny_qwen3, calib_txt, eval_text), "--out", out, "--quiet",
                       *case.flags])
            res.out_dir = out
            cache[case] = res
        return cache[case]

    return run


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            assert sf.metadata() == {"format": "pt"}
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    return tensors


def expected_tensors(case: Case, n: int, k: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Per-Linear tensors of docs/formats.md: local name -> (dtype, shape)."""
    g = case.groups(k)
    p = 32 // case.bits if 32 % case.bits == 0 else None
    if case.fmt == "compressed-tensors":
        out = {"weight_packed": (torch.int32, (n, k * case.bits // 32)),
               "weight_scale": (torch.bfloat16, (n, g)),
               "weight_shape": (torch.int64, (2,))}
        if not case.sym:
            out["weight_zero_point"] = (torch.int32, (n * case.bits // 32, g))
        return out
    if case.fmt == "gptq":
        return {"qweight": (torch.int32, (k // p, n)), "qzeros": (torch.int32, (g, n // p)),
                "scales": (torch.float16, (g, n)), "g_idx": (torch.int32, (k,))}
    return {"qweight": (torch.int32, (k, n // 8)), "qzeros": (torch.int32, (g, n // 8)),
            "scales": (torch.float16, (g, n))}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_int_variant(int_run, tiny_qwen3, case: Case) -> None:
    res = int_run(case)
    assert res.code == 0, res.err[-3000:]
    out = res.out_dir
    assert res.out == ""
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "recipe.yaml", "qwenquant_report.json", "REPORT.md",
            "tokenizer.json", "generation_config.json"} <= names
    assert ("quantize_config.json" in names) == (case.fmt == "gptq")
    assert not [n for n in names if "partial" in n or n.startswith(".")]

    report = json.loads((out / "qwenquant_report.json").read_text())
    v = report["verification"]
    assert v["passed"] is True, v
    if case.reader == TRANSFORMERS:
        assert v["loader"] == TRANSFORMERS, v["loader"]
    else:
        assert case.reader in v["loader"] and "spec reader" in v["loader"], v["loader"]
    assert v["weights_checked"] == len(LINEARS) and v["weights_mismatched"] == []
    assert math.isfinite(v["vs_source"]["mean_kl"])
    stage = report["recipe"]["stages"][0][case.cmd]
    assert (stage["bits"], stage["group_size"], stage["symmetric"]) == (case.bits, case.group, case.sym)

    # --- tensors -------------------------------------------------------------------------------------------
    tensors = read_tensors(out)
    source = read_tensors(tiny_qwen3)
    seen = set()
    for full in LINEARS:
        n, k = SHAPES[full.split(".", 3)[3]]
        want = expected_tensors(case, n, k)
        local = {key[len(full) + 1:]: t for key, t in tensors.items() if key.startswith(full + ".")}
        assert {name: (t.dtype, tuple(t.shape)) for name, t in local.items()} == want, full
        seen |= {f"{full}.{name}" for name in local}
        if case.fmt == "compressed-tensors":
            assert local["weight_shape"].tolist() == [n, k]
        if case.fmt == "gptq":
            natural = torch.arange(k) // (k // case.groups(k))
            if case.actorder == "group":  # a column permutation: every group still holds G columns
                assert torch.equal(local["g_idx"].long(), natural) == (case.groups(k) == 1), full  # down_proj: 3
                assert torch.bincount(local["g_idx"].long()).tolist() == [case.group] * case.groups(k)
            else:
                assert torch.equal(local["g_idx"].long(), natural)
            if case.sym and case.bits == 4:  # v1 stores z - 1 = 7 in every nibble
                assert (local["qzeros"] == 0x77777777).all()
        if case.fmt == "awq" and case.sym:
            assert (local["qzeros"] == 0x88888888 - 2**32).all()
        # the spec reader's weight is near the source weight (AWQ's is the source scaled per input channel).
        # GPTQ trades weight error for output error, hence loose bounds; measured at most 0.89, 0.40, 0.23 and
        # 0.014 (relative Frobenius) at 2, 3, 4 and 8 bits.
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        w = READERS[case.fmt].read_linear(local, config)
        assert w.shape == (n, k) and torch.isfinite(w).all()
        src = source[f"{full}.weight"].float()
        if case.cmd != "awq":
            assert float((w - src).norm() / src.norm()) < {2: 1.0, 3: 0.5, 4: 0.3, 8: 0.03}[case.bits], full
    # everything else is stored once, in bf16, exactly as in the source: embeddings, norms; no lm_head (tied)
    rest = set(tensors) - seen
    assert "lm_head.weight" not in tensors
    assert rest == {k for k in source if not any(k.startswith(f + ".") for f in LINEARS)}
    for key in rest:
        assert tensors[key].dtype == torch.bfloat16, key
        if case.cmd == "awq" and key.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            continue  # AWQ folds its scales into these norms (by design)
        assert torch.equal(tensors[key], source[key]), key

    # --- config.json ---------------------------------------------------------------------------------------
    config = json.loads((out / "config.json").read_text())
    src_config = json.loads((tiny_qwen3 / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")} == \
        {k: src_config[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
    q = config["quantization_config"]
    if case.fmt == "compressed-tensors":
        assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
        assert q["quantization_status"] == "compressed" and q["ignore"] == ["lm_head"]
        assert list(q["config_groups"]) == ["group_0"]
        group = q["config_groups"]["group_0"]
        assert group["targets"] == ["Linear"] and group["input_activations"] is None
        weights = group["weights"]
        assert {k: weights.get(k) for k in ("num_bits", "type", "symmetric", "dynamic", "actorder")} == \
            {"num_bits": case.bits, "type": "int", "symmetric": case.sym, "dynamic": False, "actorder": case.actorder}
        if case.group == -1:
            assert weights["strategy"] == "channel" and weights.get("group_size") is None
        else:
            assert weights["strategy"] == "group" and weights["group_size"] == case.group
    elif case.fmt == "gptq":
        assert q == {"quant_method": "gptq", "bits": case.bits, "group_size": case.group,
                     "desc_act": case.actorder is not None, "sym": case.sym, "checkpoint_format": "gptq",
                     "lm_head": False, "damp_percent": 0.01}
        assert json.loads((out / "quantize_config.json").read_text()) == q
    else:
        assert q == {"quant_method": "awq", "version": "gemm", "zero_point": True, "group_size": case.group,
                     "bits": 4, "modules_to_not_convert": None}


@pytest.mark.parametrize("case", [c for c in CASES if c.reader == TRANSFORMERS], ids=lambda c: c.id)
def test_transformers_reload_matches_spec_reader(int_run, case: Case) -> None:
    """Symmetric compressed-tensors: the reference loader and our independent spec reader dequantize every
    Linear to the same bf16 weights, and the reloaded model runs."""
    from transformers import AutoModelForCausalLM

    res = int_run(case)
    assert res.code == 0, res.err[-3000:]
    out = res.out_dir
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(16).view(1, 16)).logits  # the first forward decompresses
    assert torch.isfinite(logits).all()
    tensors = read_tensors(out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    for full in LINEARS:
        local = {k[len(full) + 1:]: t for k, t in tensors.items() if k.startswith(full + ".")}
        ours = ct_packed.read_linear(local, config).to(torch.bfloat16)
        theirs = model.get_submodule(full).weight.detach()
        assert theirs.dtype == torch.bfloat16 and theirs.shape == ours.shape, full
        assert torch.equal(theirs, ours), full
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.mark.parametrize("case", [c for c in CASES if c.fmt == "compressed-tensors" and not c.sym], ids=lambda c: c.id)
def test_asymmetric_pack_quantized_matches_library_reader(int_run, case: Case) -> None:
    """transformers cannot load packed zero points (see eval/verify.py), so asymmetric output is verified by the
    spec reader; here compressed-tensors' own decompressor, driven by the written config, agrees with it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    res = int_run(case)
    assert res.code == 0, res.err[-3000:]
    tensors = read_tensors(res.out_dir)
    config = json.loads((res.out_dir / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(config["format"])
    for full in LINEARS:
        local = {k[len(full) + 1:]: t for k, t in tensors.items() if k.startswith(full + ".")}
        theirs = compressor.decompress(dict(local), scheme)["weight"]
        ours = ct_packed.read_linear(local, config)
        assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, ours.to(torch.bfloat16)), full


# ---- qwen3-mini (trained): accuracy means something ----------------------------------------------------------


@pytest.fixture(scope="module")
def mini_runs(cli, mini_model, calib_txt, eval_text, tmp_path_factory):
    """mini_runs(cmd, *flags) -> (CliResult, report); small settings, 3-bit, verification KL limit relaxed."""
    cache = {}
    root = tmp_path_factory.mktemp("mini-int")

    def run(cmd: str, *flags: str):
        key = (cmd, flags)
        if key not in cache:
            out = root / f"{cmd}{len(cache)}"
            args = [cmd, "--model", mini_model, "--out", out, "--eval-text", eval_text, "--eval-windows", "2",
                    "--eval-window", "512", "--device", "cpu", "--json", "--verify-max-kl", "1.0", *flags]
            if cmd != "rtn":
                args += ["--calib", calib_txt, "--num-samples", "16", "--seq-len", "128"]
            res = cli(args)
            assert res.code == 0, res.err[-3000:]
            cache[key] = (res, json.loads((out / "qwenquant_report.json").read_text()))
        return cache[key]

    return run


@pytest.mark.slow
def test_qwen3_mini_gptq_and_awq_beat_rtn_at_3_bits(mini_runs) -> None:
    """Measured (CPU, these settings; source perplexity 78.99 on 2 windows of 512):
    RTN  3-bit sym : mean KL 0.0578 nats, perplexity +7.51 %
    GPTQ 3-bit sym : mean KL 0.0162 nats, perplexity +2.68 %   (0.28 x RTN)
    AWQ  3-bit asym: mean KL 0.0269 nats, perplexity +4.79 %   (RTN 3-bit asym, not run here: 0.0439)
    At 4 bits (defaults): GPTQ 0.0040, AWQ 0.0071 nats."""
    kl = {}
    for cmd in ("rtn", "gptq", "awq"):
        res, report = mini_runs(cmd, "--bits", "3")
        summary = json.loads(res.out)
        assert summary["ok"] is True and summary["verification"] is True
        assert report["verification"]["weights_checked"] == 6 * 7
        kl[cmd] = report["evaluation"]["kl_vs_source"]["mean_kl"]
        assert math.isfinite(kl[cmd]) and kl[cmd] > 0, kl
        assert summary["mean_kl"] == pytest.approx(kl[cmd])
        assert math.isfinite(report["evaluation"]["quantized"]["perplexity"])
    assert kl["gptq"] < 0.5 * kl["rtn"], kl
    assert kl["awq"] < kl["rtn"], kl
