"""Assemble an engine-loadable checkpoint folder from the quantized model: shards, config, tokenizer.

The `recipe` passed in is a validated qwenquant.recipe.Recipe; this module reads it (its export section and its
quantizer config) and asks the export-format registry for everything format-specific, so it imports neither."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qwenquant.export.registry import FORMATS
from qwenquant.export.writer import ShardWriter
from qwenquant.model.qwen3 import adapter_for
from qwenquant.state import QuantState


def ignore_list(model: nn.Module, quantized, always: tuple[str, ...]) -> list[str]:
    """Linears left in the source dtype: always-ignored ones (lm_head), decoder Linears not quantized, and modules
    engines load as Linears that the architecture never quantizes (MoE routers `mlp.gate`, which vLLM builds with the
    checkpoint's quantization config: they must be listed by name)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    return sorted(set(names) | set(always) | set(unquantized_modules(model)))


def unquantized_modules(model: nn.Module) -> list[str]:
    """Full names of every layer's `unquantized` modules (qwenquant/model/qwen3.py)."""
    adapter = adapter_for((getattr(model.config, "architectures", None) or [""])[0])
    if adapter is None:
        return []
    n_layers = len(model.get_submodule(adapter.layers_path))
    return [f"{adapter.layers_path}.{i}.{m}" for i, layer in enumerate(adapter.layers(model.config, n_layers))
            for m in layer.unquantized]


def engine_fused_ignores(model: nn.Module, ignore: list[str]) -> list[str]:
    """vLLM/SGLang names (e.g. `model.layers.3.self_attn.qkv_proj`) of fused modules whose every shard is ignored.

    GPTQ's `dynamic` skip rules and AWQ's `modules_to_not_convert` are matched against the engine's module name, which
    for a fused group is the fused one; compressed-tensors and hf-fp8 loaders map fused names to shards themselves.
    """
    adapter = adapter_for((getattr(model.config, "architectures", None) or [""])[0])
    if adapter is None:
        return []
    skipped = set(ignore)
    out = []
    for i in range(len(model.get_submodule(adapter.layers_path))):
        prefix, layer = f"{adapter.layers_path}.{i}.", adapter.for_layer(model.config, i)
        for group, fused in zip(layer.fused_groups, layer.fused_names):
            if all(prefix + n in skipped for n in group) and prefix + fused not in out:  # MoE: one name, all experts
                out.append(prefix + fused)
    return out


def linear_tensors(recipe, name: str, state: QuantState) -> dict[str, torch.Tensor]:
    """Format-specific tensors of one quantized Linear, with local names."""
    return FORMATS[recipe.export.format].linear_tensors(state.records[name], recipe.quantizer_config, name,
                                                        state.activations.get(name))


def quantization_config(recipe, ignore: list[str], linears: list[str]) -> tuple[dict, dict | None]:
    """(config.json quantization_config, quantize_config.json content or None)."""
    return FORMATS[recipe.export.format].quantization_config(recipe.record_kind, recipe.quantizer_config, ignore,
                                                             linears)


def write_checkpoint(folder: Path, model: nn.Module, tokenizer, recipe, state: QuantState, always_ignore,
                     items=None) -> dict:
    """Write weights (sharded), config.json with quantization_config, generation config and tokenizer.

    `items`: the (key, tensor) pairs to write, default `model.state_dict().items()`; with --offload-dir the decoder
    layers are streamed from disk, one materialized at a time, in the same order (the same tensors and shards)."""
    folder = Path(folder)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    writer = ShardWriter(folder, recipe.export.max_shard_size_mb * 1024 * 1024)
    items = model.state_dict().items() if items is None else items
    for key, tensor in items:
        if tied and key == "lm_head.weight":
            continue  # one shared table: engines re-tie from the config
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in state.records:
            for local, t in linear_tensors(recipe, module, state).items():
                writer.add(f"{module}.{local}", t)
        else:
            writer.add(key, tensor)
    for attention, (k_scale, v_scale) in state.kv_scales.items():  # --kv-cache fp8: calibrated K/V scales
        writer.add(f"{attention}.k_scale", k_scale)
        writer.add(f"{attention}.v_scale", v_scale)
    files = writer.finish()
    write_metadata(folder, model, tokenizer, recipe, list(state.records), always_ignore)
    return {"files": files, "tensor_bytes": writer.total_bytes}


def write_metadata(folder: Path, model: nn.Module, tokenizer, recipe, quantized: list[str], always_ignore) -> None:
    """config.json with its quantization_config (`quantized`: full names of the quantized Linears in the order they
    were quantized; `model` may be the meta skeleton), quantize_config.json where the format has one, generation config and tokenizer."""
    ignore = ignore_list(model, set(quantized), always_ignore)
    if FORMATS[recipe.export.format].fused_ignores:  # engines match their skip lists against fused module names
        ignore = ignore + engine_fused_ignores(model, ignore)
    qconfig, quantize_config = quantization_config(recipe, ignore, quantized)
    if recipe.kv_cache.enabled:  # the recipe refused formats without one
        qconfig["kv_cache_scheme"] = FORMATS[recipe.export.format].kv_cache_scheme(recipe.kv_cache.strategy)
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = qconfig
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if quantize_config is not None:
        (folder / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

