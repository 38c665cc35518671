"""Evaluation without a full-model forward (`--offload-dir`): the decoder layers run one at a time over all windows.

`capture_layer0_inputs` (the pipeline's) gives layer 0's inputs and keyword arguments for every window (batch 1, as
`perplexity()` runs them); each decoder layer is then materialized, run over every window, and released unchanged;
the final norm and lm_head turn the last hidden states into logits. `evaluate_windows()` (perplexity and
next-token log-probs from one forward per window) then runs on a stand-in model that returns those logits, so the
conventions (slicing, float32 cross-entropy, fp16 storage of log-probs) are `qwenquant.eval.perplexity`'s by
construction, and the numbers equal the full model's (tests/runner/test_offload.py). Activation quantization hooks
registered on the model's Linears by name apply as usual: the module objects persist across materialize/release. On the CPU everything computes in float32
(`qwenquant.eval.precision`): each module's float32 copy exists only during its own forward.

Memory: the hidden states of every evaluated window ([windows, window, hidden] in the compute dtype: float32 on the
CPU) stay on CPU while the layers stream, plus one layer and the resident tensors.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from qwenquant.activations import capture_layer0_inputs, to_device
from qwenquant.eval.perplexity import PerplexityResult, evaluate_windows, union_windows
from qwenquant.eval.precision import evaluation_precision


@torch.no_grad()
def final_hidden_states(model: nn.Module, store, windows: torch.Tensor, device: torch.device,
                        on_layer: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """[1, window, hidden] on CPU per window: the last decoder layer's output, computed one layer at a time."""
    adapter = store.adapter
    cache = capture_layer0_inputs(model, adapter, windows, 1, device)
    hidden = cache.hidden
    for i in range(len(store.layers)):
        layer = store.materialize(i)
        try:
            layer.to(device)
            for j, (h, kw) in enumerate(zip(hidden, cache.kwargs)):
                out = layer(h.to(device), **to_device(kw, device))
                hidden[j] = (out[0] if isinstance(out, tuple) else out).detach().to("cpu")
        finally:
            store.release(i, dirty=False)
        if on_layer:
            on_layer()
    return hidden


class HeadModel:
    """Stands in for the model in `perplexity()` / `next_token_logprobs()`: for a window it has the final hidden
    states of, returns `.logits` = lm_head(final_norm(hidden)), as the full model's forward computes them."""

    def __init__(self, model: nn.Module, adapter, windows: torch.Tensor, hidden: list[torch.Tensor],
                 device: torch.device):
        # the head runs where the hidden states are taken (a streamed run keeps the model itself on the CPU)
        self.norm = model.get_submodule(adapter.final_norm).to(device)
        self.lm_head = model.get_submodule(adapter.lm_head).to(device)
        self.device = device
        self.hidden = {self._key(row): h for row, h in zip(windows, hidden)}

    @staticmethod
    def _key(row: torch.Tensor) -> bytes:
        return row.detach().to("cpu", torch.long).contiguous().numpy().tobytes()

    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        del use_cache
        if input_ids.shape[0] != 1:
            raise ValueError("HeadModel evaluates one window at a time")
        h = self.hidden[self._key(input_ids[0])].to(self.device)
        return SimpleNamespace(logits=self.lm_head(self.norm(h)))


@torch.no_grad()
def evaluate_layerwise(model: nn.Module, store, ppl_windows: torch.Tensor | None, kl_windows: torch.Tensor,
                       device: torch.device, on_layer: Callable[[], None] | None = None,
                       on_step: Callable[[], None] | None = None) -> tuple[PerplexityResult | None, torch.Tensor]:
    """(perplexity over `ppl_windows` or None, log-probs over `kl_windows`): what `evaluate_windows()` returns for
    the full model, with one layer pass over the union of the windows."""
    adapter = store.adapter
    windows = union_windows(ppl_windows, kl_windows)[0]
    with evaluation_precision(model, device):
        hidden = final_hidden_states(model, store, windows, device, on_layer)
        head = HeadModel(model, adapter, windows, hidden, device)
        resident = [head.norm, head.lm_head]
        try:
            for m in resident:
                m.to(device)
            return evaluate_windows(head, ppl_windows, kl_windows, device, on_step=on_step)
        finally:
            for m in resident:
                m.to("cpu")
