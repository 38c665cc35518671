"""Qwen3-MoE (`Qwen3MoeForCausalLM`): experts split into per-expert Linears exactly, every expert calibrated even
when the router never picks it, and `qwenquant fp8 | gptq | rtn` end to end on a tiny random Qwen3-MoE checkpoint
(per-expert tensors on disk, routers unquantized and listed in `ignore`, reload through transformers)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import MINI, MOE, TOKENIZER_FILES, _need, small_args
from conftest import build_tiny_moe as build_model
from qwenquant.eval.verify import read_checkpoint_tensors
from qwenquant.model.moe import LinearExperts, observe_all_tokens, routing_counts, unfuse_experts
from qwenquant.model.qwen3 import QWEN3_MOE, linear_shapes

EXPERTS, SPARSE = 8, (0, 2)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> Path:
    """The model saved by transformers (per-expert tensors, as on the hub) with the qwen3-mini tokenizer."""
    _need(MINI, "qwen3-mini (its tokenizer is reused by the tiny random MoE model)")
    folder = tmp_path_factory.mktemp("models") / "tiny-qwen3-moe"
    build_model().save_pretrained(folder)
    for f in TOKENIZER_FILES:
        if (MINI / f).exists():
            shutil.copy(MINI / f, folder / f)
    return folder


def _layer_inputs(model, tokens: int = 48):
    """Random hidden states [1, T, H] and the rotary embeddings a decoder layer takes."""
    torch.manual_seed(1)
    h = torch.randn(1, tokens, MOE["hidden_size"], dtype=torch.bfloat16)
    pe = model.model.rotary_emb(h, torch.arange(tokens)[None])
    return h, {"position_embeddings": pe, "attention_mask": None}


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_split_experts_is_exact_and_named_as_on_disk(tiny_moe, impl) -> None:
    from transformers import AutoModelForCausalLM

    fused = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.bfloat16, experts_implementation=impl).eval()
    split = copy.deepcopy(fused)
    assert unfuse_experts(split, QWEN3_MOE) == len(SPARSE)
    assert isinstance(split.model.layers[0].mlp.experts, LinearExperts)
    assert not isinstance(split.model.layers[1].mlp, type(split.model.layers[0].mlp))  # the dense layer is untouched
    ids = torch.randint(0, MOE["vocab_size"], (2, 40))
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, split(input_ids=ids).logits)  # bit for bit
    # the split model's parameter names are the checkpoint's names, tensor for tensor
    on_disk = read_checkpoint_tensors(tiny_moe)
    state = split.state_dict()
    assert set(state) == set(on_disk)
    assert all(torch.equal(state[k], on_disk[k]) for k in on_disk)


def test_every_expert_observed_but_output_unchanged(tiny_moe) -> None:
    """Expert 0 of layer 0 gets no routed token; inside observe_all_tokens its Linears see every token, while the
    layer's output stays the routed one bit for bit."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.bfloat16).eval()
    unfuse_experts(model, QWEN3_MOE)
    layer = model.model.layers[0]
    h, kw = _layer_inputs(model)
    seen: dict[str, int] = {}
    handles = [layer.get_submodule(f"mlp.experts.{e}.{p}").register_forward_pre_hook(
        lambda m, a, n=f"{e}.{p}": seen.__setitem__(n, seen.get(n, 0) + a[0].shape[0]))
        for e in range(EXPERTS) for p in ("gate_proj", "down_proj")]
    try:
        with torch.no_grad(), routing_counts(layer) as routing:
            routed = layer(h, **kw)
        assert "0.gate_proj" not in seen  # the router never sends expert 0 anything
        counts = routing["moe_routing"]["mlp.experts"]
        assert counts["routed_tokens"][0] == 0 and 0 in counts["experts_without_tokens"]
        assert counts["tokens"] == h.shape[1] and sum(counts["routed_tokens"]) == 2 * h.shape[1]
        seen.clear()
        with torch.no_grad(), observe_all_tokens(layer, ["mlp.experts.0.gate_proj", "self_attn.q_proj"]):
            observed = layer(h, **kw)
        assert seen["0.gate_proj"] == seen["0.down_proj"] == h.shape[1]  # all tokens, through the whole expert
        assert seen["1.gate_proj"] == counts["routed_tokens"][1]  # unobserved experts: routed tokens only
        assert torch.equal(observed, routed)
        assert layer.mlp.experts.observed == frozenset()
    finally:
        for hd in handles:
            hd.remove()


