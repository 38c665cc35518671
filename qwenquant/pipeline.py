"""The sequential per-layer loop: capture layer 0's inputs, run the recipe's stages on one decoder layer at a time,
then propagate the *quantized* layer's outputs as the next layer's inputs.

The loop asks each stage's registry entry (qwenquant/stages/spec.py) what it needs: a copy of the layer as it
enters the quantizer (`float_copy`), the unquantized model's activations beside the quantized ones (`float_path`).
Where layers live (in memory or offloaded to disk) and where finished layers go (the run journal) are the
`layers` and `journal` objects' business.
"""

from __future__ import annotations

import resource
import time
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from qwenquant.activations import (
    ActivationCache,
    activation_quantization,
    capture_layer0_inputs,
    decoder_layers,
    to_device,
)
from qwenquant.distributed import World
from qwenquant.errors import BadInputError
from qwenquant.kv_simulation import kv_calibration
from qwenquant.model.moe import routing_counts
from qwenquant.model.qwen3 import ArchAdapter
from qwenquant.quant.errors import NonFiniteError
from qwenquant.stages.context import LayerContext
from qwenquant.stages.registry import spec_of
from qwenquant.state import QuantState

CALIBRATION_BATCH = 8  # calibration samples per layer forward


@torch.no_grad()
def propagate_float(ctx: LayerContext) -> ActivationCache:
    """The next layer's inputs in the unquantized model: this layer as it entered the quantizer, on its float inputs."""
    params = {k: v.to(ctx.device) for k, v in ctx.float_state.items()}
    outs = []
    for h, kw in zip(ctx.float_cache.hidden, ctx.float_cache.kwargs):
        out = functional_call(ctx.layer, params, (h.to(ctx.device),), to_device(kw, ctx.device))
        outs.append((out[0] if isinstance(out, tuple) else out).detach().to(ctx.float_cache.store_device))
    return ActivationCache(outs, ctx.float_cache.kwargs, ctx.float_cache.store_device)


def peak_host_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _starting_inputs(model, adapter, ids, device, journal, layers, state, layer_store, float_path: bool):
    """(layers already done, their journaled outputs or freshly captured layer-0 inputs, the float path's inputs)."""
    start = journal.layers_done() if journal is not None else 0
    t0 = time.perf_counter()
    if start:
        restored = journal.restore(layers, adapter.layers_path, state, start, layer_store=layer_store)
        cache = ActivationCache(*restored[:2]) if restored is not None else None
        float_hidden = restored[2] if restored is not None else None
    else:  # no calibration ids (RTN alone): nothing is captured or propagated
        cache = capture_layer0_inputs(model, adapter, ids, CALIBRATION_BATCH, device) if ids is not None else None
        float_hidden = list(cache.hidden) if cache is not None else None
        state.add_time("capture", time.perf_counter() - t0)
    float_cache = None
    if float_path and cache is not None:
        if float_hidden is None:
            raise BadInputError("the interrupted run kept no unquantized-model activations; run without --resume")
        float_cache = ActivationCache(float_hidden, cache.kwargs)
    return start, cache, float_cache


def _run_stages(ctx: LayerContext, stages: list, report: dict) -> None:
    """Each stage config in recipe order on the layer in `ctx`, timed, its report under its name."""
    keep_float = any(spec_of(cfg).float_copy(cfg) for cfg in stages)
    for cfg in stages:
        spec = spec_of(cfg)
        ctx.unfreeze_all()  # a stage may change any weight: outputs frozen by an earlier stage are stale
        if keep_float and spec.role == "quantizer":  # a refine stage fits the quantized layer to this copy
            ctx.float_state = {k: v.detach().clone() for k, v in ctx.layer.state_dict().items()}
        t = time.perf_counter()
        try:
            report[spec.name] = spec.run(ctx, cfg)
        except NonFiniteError as err:  # NaN/Inf in the weights or calibration data: bad input, not a bug
            raise BadInputError(f"{spec.name} failed on decoder layer {ctx.index}: {err}") from err
        ctx.state.add_time(spec.name, time.perf_counter() - t)


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    adapter: ArchAdapter,
    ids: torch.Tensor | None,
    stages: list,
    device: torch.device,
    state: QuantState,
    on_layer_done: Callable[[int, int], None] | None = None,
    journal=None,
    layer_store=None,
    world: World | None = None,
    kv_strategy: str | None = None,
) -> QuantState:
    """For each decoder layer: onload, run each stage config (recipe order) on it, propagate quantized outputs,
    offload.

    With a `journal` (qwenquant/journal.py) each finished layer is persisted (its records leave memory) and layers
    an interrupted run already finished are restored instead of recomputed. With a `layer_store`
    (qwenquant/model/offload.py, --offload-dir) decoder layers live on disk: each is materialized before it is
    processed and released (written back) after. With a `kv_strategy` (--kv-cache fp8: tensor | head) the
    propagation forwards of each quantized layer also observe its K/V and set its FP8 KV-cache scales
    (`state.kv_scales`); the next layer's inputs do not include the FP8 cache's error.
    With a distributed `world` each rank captures and propagates only its shard of `ids` (`World.shard`, whole
    calibration batches where there are enough) and the stages combine their statistics over the ranks."""
    world = world or World()
    if ids is not None and world.distributed:
        ids = ids[world.shard(ids.shape[0], CALIBRATION_BATCH)]
    layers = decoder_layers(model, adapter)
    quantizer = next((cfg for cfg in stages if spec_of(cfg).role == "quantizer"), None)
    float_path = any(spec_of(cfg).float_path(cfg) for cfg in stages)
    start, cache, float_cache = _starting_inputs(model, adapter, ids, device, journal, layers, state, layer_store,
                                                 float_path)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, layer in enumerate(layers):
        if i >= start:
            if layer_store is not None:
                layer_store.materialize(i)
            layer.to(device)
            ctx = LayerContext(i, f"{adapter.layers_path}.{i}.", layer, adapter.for_layer(model.config, i), cache,
                               device, model.config, state, quantizer, float_cache=float_cache, world=world)
            report: dict = {"layer": i}
            _run_stages(ctx, stages, report)
            if cache is not None:
                t = time.perf_counter()
                if float_cache is not None:
                    float_cache = propagate_float(ctx)
                if kv_strategy is not None:
                    ctx.unfreeze_all()  # a frozen attention returns stored outputs: its K/V would not be computed
                attention = f"{ctx.prefix}{adapter.attention}"
                with activation_quantization(layer, ctx.activation_specs()), routing_counts(layer) as routing, \
                        kv_calibration(layer, attention, ctx.prefix, kv_strategy, state, model.dtype,
                                       combine_max=world.max_) as kv_report:
                    cache = ActivationCache(ctx.forward(keep_outputs=True), cache.kwargs, cache.store_device)
                report.update(routing)  # MoE: calibration tokens the router sent to each expert
                if kv_report:
                    report["kv_cache"] = kv_report
                state.add_time("propagate", time.perf_counter() - t)
            ctx.unfreeze_all()
            layer.to("cpu")
            state.layer_reports.append(report)
            if journal is not None:
                journal.save_layer(i, ctx.prefix, layer, state, cache, float_cache)
            if layer_store is not None:  # the other ranks stop after the loop: they never read a finished layer again
                layer_store.release(i, dirty=world.main)
        if on_layer_done:
            on_layer_done(i + 1, len(layers))
    if device.type == "cuda":
        state.peak_device_bytes = max(state.peak_device_bytes, torch.cuda.max_memory_allocated(device))
    return state
