"""What a stage sees: one decoder layer on the compute device, its captured calibration inputs, the run state, and
the hooks a stage may use (observe Linear inputs, freeze a finished submodule's outputs)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import torch
from torch import nn

from qwenquant.activations import ActivationCache, StopForward, to_device
from qwenquant.model.moe import observe_all_tokens
from qwenquant.model.qwen3 import ArchAdapter
from qwenquant.state import ActivationSpec, QuantState


@dataclass
class LayerContext:
    """What a stage sees: one decoder layer on the compute device and its captured inputs."""

    index: int
    prefix: str  # e.g. "model.layers.3."
    layer: nn.Module
    adapter: ArchAdapter
    cache: ActivationCache
    device: torch.device
    model_config: object
    state: QuantState
    quantizer: object = None  # the recipe's quantizer config (a smooth stage's alpha search measures its error)
    float_state: dict[str, torch.Tensor] | None = None  # the layer as it entered the quantizer (compensate only)
    float_cache: ActivationCache | None = None  # this layer's inputs in the unquantized model (compensate target=float)
    # per Linear: the weight a quantizer rounded to nearest when that is not the float weight (GPTQ's error-fed
    # weights); compensation tunes the rounding from it
    pre_rounding: dict[str, torch.Tensor] = field(default_factory=dict)
    _stop_early: bool = field(default=False, repr=False)
    _batch: int = field(default=0, repr=False)
    _frozen: dict[str, tuple[nn.Module, Callable | None]] = field(default_factory=dict, repr=False)

    def linear(self, name: str) -> nn.Linear:
        return self.layer.get_submodule(name)  # type: ignore[return-value]

    def full_name(self, name: str) -> str:
        return self.prefix + name

    @torch.no_grad()
    def forward(self, keep_outputs: bool = False) -> list[torch.Tensor]:
        """Run the layer over every calibration batch (with the current weights and hooks).

        Inside `observe_inputs(..., stop_early=True)` each batch stops once every observed Linear has seen its
        input (nothing after it is needed), so outputs cannot be kept there."""
        if keep_outputs and self._stop_early:
            raise RuntimeError("forward(keep_outputs=True) inside observe_inputs(stop_early=True)")
        outs = []
        for self._batch, (h, kw) in enumerate(zip(self.cache.hidden, self.cache.kwargs)):
            try:
                out = self.layer(h.to(self.device), **to_device(kw, self.device))
            except StopForward:
                continue
            out = out[0] if isinstance(out, tuple) else out
            if keep_outputs:
                outs.append(out.detach().to(self.cache.store_device))
        return outs

    @contextmanager
    def observe_inputs(self, names: list[str], fn: Callable[[str, torch.Tensor], None],
                       stop_early: bool = True) -> Iterator[None]:
        """Call fn(name, input) for each listed Linear during forwards inside the block.

        `stop_early`: abandon each batch's forward once all listed Linears have seen their inputs (true-sequential
        GPTQ observes q/k/v, o, gate/up and down in turn; the rest of the layer would be computed for nothing)."""
        handles, seen = [], set()
        wanted = set(names)

        def hook(_m, args, name):
            fn(name, args[0].detach())
            if stop_early:
                seen.add(name)
                if seen >= wanted:
                    seen.clear()
                    raise StopForward

        try:
            for name in names:
                handles.append(self.linear(name).register_forward_pre_hook(partial(hook, name=name)))
            self._stop_early = stop_early
            with observe_all_tokens(self.layer, names):  # MoE: observed experts see every token (model/moe.py)
                yield
        finally:
            self._stop_early = False
            for h in handles:
                h.remove()

    def freeze_outputs(self, submodule: str) -> None:
        """Promise that `submodule`'s weights are final for the rest of this stage: from now on its output per
        calibration batch is computed once and then reused (e.g. self_attn once q/k/v/o are quantized, saving the
        attention in the later GPTQ passes). `unfreeze_all` ends the promise; the pipeline calls it before every
        stage and after propagation."""
        module = self.layer.get_submodule(submodule)
        if submodule in self._frozen:
            return
        outputs: list = [None] * len(self.cache.hidden)
        original = module.forward
        ctx = self

        def forward(*args, **kwargs):
            if outputs[ctx._batch] is None:
                outputs[ctx._batch] = to_device(original(*args, **kwargs), ctx.cache.store_device)
            return to_device(outputs[ctx._batch], ctx.device)

        self._frozen[submodule] = (module, module.__dict__.get("forward"))  # an instance forward (hooks) or None
        module.forward = forward

    def unfreeze_all(self) -> None:
        for module, instance_forward in self._frozen.values():
            if instance_forward is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = instance_forward
        self._frozen.clear()

    def activation_specs(self) -> dict[str, ActivationSpec]:
        """This layer's activation specs, keyed by names relative to the layer."""
        return {
            name[len(self.prefix):]: spec
            for name, spec in self.state.activations.items()
            if name.startswith(self.prefix)
        }
