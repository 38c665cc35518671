"""The sequential per-layer pipeline: capture layer inputs, run the recipe's stages on one decoder layer at a
time, then propagate the *quantized* layer's outputs as the next layer's inputs.

Only this module and `qwenquant/stages.py` touch live modules; algorithms in `qwenquant/quant/` are pure.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from qwenquant.errors import BadInputError
from qwenquant.model.moe import observe_all_tokens, routing_counts
from qwenquant.model.qwen3 import ArchAdapter
from qwenquant.quant.fp8 import fake_quantize_activation
from qwenquant.quant.records import QuantizedWeight
from qwenquant.recipe import QUANTIZER_STAGES


class _StopForward(Exception):
    """Raised by an observing hook once everything needed from this forward is recorded."""


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


def decoder_layers(model: nn.Module, adapter: ArchAdapter) -> nn.ModuleList:
    return get_module(model, adapter.layers_path)  # type: ignore[return-value]


@dataclass
class ActivationCache:
    """Inputs of the current decoder layer, one entry per calibration batch, kept on `store_device`."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    store_device: torch.device = torch.device("cpu")

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
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
        kwargs_list.append(_to(kw, "cpu"))
        raise _StopForward

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
            except _StopForward:
                pass
    finally:
        handle.remove()
        for m in front:
            m.to("cpu")
    return ActivationCache(hidden, kwargs_list)


@dataclass
class ActivationSpec:
    """How a quantized Linear's input is quantized at inference: mode token | group | tensor."""

    mode: str
    input_scale: torch.Tensor | None = None
    group_size: int = 128


