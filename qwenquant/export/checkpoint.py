"""Assemble an engine-loadable checkpoint folder from the quantized model: shards, config, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qwenquant.pipeline import QuantState
from qwenquant.recipe import Recipe


def ignore_list(model: nn.Module, state: QuantState, always: tuple[str, ...]) -> list[str]:
    """Linears left in the source dtype: always-ignored ones (lm_head), decoder Linears not quantized, and modules
    engines load as Linears that the architecture never quantizes (MoE routers `mlp.gate`, which vLLM builds with the
    checkpoint's quantization config: they must be listed by name)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in state.records]
    return sorted(set(names) | set(always) | set(unquantized_modules(model)))


def unquantized_modules(model: nn.Module) -> list[str]:
    """Full names of every layer's `unquantized` modules (qwenquant/model/qwen3.py)."""
    from qwenquant.model.qwen3 import adapter_for

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
    from qwenquant.model.qwen3 import adapter_for

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


def _int_format_module(fmt: str):
    if fmt == "compressed-tensors":
        from qwenquant.export import ct_packed as mod
    elif fmt == "gptq":
        from qwenquant.export import gptq_v1 as mod
    elif fmt == "awq":
        from qwenquant.export import awq_gemm as mod
    else:
        raise ValueError(f"format {fmt} cannot store INT weights")
    return mod


def linear_tensors(recipe: Recipe, name: str, state: QuantState) -> dict[str, torch.Tensor]:
    """Format-specific tensors of one quantized Linear, with local names."""
    qw = state.records[name]
    fmt = recipe.export.format
    if qw.kind == "fp8":
        if fmt == "hf-fp8":
            from qwenquant.export import hf_fp8

            return hf_fp8.linear_tensors(qw)
        from qwenquant.export.compressed_tensors import fp8_linear_tensors, fp8_scheme

        spec = state.activations.get(name)
        input_scale = spec.input_scale if spec is not None and spec.mode == "tensor" else None
        stage = recipe.stage("fp8")
        return fp8_linear_tensors(qw, fp8_scheme(stage, weights=stage.weights_for(name)), input_scale)
    return _int_format_module(fmt).linear_tensors(qw)


def quantization_config(recipe: Recipe, ignore: list[str], linears: list[str] | None = None) -> tuple[dict, dict | None]:
    """(config.json quantization_config, quantize_config.json content or None)."""
    fmt = recipe.export.format
    if recipe.quantizer == "fp8":
        fp8 = recipe.stage("fp8")
        if fmt == "hf-fp8":
            from qwenquant.export import hf_fp8

            return hf_fp8.quantization_config(fp8.block_size, ignore), None
        from qwenquant.export.compressed_tensors import fp8_quantization_config

        return fp8_quantization_config(fp8, ignore, linears), None
    stage = recipe.stage(recipe.quantizer)
    actorder = getattr(stage, "actorder", "none")
    actorder = None if actorder == "none" else actorder
    config = _int_format_module(fmt).quantization_config(stage.bits, stage.group_size, stage.symmetric, actorder, ignore)
    if fmt == "gptq" and hasattr(stage, "dampening_frac"):
        config["damp_percent"] = stage.dampening_frac  # metadata only, but it must tell the truth
    return config, (config if fmt == "gptq" else None)


def write_checkpoint(folder: Path, model: nn.Module, tokenizer, recipe: Recipe, state: QuantState, always_ignore,
                     layer_store=None) -> dict:
    """Write weights (sharded), config.json with quantization_config, generation config and tokenizer.

    With a `layer_store` (--offload-dir) the decoder layers are on disk: they are streamed, one materialized at a
    time, in `model.state_dict()` order (the same tensors and shards as without it)."""
    from qwenquant.export.writer import ShardWriter

    folder = Path(folder)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    writer = ShardWriter(folder, recipe.export.max_shard_size_mb * 1024 * 1024)
    items = model.state_dict().items() if layer_store is None else layer_store.state_dict_items()
    for key, tensor in items:
        if tied and key == "lm_head.weight":
            continue  # one shared table: engines re-tie from the config
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in state.records:
            for local, t in linear_tensors(recipe, module, state).items():
                writer.add(f"{module}.{local}", t)
        else:
            writer.add(key, tensor)
    files = writer.finish()

    ignore = ignore_list(model, state, always_ignore)
    if recipe.export.format in ("gptq", "awq"):  # engines match their skip lists against fused module names
        ignore = ignore + engine_fused_ignores(model, ignore)
    qconfig, quantize_config = quantization_config(recipe, ignore, list(state.records))
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = qconfig
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if quantize_config is not None:
        (folder / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"files": files, "tensor_bytes": writer.total_bytes}
