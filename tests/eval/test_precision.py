"""Evaluation computes in float32 on the CPU (qwenquant/eval/precision.py): every module sees float32 inputs and
weights during the forward, the numbers equal a float32 copy of the model bit for bit, and afterwards the model is
the same bf16 model (same tensors, same dtypes, tied weights still tied). FP8 activation simulation then hands the
Linear the dequantized FP8 values exactly (e4m3 codes x float32 per-token scale, as vLLM computes)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import TINY
from qwenquant.activations import activation_quantization, capture_layer0_inputs
from qwenquant.eval.perplexity import evaluate_windows, next_token_logprobs, perplexity, union_windows
from qwenquant.eval.precision import compute_dtype, compute_in_float32, evaluation_precision
from qwenquant.quant.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE
from qwenquant.state import ActivationSpec

CPU = torch.device("cpu")


def _tiny_bf16(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=512, tie_word_embeddings=True, **TINY))
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq
    model.to(torch.bfloat16).eval()
    rotary.inv_freq = inv_freq  # float32, as from_pretrained leaves it
    return model


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters()) | dict(model.named_buffers())


def _snapshot(model: nn.Module) -> dict:
    return {k: (v, v.data_ptr(), v.dtype, v.clone()) for k, v in _tensors(model).items()}


def _unchanged(model: nn.Module, snap: dict) -> bool:
    now = _tensors(model)
    return now.keys() == snap.keys() and all(
        now[k].dtype == dtype and now[k].data_ptr() == ptr and torch.equal(now[k], copy_)
        for k, (_t, ptr, dtype, copy_) in snap.items())


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(1))


def test_every_module_computes_in_float32_and_the_model_is_unchanged_after(windows) -> None:
    model = _tiny_bf16()
    snap = _snapshot(model)
    seen = []

    def spy(module, args):
        seen.append((type(module).__name__, args[0].dtype, module.weight.dtype))

    handles = [m.register_forward_pre_hook(spy) for m in model.modules() if isinstance(m, (nn.Linear,))]
    handles += [m.register_forward_pre_hook(spy) for n, m in model.named_modules() if n.endswith("norm")]
    with evaluation_precision(model, CPU):
        ppl, logp = evaluate_windows(model, windows, windows[:2], CPU)
    for h in handles:
        h.remove()
    assert seen and {(d, w) for _n, d, w in seen} == {(torch.float32, torch.float32)}
    assert _unchanged(model, snap)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # float32 buffer, not bf16-cast on the way back

    reference = copy.deepcopy(model).float()  # the float32 reference: a float32 copy of the bf16 weights
    assert ppl.perplexity == perplexity(reference, windows, CPU).perplexity
    assert torch.equal(logp, next_token_logprobs(reference, windows[:2], CPU))
    bf16 = perplexity(model, windows, CPU).perplexity  # outside the context: the model's own dtype again
    assert bf16 != ppl.perplexity


def test_tensors_are_put_back_when_a_forward_raises(windows) -> None:
    """capture_layer0_inputs stops the forward with an exception; a failing module mid-forward too."""
    model = _tiny_bf16()
    snap = _snapshot(model)
    from qwenquant.model.qwen3 import adapter_for

    with compute_in_float32(model):
        cache = capture_layer0_inputs(model, adapter_for("Qwen3ForCausalLM"), windows, 1, CPU)

        def boom(_m, _args):
            raise RuntimeError("boom")

        h = model.model.layers[1].mlp.register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            model(input_ids=windows[:1])
        h.remove()
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # restored per module at once
    assert {h.dtype for h in cache.hidden} == {torch.float32}  # embedding output cast: layer 0 sees float32
    assert {kw["position_embeddings"][0].dtype for kw in cache.kwargs} == {torch.float32}
    assert _unchanged(model, snap)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_float32_only_on_the_cpu() -> None:
    model = _tiny_bf16()
    cuda = torch.device("cuda")
    assert compute_dtype(CPU, torch.bfloat16) == torch.float32 and compute_dtype(CPU, torch.float32) == torch.float32
    assert compute_dtype(cuda, torch.bfloat16) == torch.bfloat16
    with evaluation_precision(model, cuda):  # no hooks: an accelerator computes in the model dtype
        assert not any(m._forward_pre_hooks for m in model.modules())


def test_fp8_activations_reach_the_linear_as_e4m3_codes_times_float32_scales(windows) -> None:
    """vLLM: per-token scale absmax/448 in float32, input rounded to e4m3 (saturating), products accumulated and
    scaled in float32. In a float32 evaluation the Linear sees exactly code x scale, in float32."""
    model = _tiny_bf16()
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    raw, quantized = [], []
    with activation_quantization(model, {name: ActivationSpec("token")}), evaluation_precision(model, CPU):
        h_in = lin.register_forward_pre_hook(lambda m, a: raw.append(a[0]), prepend=True)  # before the FP8 hook
        h_out = lin.register_forward_pre_hook(lambda m, a: quantized.append(a[0]))  # after it: what F.linear gets
        evaluate_windows(model, windows[:1], windows[:1], CPU)
        h_in.remove(), h_out.remove()
    x, xq = raw[0], quantized[0]
    assert x.dtype == xq.dtype == torch.float32
    scale = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)  # float32, per token
    codes = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    assert torch.equal(xq, codes.float() * scale)
    assert not torch.equal(xq, xq.bfloat16().float())  # a bf16 evaluation would have rounded these


def test_union_of_windows_runs_each_window_once(windows) -> None:
    """evaluate_windows == perplexity() + next_token_logprobs(), bit for bit, with one forward per distinct window."""
    model = _tiny_bf16()
    forwards = []
    h = model.model.embed_tokens.register_forward_hook(lambda *a: forwards.append(1))
    cases = ((windows, windows[:2], 3), (windows[:1], windows[:2], 2), (None, windows[:2], 2),
             (windows[1:], windows[:1], 3))
    for ppl_w, kl_w, distinct in cases:
        with evaluation_precision(model, CPU):
            forwards.clear()
            ppl, logp = evaluate_windows(model, ppl_w, kl_w, CPU)
            assert len(forwards) == distinct == union_windows(ppl_w, kl_w)[0].shape[0]
            assert ppl is None if ppl_w is None else ppl.to_dict() == perplexity(model, ppl_w, CPU).to_dict()
            assert torch.equal(logp, next_token_logprobs(model, kl_w, CPU))
    h.remove()
