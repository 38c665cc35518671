"""Sparse MoE blocks (Qwen3-MoE) as one `nn.Linear` per expert projection, and calibration of every expert.

transformers 5 keeps a sparse block's experts fused in 3D parameters (`experts.gate_up_proj [E, 2I, H]`,
`experts.down_proj [E, H, I]`, converted at load from the on-disk per-expert tensors). Every qwenquant stage works
on `nn.Linear`, so `unfuse_experts` replaces each fused experts module, right after loading, by `LinearExperts`:
the same computation with one Linear per projection, named exactly as the on-disk checkpoint and vLLM name them
(`mlp.experts.E.gate_proj/up_proj/down_proj`). The model keeps that layout to the end: the exporter writes the
per-expert tensors under their own names, and transformers and vLLM fuse them again when they load.

Calibration: the router sends each token to only top-k experts, so some experts see few or no calibration tokens.
Inside `observe_all_tokens(layer, names)` (which `LayerContext.observe_inputs` enters) every observed expert runs
on EVERY token, so its Linears' observers (GPTQ Hessians, AWQ/SmoothQuant statistics, FP8 input scales) get the
statistics of all calibration tokens; the layer's output still adds only the routed tokens' contributions, weighted
by the router. (Outside it, e.g. when the pipeline propagates a layer's outputs, experts compute only their routed
tokens, exactly as transformers does.) `routing_counts(layer)` records how many tokens the router actually sent to
each expert; the pipeline puts them in the layer report.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from qwenquant.model.qwen3 import ArchAdapter, MoESpec


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), the projections named as on disk."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module):
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free Linear owning a copy of `weight` [out, in] (a copy: the fused parameter is freed)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return lin


class LinearExperts(nn.ModuleList):
    """Drop-in replacement of transformers' fused experts module (same forward signature and result).

    Children are the experts `0..E-1`. `observed` (set by `observe_all_tokens`) holds experts that run on every
    token; `counts` (set by `routing_counts`) accumulates routed tokens per expert."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.observed: frozenset[int] = frozenset()
        self.counts: torch.Tensor | None = None  # [E] routed tokens per expert, then the token count

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], top_k_index / top_k_weights [T, k] -> sum over each token's experts of weight * expert(x).

        Mirrors transformers' eager loop (experts in index order, tokens gathered as `where` orders them,
        `index_add_` in the hidden dtype), so it reproduces it bit for bit."""
        out = torch.zeros_like(hidden_states)
        if self.counts is not None:
            self.counts[:-1] += torch.bincount(top_k_index.flatten().cpu(), minlength=len(self))[: len(self)]
            self.counts[-1] += top_k_index.shape[0]
        by_slot = top_k_index.t()  # [k, T]: where() lists (slot, token) pairs like transformers' expert mask
        for e, expert in enumerate(self):
            slot, token = torch.where(by_slot == e)
            if e in self.observed:  # every token through the expert (observers see all), routed rows kept
                y = expert(hidden_states)[token]
            elif token.numel() == 0:
                continue
            else:
                y = expert(hidden_states[token])
            y = y * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _fused_experts(layer: nn.Module, spec: MoESpec) -> nn.Module | None:
    """The layer's fused experts module (transformers layout), or None (a dense layer, or already split)."""
    try:
        module = layer.get_submodule(spec.experts)
    except AttributeError:
        return None
    fused = all(isinstance(getattr(module, p, None), torch.Tensor) for p in spec.fused_params)
    return module if fused else None


@torch.no_grad()
def split_experts(module: nn.Module, spec: MoESpec) -> LinearExperts:
    """A `LinearExperts` computing exactly what the fused `module` computes (weights copied)."""
    gate_up, down = (getattr(module, p) for p in spec.fused_params)
    inter = gate_up.shape[1] // 2
    return LinearExperts([ExpertMLP(gate_up[e, :inter], gate_up[e, inter:], down[e], module.act_fn)
                          for e in range(gate_up.shape[0])])


def unfuse_experts(model: nn.Module, adapter: ArchAdapter) -> int:
    """Replace every decoder layer's fused experts by `LinearExperts` in place, one layer at a time (peak memory:
    the model plus one layer's experts). Returns how many layers were split."""
    spec = adapter.moe
    if spec is None:
        return 0
    parent_path, _, child = spec.experts.rpartition(".")
    split = 0
    for layer in model.get_submodule(adapter.layers_path):
        fused = _fused_experts(layer, spec)
        if fused is None:
            continue
        parent = layer.get_submodule(parent_path) if parent_path else layer
        setattr(parent, child, split_experts(fused, spec))
        split += 1
    return split


def unfuse_model(model: nn.Module) -> nn.Module:
    """`unfuse_experts` with the adapter of the model's architecture (e.g. a checkpoint reloaded by transformers, so
    its experts' weights can be compared Linear by Linear). Returns the model."""
    from qwenquant.model.qwen3 import adapter_for

    adapter = adapter_for((getattr(model.config, "architectures", None) or [""])[0])
    if adapter is not None:
        unfuse_experts(model, adapter)
    return model


def _linear_experts(layer: nn.Module) -> list[tuple[str, LinearExperts]]:
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, LinearExperts)]


@contextmanager
def observe_all_tokens(layer: nn.Module, names: list[str]) -> Iterator[None]:
    """Inside the block, the experts owning any of `names` (Linear names relative to `layer`) run on every token,
    so their observers see all calibration tokens; the layer's output is unchanged. No-op for dense layers."""
    saved = []
    try:
        for path, experts in _linear_experts(layer):
            head = path + "."
            wanted = {int(n[len(head):].split(".", 1)[0]) for n in names if n.startswith(head)}
            if wanted:
                saved.append((experts, experts.observed))
                experts.observed = frozenset(wanted) | experts.observed
        yield
    finally:
        for experts, observed in saved:
            experts.observed = observed


@contextmanager
def routing_counts(layer: nn.Module) -> Iterator[dict]:
    """Count the tokens the router sends to each expert during forwards inside the block. Yields a dict that, on
    exit, holds `{"moe_routing": {experts path: {"tokens": n, "routed_tokens": [per expert],
    "experts_without_tokens": [...]}}}` (empty for a dense layer). Each token counts once for each of its top-k
    experts."""
    found = _linear_experts(layer)
    result: dict = {}
    try:
        for _, experts in found:
            experts.counts = torch.zeros(len(experts) + 1, dtype=torch.long)
        yield result
        routing = {}
        for path, experts in found:
            *counts, tokens = (int(c) for c in experts.counts)
            routing[path] = {"tokens": tokens, "routed_tokens": counts,
                             "experts_without_tokens": [e for e, c in enumerate(counts) if c == 0]}
        if routing:
            result["moe_routing"] = routing
    finally:
        for _, experts in found:
            experts.counts = None
