"""Evaluate and verify a streamed checkpoint one decoder layer at a time, beside its source, in bounded memory.

One pass over the decoder layers does three things per layer:
- source: the layer's tensors from the source safetensors run the source hidden states forward;
- verification: every tensor of the layer is read back from the written checkpoint. Each quantized Linear goes
  through its export format's spec reader (`read_linear`, written from the format description, not from our
  writer) and must equal, bit for bit in the model dtype, the stage's data-free quantizer applied again to the
  source weight; every other tensor must equal the source tensor in the model dtype;
- quantized: the Linears then compute with the weights as read back (float32 dequantized, as engines compute
  them), with the input quantization the engine applies, and run the quantized hidden states forward.
The final norm and lm_head (checked the same way) turn both into perplexity and next-token log-probabilities, and
the KL between them is the checkpoint's KL vs source. Memory: one layer (twice, briefly), the resident embedding /
head, and the hidden states of the evaluated windows. On CPU everything is computed in float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from qwenquant.activations import activation_quantization, capture_layer0_inputs, to_device
from qwenquant.eval.layerwise import HeadModel
from qwenquant.eval.perplexity import perplexity
from qwenquant.eval.verify import verdict
from qwenquant.export.registry import FORMATS
from qwenquant.model.offload import load_offloaded
from qwenquant.stages.registry import spec_of
from qwenquant.stream.plan import StreamPlan
from qwenquant.stream.source import SourceFiles


class _Checker:
    """Reads the written checkpoint back and compares it with the source (see the module doc)."""

    def __init__(self, folder: Path, plan: StreamPlan, recipe, model_dtype: torch.dtype):
        self.out = SourceFiles(sorted(Path(folder).glob("*.safetensors")))
        self.config = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
        self.recipe, self.cfg = recipe, recipe.quantizer_config
        self.spec, self.fmt = spec_of(self.cfg), FORMATS[recipe.export.format]
        self.dtype = model_dtype
        self.quantized = set(plan.quantized)
        self.job_of = {i.linear: i.job for i in plan.items if i.kind == "quantize"}
        self.mismatched: list[str] = []
        self.others_mismatched: list[str] = []
        self.others_checked = 0
        self.errors: dict[str, float] = {}
        self.keys_of: dict[str, list[str]] = {}  # quantized Linear -> its stored tensors
        for k in self.out.entries:
            if (module := k.rsplit(".", 1)[0]) in self.quantized:
                self.keys_of.setdefault(module, []).append(k)

    def close(self) -> None:
        self.out.close()

    def plain(self, key: str, ours: torch.Tensor) -> None:
        """A tensor stored as it is: equal to the source's, in the model dtype for floating-point tensors."""
        self.others_checked += 1
        if ours.is_floating_point():
            ours = ours.to(self.dtype)
        stored = self.out.read(key).to(ours.device) if key in self.out.entries else None  # read on the CPU
        if stored is None or stored.dtype != ours.dtype or not torch.equal(stored, ours):
            self.others_mismatched.append(key)

    def linear(self, name: str, source_w: dict[str, torch.Tensor]) -> torch.Tensor:
        """The Linear's weight as read back (float32), after checking it against the quantizer's values."""
        local = {k[len(name) + 1:]: self.out.read(k) for k in self.keys_of.get(name, [])}
        theirs = self.fmt.read_linear(local, self.config, name).float()
        job = self.job_of[name]
        w = source_w[name].to(self.dtype)
        theirs = theirs.to(w.device)  # read on the CPU; the layer (and this check) may run on a GPU
        absmax = ({n: float(source_w[n].to(self.dtype).abs().amax()) for n in job}
                  if len(job) > 1 and self.spec.shares_scale(self.cfg) else None)
        ours = self.spec.quantize_weight(self.cfg, name, w, absmax).dequantize()
        if ours.shape != theirs.shape or not torch.equal(ours.to(self.dtype), theirs.to(self.dtype)):
            self.mismatched.append(name)
        wf = w.float()
        self.errors[name] = float((wf - theirs).norm() / wf.norm().clamp(min=1e-12))
        return theirs


@torch.no_grad()
def kl_by_window(source, quantized, windows: torch.Tensor, device) -> dict:
    """`kl_stats`' numbers (mean / max per-token KL(source || quantized) in nats, top-1 agreement, tokens), computed
    one window at a time from float32 log-probabilities, so no [windows, tokens, vocab] tensor is ever stored
    (`kl_stats` reads fp16-stored log-probs: at a 151,936-token vocabulary 4096 positions take 1.2 GB each)."""
    total, worst, agree, tokens = 0.0, float("-inf"), 0, 0
    for row in windows:
        ids = row.unsqueeze(0).to(device)
        p_log = F.log_softmax(source(input_ids=ids).logits[0].float(), dim=-1)
        q_log = F.log_softmax(quantized(input_ids=ids).logits[0].float(), dim=-1)
        kl = (p_log.exp() * (p_log - q_log)).sum(-1)
        total, worst = total + float(kl.sum()), max(worst, float(kl.max()))
        agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        tokens += kl.numel()
    return {"mean_kl": max(total / tokens, 0.0), "max_kl": worst, "top1_agreement": agree / tokens, "tokens": tokens}


