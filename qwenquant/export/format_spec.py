"""The entry every export format puts in the export-format registry (`qwenquant/export/registry.py`).

A format is one module in `qwenquant/export/` that declares, in its `EXPORT_FORMAT`:
- `stores`: the record kinds it can hold (`fp8`, `int`; a quantizer stage declares the kind it makes), which the
  CLI offers it for;
- `check_stage(kind, cfg)`: a record kind or settings it cannot store, refused when the recipe is built
  (ValueError naming the key);
- `check_linear(kind, cfg, name, n, k)`: shapes it cannot store, refused before any work (the message, or None);
- `tensor_bytes(kind, cfg, n, k, dtype_bytes)`: bytes of each tensor one quantized Linear [N, K] gets (the estimator);
- `linear_tensors(qw, cfg, name, activation)`: the tensors of one quantized Linear, with local names;
- `quantization_config(kind, cfg, ignore, linears)`: config.json's `quantization_config`, and the content of a
  `quantize_config.json` beside it or None;
- `reload_with(kind, cfg, moe)`: who verifies a written checkpoint, `transformers` or `spec-reader`;
- `read_linear(tensors, config, name)`: the spec reader (written from the format description, not from the
  writer): one Linear's dequantized float32 weight [N, K];
- `fused_ignores`: engines match this format's skip list against fused module names (qkv_proj), so those are added.
- `kv_cache_scheme(strategy)`: config.json's `kv_cache_scheme` for calibrated FP8 K/V scales (per `tensor` or per
  `head`), whose `k_scale` / `v_scale` tensors sit on each attention module; None: the format cannot carry one and
  a recipe asking for it is refused.
- `write_folder(folder, model, tokenizer, recipe, state, items)`: for a format that is not a safetensors folder
  (GGUF: one file), writes its files instead of the shards + config.json and returns {"files", "tensor_bytes", ...};
  such a format does not stream (the streaming path cuts safetensors shards) and `reload_with` names its own check.
- `check_config(config)`: a model (config.json) the format cannot describe, refused before any work (the message,
  or None; GGUF: architectures and MoE layouts llama.cpp has no loader for).

`cfg` is the recipe's quantizer stage config, `kind` its record kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class UnstorableRecord(ValueError):
    """One Linear's quantized values fall outside what the format can represent (found while writing it, e.g. a
    GPTQ v1 zero point of 0, float16 scale overflow): a property of the data, reported as bad input."""


def int_actorder(cfg) -> str | None:
    """An INT stage config's act-order as records and the INT writers spell it: None, "static" or "group" (RTN and
    AWQ have none)."""
    actorder = getattr(cfg, "actorder", "none")
    return None if actorder == "none" else actorder


def no_linear_problem(_kind: str, _cfg, _name: str, _n: int, _k: int) -> str | None:
    return None


@dataclass(frozen=True)
class ExportFormat:
    name: str
    stores: tuple[str, ...]
    check_stage: Callable[[str, object], None]
    tensor_bytes: Callable[..., dict[str, int]]
    linear_tensors: Callable[..., dict]
    quantization_config: Callable[..., tuple[dict, dict | None]]
    reload_with: Callable[[str, object, bool], str]
    read_linear: Callable[..., object]
    check_linear: Callable[..., str | None] = no_linear_problem
    fused_ignores: bool = False
    write_folder: Callable[..., dict] | None = None
    kv_cache_scheme: Callable[[str], dict] | None = None
    check_config: Callable[[dict], str | None] | None = None
