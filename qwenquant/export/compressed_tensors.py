"""compressed-tensors FP8 (`float-quantized`) layout, built with the compressed-tensors library itself.

INT weight-only records go through `ct_packed` (pack-quantized), INT8 W8A8 records through `ct_int8`
(int-quantized). All produce per-Linear tensors with local names (`weight`, `weight_scale`, `input_scale`, ...)
and the config.json `quantization_config`.
"""

from __future__ import annotations

import json
import math
import re

import torch

from qwenquant.export import ct_int8, ct_nvfp4, ct_packed
from qwenquant.export.format_spec import ExportFormat, int_actorder
from qwenquant.quant.records import QuantizedWeight


def fp8_scheme(cfg, targets: list[str] | None = None, weights: str | None = None):
    """`cfg`: an fp8 stage config. The compressed-tensors scheme for an FP8 stage (weights and activations); `weights` overrides the stage's
    granularity (a Linear with its own, see FP8Stage.granularity)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # imports transformers: lazy

    strategy = weights or cfg.weights
    weight_kw: dict = {"strategy": strategy}
    if strategy == "block":
        weight_kw["block_structure"] = [cfg.block_size, cfg.block_size]
    weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False, **weight_kw)
    acts = None
    if cfg.activations == "dynamic" and strategy == "block":
        acts = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=True, strategy="group", group_size=cfg.block_size)
    elif cfg.activations == "dynamic":
        acts = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=True, strategy="token")
    elif cfg.activations == "static":
        acts = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False, strategy="tensor")
    return QuantizationScheme(targets=targets or ["Linear"], weights=weights, input_activations=acts)


def fp8_linear_tensors(qw: QuantizedWeight, input_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One FP8 Linear in compressed-tensors' `float-quantized` layout: `weight_scale` (the record's scale, in its
    dtype and shape), `weight` (the E4M3 codes)[, `input_scale` [1]]. These are, bit for bit and in this order, what
    the library's compressor returns when given the dequantized weight and the scale (tests/export/
    test_compressed_tensors_fp8.py checks every granularity against it); the compressor itself is not called because it
    re-quantizes from a float32 copy of the weight (about 2 s for one 50M-weight Linear on 2 cores)."""
    out = {"weight_scale": qw.scale, "weight": qw.q}
    if input_scale is not None:
        out["input_scale"] = input_scale.reshape(1).to(qw.scale.dtype)
    return out