@torch.no_grad()
def evaluate_and_verify(resolved, folder: Path, plan: StreamPlan, recipe, ppl_windows, kl_windows, device,
                        on_layer: Callable[[], None] | None = None) -> dict:
    """{"source": ppl, "quantized": ppl (None without perplexity windows), "kl": KL vs source (`kl_by_window`),
    "verification": dict, "layer_errors": {Linear: relative weight error}}."""
    model_dtype = getattr(torch, recipe.model.dtype)
    eval_dtype = "float32" if device.type == "cpu" else recipe.model.dtype
    model, _tok, store = load_offloaded(resolved, eval_dtype, Path(folder) / "_unused_offload")
    checker = _Checker(folder, plan, recipe, model_dtype)
    try:
        for key, t in model.state_dict().items():  # resident tensors: embeddings, final norm, untied lm_head
            if store.layer_index(key) is None and key in checker.out.entries:
                checker.plain(key, t)
        windows = max((w for w in (ppl_windows, kl_windows) if w is not None), key=lambda w: w.shape[0])
        cache = capture_layer0_inputs(model, store.adapter, windows, 1, device)
        src, q = cache.hidden, [h.clone() for h in cache.hidden]
        act_specs = {n: s for n in plan.quantized if (s := spec_of(recipe.quantizer_config).activation_spec(
            recipe.quantizer_config, n)) is not None}
        for i in range(len(store.layers)):
            _layer_pass(model, store, checker, i, src, q, cache.kwargs, act_specs, device)
            if on_layer:
                on_layer()
        heads = [HeadModel(model, store.adapter, windows, hidden, device) for hidden in (src, q)]
        result = {label: perplexity(head, ppl_windows, device) if ppl_windows is not None else None
                  for label, head in zip(("source", "quantized"), heads)}
        result["kl"] = kl_by_window(*heads, kl_windows, device) if kl_windows is not None else None
    finally:
        checker.close()
        store.release_all()
    loader = (f"qwenquant spec reader for {recipe.export.format} ({FORMATS[recipe.export.format].read_linear.__module__}),"
              " one decoder layer at a time: every quantized Linear compared bit for bit with the quantizer applied "
              "again to the source weight, every other tensor with the source; KL vs source computed from the "
              "weights as read back")
    problems = [(checker.mismatched, "stored weights read back differ from the quantizer's"),
                (checker.others_mismatched, "stored tensors differ from the source or are missing")]
    result["verification"] = verdict(loader, plan.quantized, problems, result["kl"] or {"mean_kl": 0.0},
                                     recipe.eval.verify_max_kl, {"mode": "streamed",
                                                                 "other_tensors_checked": checker.others_checked,
                                                                 "other_tensors_mismatched": checker.others_mismatched})
    result["layer_errors"] = checker.errors
    return result


def _layer_pass(model, store, checker: _Checker, i: int, src: list, q: list, kwargs: list, act_specs: dict,
                device) -> None:
    """Layer i: source windows forward, tensors checked, quantized windows forward (see the module doc)."""
    prefix = store.prefix(i)
    layer = store.materialize(i)
    try:
        layer.to(device)
        for j, kw in enumerate(kwargs):
            out = layer(src[j].to(device), **to_device(kw, device))
            src[j] = (out[0] if isinstance(out, tuple) else out).detach().to("cpu")
        state = {prefix + k: v for k, v in layer.state_dict().items()}
        source_w = {k[:-len(".weight")]: v for k, v in state.items() if k[:-len(".weight")] in checker.quantized}
        for key, t in state.items():
            module = key.rsplit(".", 1)[0]
            if module in checker.quantized and key.endswith(".weight"):
                continue
            checker.plain(key, t)
        for name in sorted(source_w):
            lin = model.get_submodule(name)
            lin.weight.data = checker.linear(name, source_w).to(lin.weight.dtype).to(device)
        with activation_quantization(model, act_specs):
            for j, kw in enumerate(kwargs):
                out = layer(q[j].to(device), **to_device(kw, device))
                q[j] = (out[0] if isinstance(out, tuple) else out).detach().to("cpu")
    finally:
        store.release(i, dirty=False)
