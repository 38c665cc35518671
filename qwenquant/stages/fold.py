"""Folding per-channel factors through a smoothing mapping (SmoothQuant's smoothing, AWQ's scales)."""

from __future__ import annotations

import torch

from qwenquant.quant import smooth as sq
from qwenquant.stages.context import LayerContext


def fold_mapping(ctx: LayerContext, m, s: torch.Tensor) -> torch.Tensor:
    """Divide what `m.smooth` emits by s and multiply the balance Linears' input columns by s (exact in float).

    Under GQA (v_proj -> o_proj) s is first tied over the query heads sharing a v head; returns the s applied.
    """
    smooth_mod = ctx.layer.get_submodule(m.smooth)
    if m.gqa:
        mc = ctx.model_config
        heads, kv, hd = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
        s_kv = sq.tie_over_kv_groups(s, heads, kv, hd)
        s = sq.expand_kv_to_heads(s_kv, heads, kv, hd)
        smooth_mod.weight.data = sq.fold_into_output_rows(smooth_mod.weight.data, s_kv)
    elif m.kind == "linear":
        smooth_mod.weight.data = sq.fold_into_output_rows(smooth_mod.weight.data, s)
    else:
        smooth_mod.weight.data = sq.fold_into_norm(smooth_mod.weight.data, s)
    for name in m.balance + m.passthrough:  # passthrough: unquantized readers (MoE router) keep the function exact
        lin = ctx.linear(name)
        lin.weight.data = sq.fold_into_input_columns(lin.weight.data, s)
    return s