def test_adapter_layers_shapes_and_groups(tiny_moe) -> None:
    from qwenquant.runner.mixed import all_groups

    config = json.loads((tiny_moe / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    dense, sparse = QWEN3_MOE.for_layer(config, 1), QWEN3_MOE.for_layer(config, 0)
    assert dense is QWEN3_MOE and "mlp.down_proj" in dense.linears
    experts = [f"mlp.experts.{e}.{p}" for e in range(EXPERTS) for p in ("gate_proj", "up_proj", "down_proj")]
    assert sparse.linears == tuple(f"self_attn.{n}" for n in ATTN) + tuple(experts)
    assert sparse.unquantized == ("mlp.gate",)
    assert sparse.fused_group_of("mlp.experts.3.up_proj") == tuple(experts)  # one FusedMoE: kept or quantized whole
    assert ("mlp.experts.3.gate_proj", "mlp.experts.3.up_proj") in sparse.fused_groups  # w13[3]: shared FP8 scale
    norm_map = next(m for m in sparse.smooth_mappings if m.smooth == "post_attention_layernorm")
    assert norm_map.passthrough == ("mlp.gate",) and len(norm_map.balance) == 2 * EXPERTS
    shapes = linear_shapes(config)
    assert shapes["mlp.experts.*.down_proj"] == (128, 64) and shapes["mlp.gate_proj"] == (256, 128)
    groups = all_groups(QWEN3_MOE, 3, config)
    assert tuple(f"model.layers.2.{n}" for n in experts) in groups and ("model.layers.1.mlp.down_proj",) in groups
    from qwenquant.stages.gptq import observation_waves  # GPTQ: one forward observes every expert's down_proj

    waves = observation_waves(sparse)
    assert [len(w) for w in waves] == [1, 1, 1, EXPERTS]
    assert [g[0] for g in waves[-1]] == [f"mlp.experts.{e}.down_proj" for e in range(EXPERTS)]
    assert [len(w) for w in observation_waves(dense)] == [1, 1, 1, 1]


def test_smoothing_keeps_the_function(tiny_moe) -> None:
    """SmoothQuant factors folded through post_attention_layernorm reach the router too (passthrough): in float32
    the layer's output and routing are unchanged."""
    from transformers import AutoModelForCausalLM

    from qwenquant.activations import ActivationCache
    from qwenquant.stages.context import LayerContext
    from qwenquant.stages.smooth import SmoothStage, smooth_layer
    from qwenquant.state import QuantState

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    unfuse_experts(model, QWEN3_MOE)
    layer = model.model.layers[0]
    h, kw = _layer_inputs(model)
    h = h.float()
    with torch.no_grad(), routing_counts(layer) as before_counts:
        before = layer(h, **kw)
    ctx = LayerContext(0, "model.layers.0.", layer, QWEN3_MOE.for_layer(model.config, 0),
                       ActivationCache([h], [kw]), torch.device("cpu"), model.config, QuantState())
    with torch.no_grad():
        report = smooth_layer(ctx, SmoothStage(alpha=0.5, mappings="all"))
    assert report["post_attention_layernorm"]["factor_max"] != 1.0  # something was actually folded
    with torch.no_grad(), routing_counts(layer) as after_counts:
        after = layer(h, **kw)
    assert after_counts == before_counts
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def moe_run(tiny_moe, calib_txt, eval_text, tmp_path_factory, cli):
    """moe_run("gptq", "--group-size", "32") -> CliResult, once per argument list."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("moe-runs")

    def run(cmd: str, *flags: str):
        if (cmd, flags) not in cache:
            args = small_args(tiny_moe, calib_txt, eval_text)
            if cmd == "rtn":  # round-to-nearest takes no calibration flags
                args = [a for i, a in enumerate(args) if not {args[i - 1], a} & {"--calib", "--num-samples", "--seq-len"}]
            out = root / f"run{len(cache)}"
            res = cli([cmd, *args, "--out", str(out), "--quiet", *flags])
            res.out_dir = out
            cache[(cmd, flags)] = res
        return cache[(cmd, flags)]

    return run


CASES = {  # id -> (command and flags, per-Linear tensor names)
    "fp8-static": (("fp8", "--activations", "static"), {"weight", "weight_scale", "input_scale"}),
    "gptq": (("gptq", "--group-size", "32"), {"weight_packed", "weight_scale", "weight_shape"}),
    "rtn": (("rtn", "--group-size", "32"), {"weight_packed", "weight_scale", "weight_shape"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_quantizes_moe(moe_run, tiny_moe, case) -> None:
    (cmd, *flags), local_names = CASES[case]
    res = moe_run(cmd, *flags)
    assert res.code == 0, res.err[-3000:]
    out = res.out_dir
    report = json.loads((out / "qwenquant_report.json").read_text())
    assert report["model"]["architecture"] == "Qwen3MoeForCausalLM"
    v = report["verification"]
    if cmd == "rtn":  # data-free: streamed, read back one layer at a time through the spec reader
        assert v["passed"] and v["mode"] == "streamed" and "spec reader" in v["loader"], v
    else:
        assert v["passed"] and v["loader"] == "transformers.AutoModelForCausalLM", v
    linears = ([f"model.layers.{i}.self_attn.{n}" for i in range(3) for n in ATTN]
               + [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
               + [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in SPARSE for e in range(EXPERTS)
                  for p in ("gate_proj", "up_proj", "down_proj")])
    assert v["weights_checked"] == len(linears) and not v["weights_mismatched"]

    tensors = read_checkpoint_tensors(out)
    for name in linears:  # every expert, the never-routed one too, is quantized under its on-disk name
        assert {k[len(name) + 1:] for k in tensors if k.startswith(name + ".")} == local_names, name
    for i in SPARSE:  # the router: bf16 weight only, listed by name in `ignore` (vLLM builds it as a Linear)
        assert tensors[f"model.layers.{i}.mlp.gate.weight"].dtype == torch.bfloat16
        assert not [k for k in tensors if k.startswith(f"model.layers.{i}.mlp.gate.") and not k.endswith(".weight")]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]
    assert not [k for k in tensors if "gate_up_proj" in k]  # nothing fused on disk

    md = (out / "REPORT.md").read_text()
    if cmd == "rtn":  # no calibration data: nothing routed, nothing to count
        assert "moe_routing" not in report["layers"][0] and "## MoE experts" not in md
        return
    routing = [rep.get("moe_routing") for rep in report["layers"]]
    assert routing[1] is None and routing[0] and routing[2]
    counts = routing[0]["mlp.experts"]
    assert len(counts["routed_tokens"]) == EXPERTS and 0 in counts["experts_without_tokens"]
    assert sum(counts["routed_tokens"]) == 2 * counts["tokens"] == 2 * report["calibration"]["tokens"]
    assert "## MoE experts" in md and "| 0 `mlp.experts` |" in md
    if cmd == "fp8":  # static input scales: vLLM's FusedMoE keeps one (the max) per projection kind
        for i in SPARSE:
            downs = {float(tensors[f"model.layers.{i}.mlp.experts.{e}.down_proj.input_scale"]) for e in range(EXPERTS)}
            ups = {float(tensors[f"model.layers.{i}.mlp.experts.{e}.{p}.input_scale"]) for e in range(EXPERTS)
                   for p in ("gate_proj", "up_proj")}
            assert len(downs) == 1 and len(ups) == 1 and min(downs | ups) > 0


def test_transformers_reloads_the_experts(moe_run) -> None:
    """transformers 5 loads the per-expert FP8 tensors into its fused experts; expert 0 dequantizes exactly."""
    from transformers import AutoModelForCausalLM

    res = moe_run("fp8", "--activations", "static")
    assert res.code == 0, res.err[-3000:]
    model = AutoModelForCausalLM.from_pretrained(res.out_dir, dtype=torch.bfloat16)
    tensors = read_checkpoint_tensors(res.out_dir)
    fused = model.model.layers[0].mlp.experts
    inter = MOE["moe_intermediate_size"]
    for p, w in (("gate_proj", fused.gate_up_proj[0, :inter]), ("up_proj", fused.gate_up_proj[0, inter:]),
                 ("down_proj", fused.down_proj[0])):
        name = f"model.layers.0.mlp.experts.0.{p}"
        expected = (tensors[name + ".weight"].float() * tensors[name + ".weight_scale"].float()).to(torch.bfloat16)
        assert torch.equal(w.detach(), expected)
