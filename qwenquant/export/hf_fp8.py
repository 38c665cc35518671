"""Hugging Face fine-grained FP8 (`quant_method: "fp8"`), Qwen's official FP8 layout: 128x128 block weights,
`weight_scale_inv` float32 that, despite its name, multiplies (w = w_fp8 * weight_scale_inv per block)."""

from __future__ import annotations

import math

import torch

from qwenquant.export.format_spec import ExportFormat
from qwenquant.quant.records import QuantizedWeight


def linear_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    if qw.kind != "fp8" or qw.granularity != "block":
        raise ValueError("hf-fp8 stores 128x128 block FP8 weights only; use --weights block")
    return {"weight": qw.q, "weight_scale_inv": qw.scale.float()}


def quantization_config(block_size: int, ignore: list[str]) -> dict:
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [block_size, block_size],
        "modules_to_not_convert": ignore,
    }


def read_linear(tensors: dict[str, torch.Tensor], block_size: int) -> torch.Tensor:
    """Independent reader from the spec: expand each block's multiplier over its block."""
    w, s = tensors["weight"].float(), tensors["weight_scale_inv"].float()
    n, k = w.shape
    full = s.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:n, :k]
    return w * full


def _check_stage(kind: str, cfg) -> None:
    if kind != "fp8":
        raise ValueError("export.format: hf-fp8 stores FP8 weights; INT runs export to compressed-tensors, gptq or awq")
    if cfg.weights != "block" or cfg.activations != "dynamic":
        raise ValueError("export.format: hf-fp8 (Qwen's layout) needs fp8.weights: block and fp8.activations: dynamic")


def _tensor_bytes(kind: str, cfg, n: int, k: int, dtype_bytes: int) -> dict[str, int]:
    blocks = math.ceil(n / cfg.block_size) * math.ceil(k / cfg.block_size)
    return {"weight": n * k, "weight_scale_inv": 4 * blocks}


EXPORT_FORMAT = ExportFormat(
    "hf-fp8", ("fp8",), _check_stage, _tensor_bytes,
    linear_tensors=lambda qw, cfg, name, activation: linear_tensors(qw),
    quantization_config=lambda kind, cfg, ignore, linears: (quantization_config(cfg.block_size, ignore), None),
    reload_with=lambda kind, cfg, moe: "transformers",
    read_linear=lambda tensors, config, name: read_linear(tensors, int(config["weight_block_size"][0])),
)