def compressor_linear_tensors(qw: QuantizedWeight, scheme, input_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """What compressed-tensors' own `float-quantized` compressor writes for the record (the reference
    `fp8_linear_tensors` is tested against)."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.load_from_registry("float-quantized")
    state = {"weight": qw.dequantize(torch.float32), "weight_scale": qw.scale}
    out = dict(compressor.compress(state, scheme))
    if input_scale is not None:
        out["input_scale"] = input_scale.reshape(1).to(qw.scale.dtype)
    return out


def fp8_quantization_config(cfg, ignore: list[str], linears: list[str] | None = None) -> dict:
    """One config group targeting every Linear, or, when Linears have their own granularity, one group per
    granularity listing its Linears by name (`linears`: every quantized Linear), so no module matches two groups."""
    from compressed_tensors.quantization import QuantizationConfig

    groups = {"group_0": fp8_scheme(cfg)}
    if cfg.granularity:
        by_kind: dict[str, list[str]] = {}
        for name in linears or list(cfg.granularity):
            by_kind.setdefault(cfg.weights_for(name), []).append(name)
        groups = {f"group_{i}": fp8_scheme(cfg, sorted(names), kind) for i, (kind, names) in enumerate(sorted(by_kind.items()))}
    config = QuantizationConfig(
        config_groups=groups,
        format="float-quantized",
        quantization_status="compressed",
        ignore=ignore,
    )
    return _clean(config.model_dump())


def kv_cache_scheme(strategy: str) -> dict:
    """config.json's `quantization_config.kv_cache_scheme` for static FP8 (E4M3) K/V scales: strategy `tensor`
    (k_scale / v_scale [1] per attention module) or `head` (compressed-tensors' `attn_head`: [kv_heads, 1, 1]), the
    two vLLM's compressed-tensors loader accepts."""
    from compressed_tensors.quantization import QuantizationArgs

    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False,
                            strategy={"tensor": "tensor", "head": "attn_head"}[strategy])
    return _clean({"config_groups": {"kv": {"input_activations": args.model_dump()}}})["config_groups"]["kv"][
        "input_activations"]


def _clean(d: dict) -> dict:
    """JSON-ready dict: enums to values; drop keys older loaders reject (scale_dtype/zp_dtype, see formats.md)."""
    data = json.loads(json.dumps(d, default=lambda o: getattr(o, "value", str(o))))
    for group in data.get("config_groups", {}).values():
        for key in ("weights", "input_activations", "output_activations"):
            args = group.get(key) if isinstance(group, dict) else None
            if isinstance(args, dict):
                for legacy in ("scale_dtype", "zp_dtype"):
                    args.pop(legacy, None)
    return data


def read_linear(tensors: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """Dequantized float32 [N, K] from one Linear's `float-quantized` tensors, written from the format description
    (independent of the library): w = weight (F8_E4M3) * weight_scale, the scale being per tensor [1], per channel
    [N, 1] or per block [ceil(N/Bn), ceil(K/Bk)] with [Bn, Bk] the config's `block_structure`."""
    w = tensors["weight"].float()
    scale = tensors["weight_scale"].float()
    n, k = w.shape
    weights = [g["weights"] for g in config.get("config_groups", {}).values() if isinstance(g, dict) and g.get("weights")]
    blocks = [w_args for w_args in weights if w_args.get("strategy") == "block"]
    # a checkpoint may hold channel and block groups (granularity search): the scale's shape tells which this is
    if blocks and scale.dim() == 2 and tuple(scale.shape) != (n, 1):
        bn, bk = blocks[0]["block_structure"]
        scale = scale.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    return w * scale


def config_for_linear(config: dict, name: str) -> dict:
    """`config` with only the config group that targets Linear `name` (by its full name, a `re:` pattern, or the
    class name `Linear`): FP8 granularity search writes channel and block groups into one checkpoint."""
    groups = {k: g for k, g in config.get("config_groups", {}).items() if isinstance(g, dict)}
    if len(groups) < 2:
        return config

    def targets(g: dict) -> bool:
        return any(t == name or (t.startswith("re:") and re.fullmatch(t[3:], name)) for t in g.get("targets", []))

    key = next((k for k, g in groups.items() if targets(g)),
               next((k for k, g in groups.items() if "Linear" in g.get("targets", [])), None))
    return config if key is None else {**config, "config_groups": {key: groups[key]}}


# -- the registry entry: FP8 as float-quantized (this module), INT as pack-quantized (ct_packed), INT8 W8A8 as
# int-quantized (ct_int8) ------------------------------------------------------------------------------------------


def _check_stage(kind: str, cfg) -> None:
    if kind == "int" and int_actorder(cfg) == "group":
        raise ValueError("export.format: compressed-tensors (>= 0.13) cannot store act-order 'group' (g_idx); "
                         "use actorder static or format gptq")


def _check_linear(kind: str, cfg, name: str, n: int, k: int) -> str | None:
    if kind == "nvfp4":
        return ct_nvfp4.check_linear(name, k)
    if kind != "int":  # fp8 and int8 (one unpacked byte per weight) store any shape
        return None
    if (k * cfg.bits) % 32:
        return (f"{name}: {k} input features x {cfg.bits} bits do not fill whole int32 words; "
                "use another --bits or --group-size")
    if not cfg.symmetric and (n * cfg.bits) % 32:
        return (f"{name}: {n} output features x {cfg.bits} bits cannot pack asymmetric zero "
                "points into int32 words; use --sym")
    return None


def _tensor_bytes(kind: str, cfg, n: int, k: int, dtype_bytes: int) -> dict[str, int]:
    if kind == "int8":
        return ct_int8.tensor_bytes(n, k, dtype_bytes)
    if kind == "nvfp4":
        return ct_nvfp4.tensor_bytes(cfg.activations == "dynamic", n, k)
    if kind == "fp8":
        blocks = math.ceil(n / cfg.block_size) * math.ceil(k / cfg.block_size)
        out = {"weight": n * k, "weight_scale": {"tensor": 1, "channel": n, "block": blocks}[cfg.weights] * dtype_bytes}
        if cfg.activations == "static":
            out["input_scale"] = dtype_bytes
        return out
    groups = k // (k if cfg.group_size == -1 else cfg.group_size)
    out = {"weight_packed": 4 * n * math.ceil(k * cfg.bits / 32), "weight_scale": dtype_bytes * n * groups,
           "weight_shape": 16}
    if not cfg.symmetric:
        out["weight_zero_point"] = 4 * math.ceil(n * cfg.bits / 32) * groups
    return out


def _linear_tensors(qw: QuantizedWeight, cfg, name: str, activation) -> dict[str, torch.Tensor]:
    if qw.kind == "int8":
        return ct_int8.linear_tensors(qw)
    if qw.kind == "nvfp4":
        return ct_nvfp4.linear_tensors(qw, activation.input_scale if activation is not None else None)
    if qw.kind != "fp8":
        return ct_packed.linear_tensors(qw)
    input_scale = activation.input_scale if activation is not None and activation.mode == "tensor" else None
    return fp8_linear_tensors(qw, input_scale)


def _quantization_config(kind: str, cfg, ignore: list[str], linears: list[str]) -> tuple[dict, None]:
    if kind == "int8":
        return ct_int8.quantization_config(ignore), None
    if kind == "nvfp4":
        return ct_nvfp4.quantization_config(cfg.activations == "dynamic", ignore), None
    if kind == "fp8":
        return fp8_quantization_config(cfg, ignore, linears), None
    return ct_packed.quantization_config(cfg.bits, cfg.group_size, cfg.symmetric, int_actorder(cfg), ignore), None


def _reload_with(kind: str, cfg, moe: bool) -> str:
    """transformers 5.x cannot load packed asymmetric zero points, nor dequantize FP8 block scales on fused MoE
    experts: those are verified with the spec readers."""
    if kind == "fp8":
        return "spec-reader" if moe and cfg.weights == "block" else "transformers"
    if kind == "int8":
        return "transformers"
    if kind == "nvfp4":  # transformers 5.25 fuses the per-expert tensors it loads but misreads NVFP4 experts
        return "spec-reader" if moe else "transformers"
    return "transformers" if cfg.symmetric else "spec-reader"


def _read_linear(tensors: dict[str, torch.Tensor], config: dict, name: str) -> torch.Tensor:
    config = config_for_linear(config, name)
    if config.get("format") == "float-quantized":
        return read_linear(tensors, config)
    if config.get("format") == ct_int8.FORMAT:
        return ct_int8.read_linear(tensors, config)
    if config.get("format") == ct_nvfp4.FORMAT:
        return ct_nvfp4.read_linear(tensors, config)
    return ct_packed.read_linear(tensors, config)


EXPORT_FORMAT = ExportFormat("compressed-tensors", ("fp8", "int", "int8", "nvfp4"), _check_stage, _tensor_bytes,
                             _linear_tensors, _quantization_config, _reload_with, _read_linear,
                             check_linear=_check_linear, kv_cache_scheme=kv_cache_scheme)
