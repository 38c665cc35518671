"""The KV cache inside a forward: observe K/V as a cache stores them (calibration), or simulate an FP8 cache.

A transformers attention module hands its keys (after k_norm and RoPE) and values to its cache's
`update(key_states, value_states, layer_idx, ...)` and attends over what that returns. A forward pre-hook on each
attention module puts a `_CacheTap` in that place (wrapping the real cache when there is one), so the hook sees
exactly what a cache would store, and can return what an FP8 cache would give back.

What `kv_cache_quantization` models: every key and value the attention reads, including the current forward's own
tokens, passes through the FP8 cache (e4m3 codes x the layer's scale), as in decoding, where each new token's K/V are
written to the cache before attention reads them. Engines whose prefill attends over the bf16 K/V of the prompt
itself only quantize what later tokens read, so this is the upper bound of the FP8 cache's error on a forward.
Queries, attention scores and the softmax stay in the compute dtype (no FP8 attention arithmetic is simulated).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from qwenquant.quant.fp8 import FP8_MAX, MIN_SCALE
from qwenquant.quant.kv_cache import fake_quantize_kv, kv_absmax, kv_scale

KVFn = Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _CacheTap:
    """Stands where the attention expects its cache: passes K/V through `fn`, then to the real cache if any."""

    def __init__(self, name: str, fn: KVFn, inner=None):
        self.name, self.fn, self.inner = name, fn, inner

    def update(self, key_states, value_states, *args, **kwargs):
        key_states, value_states = self.fn(self.name, key_states, value_states)
        if self.inner is None:
            return key_states, value_states
        return self.inner.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name: str):  # anything else an attention asks of its cache: the real one answers
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def _cache_kwarg(module: nn.Module) -> str:
    """The name of the attention forward's cache argument (`cache` in transformers 5.25, `past_key_values` before)."""
    params = inspect.signature(module.forward).parameters
    return next((n for n in ("cache", "past_key_values", "past_key_value") if n in params), "cache")


@contextmanager
def kv_hooks(model: nn.Module, names: list[str], fn: KVFn, prefix: str = "") -> Iterator[None]:
    """For the duration of the block, the K/V of each listed attention module (full names; `prefix` is stripped to
    find them in `model`) go through fn(name, k, v) -> (k, v) on their way to the cache; hooks always removed."""
    handles = []
    try:
        for name in names:
            if prefix and not name.startswith(prefix):
                continue
            module = model.get_submodule(name[len(prefix):])
            arg = _cache_kwarg(module)

            def hook(_m, args, kwargs, name=name, arg=arg):
                kwargs[arg] = _CacheTap(name, fn, kwargs.get(arg))
                return args, kwargs

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


class KVObserver:
    """Running max |K| and max |V| per attention module over every forward it sees (`kv_absmax` per `strategy`)."""

    def __init__(self, strategy: str):
        self.strategy = strategy
        self.absmax: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tokens: dict[str, int] = {}

    def __call__(self, name: str, k: torch.Tensor, v: torch.Tensor):
        ka, va = kv_absmax(k, self.strategy).cpu(), kv_absmax(v, self.strategy).cpu()
        if name in self.absmax:
            ka, va = torch.maximum(self.absmax[name][0], ka), torch.maximum(self.absmax[name][1], va)
        self.absmax[name] = (ka, va)
        self.tokens[name] = self.tokens.get(name, 0) + k.shape[0] * k.shape[2]
        return k, v


def _fake_quantizer(scales: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> KVFn:
    def quantize(name: str, k: torch.Tensor, v: torch.Tensor):
        if scales is None:  # uncalibrated: this forward's own absmax per tensor (an engine's prefill absmax)
            ks = (k.detach().float().abs().amax() / FP8_MAX).clamp(min=MIN_SCALE).reshape(1)
            vs = (v.detach().float().abs().amax() / FP8_MAX).clamp(min=MIN_SCALE).reshape(1)
        else:
            ks, vs = scales[name]
        return fake_quantize_kv(k, ks), fake_quantize_kv(v, vs)

    return quantize


@contextmanager
def kv_cache_quantization(model: nn.Module, scales: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
                          names: list[str] | None = None, prefix: str = "") -> Iterator[None]:
    """Simulate an FP8 KV cache in `model`'s forwards: the K/V of each attention module (full name -> (k_scale,
    v_scale), shapes [1] or [H, 1, 1]) are fake-quantized where the cache stores them. `scales` None: uncalibrated,
    each forward's own absmax / 448 per tensor for the attention modules `names` (what `qwenquant bench` does
    without calibrated scales). An empty dict changes nothing."""
    listed = list(scales) if scales is not None else list(names or [])
    if not listed:
        yield
        return
    with kv_hooks(model, listed, _fake_quantizer(scales), prefix):
        yield


def attention_names(model: nn.Module, layers_path: str, attention: str) -> list[str]:
    """Full names of every decoder layer's attention module."""
    return [f"{layers_path}.{i}.{attention}" for i in range(len(model.get_submodule(layers_path)))]


@contextmanager
def kv_calibration(layer: nn.Module, name: str, prefix: str, strategy: str | None, state,
                   dtype: torch.dtype, combine_max: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> Iterator[dict]:
    """Around one decoder layer's propagation forwards (`name`: its attention module's full name, `prefix`: the
    layer's): observe its K/V and, after the block, store (k_scale, v_scale) in `state.kv_scales[name]` and their
    summary in the yielded dict (the layer report's `kv_cache`). `strategy` None: nothing is observed.
    `combine_max`: the elementwise max over the ranks of a distributed run (each saw its share of the samples),
    applied to the absmax before the scales are set, so every rank writes the same scales."""
    report: dict = {}
    if strategy is None:
        yield report
        return
    observer = KVObserver(strategy)
    with kv_hooks(layer, [name], observer, prefix):
        yield report
    if name not in observer.absmax:
        raise RuntimeError(f"{name}: no K/V reached the cache during calibration")
    k_abs, v_abs = observer.absmax[name]
    if combine_max is not None:
        k_abs, v_abs = combine_max(k_abs.clone()), combine_max(v_abs.clone())
    k_scale, v_scale = kv_scale(k_abs, dtype), kv_scale(v_abs, dtype)
    state.kv_scales[name] = (k_scale, v_scale)
    report.update({"strategy": strategy, "tokens": observer.tokens[name],
                   "k_absmax": [round(float(x), 6) for x in k_abs.flatten()],
                   "v_absmax": [round(float(x), 6) for x in v_abs.flatten()],
                   "k_scale": [float(x) for x in k_scale.flatten()], "v_scale": [float(x) for x in v_scale.flatten()]})
