"""A run evaluates in float32 on the CPU (ResidentModel.evaluate): every Linear sees float32 inputs and weights,
the numbers equal a float32 copy of the model's, each window runs once, and the model is unchanged afterwards; a
written checkpoint, reloaded, is measured the same way (its KL vs the in-memory model is 0)."""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

from qwenquant.activations import activation_quantization
from qwenquant.eval.perplexity import next_token_logprobs, perplexity
from qwenquant.model.loader import resolve_model
from qwenquant.progress import Reporter
from qwenquant.runner.placement import ResidentModel
from qwenquant.state import ActivationSpec

CPU = torch.device("cpu")


def test_resident_evaluation_is_float32(tiny_qwen3) -> None:
    placement = ResidentModel(resolve_model(str(tiny_qwen3)), "bfloat16")
    model = placement.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(0, 8192, (3, 64), generator=torch.Generator().manual_seed(0))
    specs = {"model.layers.0.mlp.down_proj": ActivationSpec("token")}
    for act in (None, specs):
        seen = []
        spies = [m.register_forward_pre_hook(lambda m, a: seen.append((a[0].dtype, m.weight.dtype)))
                 for m in model.modules() if isinstance(m, nn.Linear)]
        ppl, logp = placement.evaluate(model, windows, windows[:2], CPU, Reporter(quiet=True), "test", act)
        for h in spies:
            h.remove()
        assert set(seen) == {(torch.float32, torch.float32)}
        assert len(seen) == 3 * sum(isinstance(m, nn.Linear) for m in model.modules())  # 3 windows, each once
        reference = copy.deepcopy(model).float()
        with activation_quantization(reference, act or {}):
            assert ppl.perplexity == perplexity(reference, windows, CPU).perplexity
            assert torch.equal(logp, next_token_logprobs(reference, windows[:2], CPU))
    after = model.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items())


def test_reloaded_checkpoint_is_measured_like_the_in_memory_model(cli, tiny_args, tmp_path) -> None:
    out = tmp_path / "out"
    res = cli(["fp8", *tiny_args, "--no-stream", "--out", out, "--quiet"])
    assert res.code == 0, res.err[-3000:]
    v = json.loads((out / "qwenquant_report.json").read_text())["verification"]
    assert v["loader"] == "transformers.AutoModelForCausalLM" and v["passed"]
    assert v["vs_quantized_in_memory"]["mean_kl"] == 0.0  # both float32: the same logits
