"""What the data-free path writes, decided from the meta skeleton and the source headers before any tensor is read.

The output holds the tensors the in-memory path writes (qwenquant/export/checkpoint.py `write_checkpoint`), in the
same order: the model's state dict, with each quantized Linear's `weight` replaced by its format's tensors and a
tied `lm_head.weight` left out. Each entry says where its values come from:
- `quantize`: a decoder Linear the adapter quantizes (qwenquant/model/qwen3.py); the Linears of a fused group are
  quantized by one job when the stage shares one scale across the group (`StageSpec.shares_scale`);
- `copy`: any other tensor, converted to the model dtype as from_pretrained would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qwenquant.errors import BadInputError
from qwenquant.export.registry import FORMATS
from qwenquant.stages.registry import spec_of
from qwenquant.stream.source import SourceFiles


@dataclass(frozen=True)
class Item:
    key: str  # the state-dict key (for `quantize`, the Linear's `.weight`)
    kind: str  # quantize | copy
    dtype: torch.dtype  # the model dtype of the tensor
    linear: str | None = None  # `quantize`: the Linear's full name
    job: tuple[str, ...] = ()  # `quantize`: the Linears quantized together with it (itself included)


@dataclass
class StreamPlan:
    items: list[Item]
    quantized: list[str]  # full Linear names in module order
    layers: dict[str, int] = field(default_factory=dict)  # Linear -> decoder layer index
    outputs: list[tuple[str, torch.dtype, tuple[int, ...]]] = field(default_factory=list)  # in write order


def quantized_linears(model: nn.Module, adapter, config) -> tuple[list[str], dict[str, tuple[str, ...]], dict[str, int]]:
    """(Linears the adapter quantizes in module order, each one's fused group (itself alone when unfused), each
    one's decoder layer index)."""
    n_layers = len(model.get_submodule(adapter.layers_path))
    names, group_of, layer_of = [], {}, {}
    for i, layer in enumerate(adapter.layers(config, n_layers)):
        prefix = f"{adapter.layers_path}.{i}."
        for local in layer.linears:
            names.append(prefix + local)
            layer_of[prefix + local] = i
            group_of[prefix + local] = (prefix + local,)
        for group in layer.fused_groups:  # what engines fuse (q/k/v, gate/up, each expert's gate/up)
            for local in group:
                group_of[prefix + local] = tuple(prefix + n for n in group)
    order = {n: j for j, (n, _) in enumerate(model.named_modules())}
    names.sort(key=lambda n: order[n])
    return names, group_of, layer_of


def build_plan(model: nn.Module, adapter, recipe, source: SourceFiles, reference: str) -> StreamPlan:
    """The items to write, in order, checked against the source: every tensor present with the shape the config
    implies (one-line errors naming the tensor)."""
    cfg = recipe.quantizer_config
    shared = spec_of(cfg).shares_scale(cfg)
    names, group_of, layer_of = quantized_linears(model, adapter, model.config)
    quantized = set(names)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    items = []
    for key, target in model.state_dict(keep_vars=True).items():
        if tied and key == f"{adapter.lm_head}.weight":
            continue
        entry = source.entries.get(key)
        if entry is None:
            raise BadInputError(f"--model {reference}: tensor {key} is not in the checkpoint; it does not match "
                                "its config.json")
        if tuple(entry.shape) != tuple(target.shape):
            raise BadInputError(f"--model {reference}: {key} has shape {list(entry.shape)}, config.json implies "
                                f"{list(target.shape)}")
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in quantized:
            job = group_of[module] if shared else (module,)
            items.append(Item(key, "quantize", target.dtype, module, job))
        else:
            items.append(Item(key, "copy", target.dtype if entry.dtype.is_floating_point else entry.dtype))
    return StreamPlan(items, names, layer_of, output_tensors(items, recipe, source))


def output_tensors(items: list[Item], recipe, source: SourceFiles) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every output tensor in write order. A quantized Linear's tensors are those its format
    writes for a stand-in weight of the same shape and dtype, quantized once per distinct (shape, dtype, per-Linear
    granularity): the layout depends on nothing else, and the writer checks each real tensor against it."""
    cfg = recipe.quantizer_config
    spec, fmt = spec_of(cfg), FORMATS[recipe.export.format]
    per_linear = getattr(cfg, "weights_for", lambda _name: None)  # FP8's per-Linear granularity changes the scales
    seen: dict[tuple, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = {}
    out = []
    for item in items:
        e = source.entries[item.key]
        if item.kind == "copy":
            out.append((item.key, item.dtype, e.shape))
            continue
        key = (e.shape, item.dtype, per_linear(item.linear))
        if key not in seen:
            n = math.prod(e.shape)
            i = torch.arange(n, dtype=torch.int32)
            w = (((i % 7 + 1) * (1 - 2 * (i % 2))).reshape(e.shape) * 1e-3).to(item.dtype)  # both signs in any group
            absmax = {n: float(w.abs().amax()) for n in item.job} if len(item.job) > 1 and spec.shares_scale(cfg) else None
            tensors = fmt.linear_tensors(spec.quantize_weight(cfg, item.linear, w, absmax), cfg, item.linear, None)
            seen[key] = {local: (t.dtype, tuple(t.shape)) for local, t in tensors.items()}
        out += [(f"{item.linear}.{local}", dtype, shape) for local, (dtype, shape) in seen[key].items()]
    return out
