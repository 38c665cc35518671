"""compressed-tensors FP8 (`float-quantized`) layout, built with the compressed-tensors library itself.

INT weight-only records go through `ct_packed` (pack-quantized). Both produce per-Linear tensors with local
names (`weight`, `weight_scale`, `input_scale`, ...) and the config.json `quantization_config`.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

from qwenquant.quant.records import QuantizedWeight
from qwenquant.recipe import FP8Stage


def fp8_scheme(cfg: FP8Stage, targets: list[str] | None = None, weights: str | None = None) -> QuantizationScheme:
    """The compressed-tensors scheme for an FP8 stage (weights and activations); `weights` overrides the stage's
    granularity (a Linear with its own, see FP8Stage.granularity)."""
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


def fp8_linear_tensors(qw: QuantizedWeight, scheme: QuantizationScheme, input_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Compress one FP8 Linear with compressed-tensors from our dequantized weight and scale."""
    compressor = BaseCompressor.load_from_registry("float-quantized")
    state = {"weight": qw.dequantize(torch.float32), "weight_scale": qw.scale}
    out = dict(compressor.compress(state, scheme))
    if input_scale is not None:
        out["input_scale"] = input_scale.reshape(1).to(qw.scale.dtype)
    return out


def fp8_quantization_config(cfg: FP8Stage, ignore: list[str], linears: list[str] | None = None) -> dict:
    """One config group targeting every Linear, or, when Linears have their own granularity, one group per
    granularity listing its Linears by name (`linears`: every quantized Linear), so no module matches two groups."""
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


def _clean(d: dict) -> dict:
    """JSON-ready dict: enums to values; drop keys older loaders reject (scale_dtype/zp_dtype, see formats.md)."""
    import json

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
