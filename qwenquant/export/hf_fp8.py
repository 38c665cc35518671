"""Hugging Face fine-grained FP8 (`quant_method: "fp8"`), Qwen's official FP8 layout: 128x128 block weights,
`weight_scale_inv` float32 that, despite its name, multiplies (w = w_fp8 * weight_scale_inv per block)."""

from __future__ import annotations

import torch

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