@dataclass
class QuantState:
    """Everything the run produced per Linear (full dotted names), plus per-layer reports."""

    records: dict[str, QuantizedWeight] = field(default_factory=dict)
    activations: dict[str, ActivationSpec] = field(default_factory=dict)
    layer_reports: list[dict] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    peak_device_bytes: int = 0
    keep: set[str] = field(default_factory=set)  # Linears the quantizer stages must skip (mixed precision)
    searched: dict[str, dict] = field(default_factory=dict)  # scale search choices, e.g. {"fp8.clip": {name: r}}

    def add_time(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds


@contextmanager
def activation_quantization(model: nn.Module, specs: dict[str, ActivationSpec], prefix: str = "",
                            straight_through: bool = False) -> Iterator[None]:
    """Simulate FP8 activation quantization on the inputs of the given Linears (names relative to `model`,
    after stripping `prefix`) for the duration of the block; hooks are always removed.
    `straight_through`: gradients pass the quantization unchanged (for error-compensation fine-tuning)."""
    handles = []
    try:
        for name, spec in specs.items():
            if prefix and not name.startswith(prefix):
                continue
            module = model.get_submodule(name[len(prefix):])

            def hook(_m, args, spec=spec):
                x = fake_quantize_activation(args[0], spec.mode, spec.input_scale, spec.group_size)
                if straight_through:
                    x = args[0] + (x - args[0]).detach()
                return (x, *args[1:])

            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


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
                out = self.layer(h.to(self.device), **_to(kw, self.device))
            except _StopForward:
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
                    raise _StopForward

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
                outputs[ctx._batch] = _to(original(*args, **kwargs), ctx.cache.store_device)
            return _to(outputs[ctx._batch], ctx.device)

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


Stage = Callable[[LayerContext], dict]


@torch.no_grad()
def propagate_float(ctx: LayerContext) -> ActivationCache:
    """The next layer's inputs in the unquantized model: this layer as it entered the quantizer, on its float inputs."""
    from torch.func import functional_call

    params = {k: v.to(ctx.device) for k, v in ctx.float_state.items()}
    outs = []
    for h, kw in zip(ctx.float_cache.hidden, ctx.float_cache.kwargs):
        out = functional_call(ctx.layer, params, (h.to(ctx.device),), _to(kw, ctx.device))
        outs.append((out[0] if isinstance(out, tuple) else out).detach().to(ctx.float_cache.store_device))
    return ActivationCache(outs, ctx.float_cache.kwargs, ctx.float_cache.store_device)


def peak_host_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    adapter: ArchAdapter,
    ids: torch.Tensor | None,
    stages: list[tuple[str, Stage]],
    device: torch.device,
    state: QuantState,
    batch_size: int = 8,
    on_layer_done: Callable[[int, int], None] | None = None,
    journal=None,
    layer_store=None,
) -> QuantState:
    """For each decoder layer: onload, run each (name, stage) in order, propagate quantized outputs, offload.

    With a `journal` (qwenquant/journal.py) each finished layer is persisted (its records leave memory) and layers
    an interrupted run already finished are restored instead of recomputed. With a `layer_store`
    (qwenquant/model/offload.py, --offload-dir) decoder layers live on disk: each is materialized before it is
    processed and released (written back) after."""
    layers = decoder_layers(model, adapter)
    start = journal.layers_done() if journal is not None else 0
    t0 = time.perf_counter()
    if start:
        restored = journal.restore(layers, adapter.layers_path, state, start, layer_store=layer_store)
        cache = ActivationCache(*restored[:2]) if restored is not None else None
    else:  # no calibration ids (RTN alone): nothing is captured or propagated
        cache = capture_layer0_inputs(model, adapter, ids, batch_size, device) if ids is not None else None
        state.add_time("capture", time.perf_counter() - t0)
    keep_float = any(name == "compensate" for name, _ in stages)
    # the unquantized model's own activations, propagated beside the quantized path (compensation to float targets)
    float_path = any(getattr(getattr(stage, "keywords", {}).get("cfg"), "target", None) == "float"
                     for _, stage in stages)
    float_cache = None
    if float_path and cache is not None:
        float_hidden = restored[2] if start else list(cache.hidden)
        if float_hidden is None:
            raise BadInputError("the interrupted run kept no unquantized-model activations; run without --resume")
        float_cache = ActivationCache(float_hidden, cache.kwargs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, layer in enumerate(layers):
        if i < start:
            if on_layer_done:
                on_layer_done(i + 1, len(layers))
            continue
        if layer_store is not None:
            layer_store.materialize(i)
        layer.to(device)
        ctx = LayerContext(i, f"{adapter.layers_path}.{i}.", layer, adapter.for_layer(model.config, i), cache, device,
                           model.config, state, float_cache=float_cache)
        report: dict = {"layer": i}
        for name, stage in stages:
            ctx.unfreeze_all()  # a stage may change any weight: outputs frozen by an earlier stage are stale
            if keep_float and name in QUANTIZER_STAGES:  # a compensate stage fits the quantized layer to this copy
                ctx.float_state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
            t = time.perf_counter()
            try:
                report[name] = stage(ctx)
            except ValueError as err:  # algorithms reject non-finite or impossible inputs with ValueError
                raise BadInputError(f"{name} failed on decoder layer {i}: {err}") from err
            state.add_time(name, time.perf_counter() - t)
        if cache is not None:
            t = time.perf_counter()
            if float_cache is not None:
                float_cache = propagate_float(ctx)
            with activation_quantization(layer, ctx.activation_specs()), routing_counts(layer) as routing:
                cache = ActivationCache(ctx.forward(keep_outputs=True), cache.kwargs, cache.store_device)
            report.update(routing)  # MoE: calibration tokens the router sent to each expert
            state.add_time("propagate", time.perf_counter() - t)
        ctx.unfreeze_all()
        layer.to("cpu")
        state.layer_reports.append(report)
        if journal is not None:
            journal.save_layer(i, ctx.prefix, layer, state, cache, float_cache)
        if layer_store is not None:
            layer_store.release(i, dirty=True)
        if on_layer_done:
            on_layer_done(i + 1, len(layers))
    if device.type == "cuda":
        state.peak_device_bytes = max(state.peak_device_bytes, torch.cuda.max_memory_allocated(device))
    return state
