"""Calibration activations outside any stage: the cache of a decoder layer's inputs, capturing layer 0's inputs,
moving nested inputs between devices, and simulating activation quantization with hooks (inside a context manager
that always removes them)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from qwenquant.model.qwen3 import ArchAdapter
from qwenquant.state import ActivationSpec


class StopForward(Exception):
    """Raised by an observing hook once everything needed from this forward is recorded."""


def decoder_layers(model: nn.Module, adapter: ArchAdapter) -> nn.ModuleList:
    return model.get_submodule(adapter.layers_path)  # type: ignore[return-value]


@dataclass
class ActivationCache:
    """Inputs of the current decoder layer, one entry per calibration batch, kept on `store_device`."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    store_device: torch.device = torch.device("cpu")

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def to_device(obj, device):
    """`obj` (a tensor or nested tuples/lists/dicts of them) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer0_inputs(
    model: nn.Module, adapter: ArchAdapter, ids: torch.Tensor, batch_size: int, device: torch.device
) -> ActivationCache:
    """Run the embedding (and rotary) on each calibration batch and record what decoder layer 0 receives."""
    layers = decoder_layers(model, adapter)
    hidden, kwargs_list = [], []

    def hook(_module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        hidden.append(h.detach().to("cpu"))
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")}
        kwargs_list.append(to_device(kw, "cpu"))
        raise StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    # Only the modules in front of layer 0 need the device (embeddings, rotary embedding).
    base = model.get_submodule(adapter.layers_path.rsplit(".", 1)[0])
    front = [m for n, m in base.named_children() if n != adapter.layers_path.rsplit(".", 1)[1]]
    try:
        for m in front:
            m.to(device)
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
        for m in front:
            m.to("cpu")
    return ActivationCache(hidden, kwargs_list)


@contextmanager
def activation_quantization(model: nn.Module, specs: dict[str, ActivationSpec], prefix: str = "",
                            straight_through: bool = False) -> Iterator[None]:
    """Simulate activation quantization (`ActivationSpec.quantize`: FP8, or INT8 per token) on the inputs of the
    given Linears (names relative to `model`, after stripping `prefix`) for the duration of the block; hooks are
    always removed.
    `straight_through`: gradients pass the quantization unchanged (for error-compensation fine-tuning)."""
    handles = []
    try:
        for name, spec in specs.items():
            if prefix and not name.startswith(prefix):
                continue
            module = model.get_submodule(name[len(prefix):])

            def hook(_m, args, spec=spec):
                x = spec.quantize(args[0])
                if straight_through:
                    x = args[0] + (x - args[0]).detach()
                return (x, *args[1:])

            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
