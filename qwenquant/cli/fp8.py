"""`qwenquant fp8`: E4M3 weights with optional FP8 activations and SmoothQuant-style smoothing."""

from __future__ import annotations

from enum import Enum

import typer

from qwenquant.cli import app
from qwenquant.cli.common import quantize, quantize_command
from qwenquant.cli.flags import Flag, Given, Group
from qwenquant.cli.options import format_group
from qwenquant.stages.fp8 import FP8Stage
from qwenquant.stages.smooth import SmoothStage


class Weights(str, Enum):
    channel = "channel"
    tensor = "tensor"
    block = "block"


class Activations(str, Enum):
    dynamic = "dynamic"
    static = "static"
    none = "none"


FP8 = Group(FP8Stage, (
    Flag("weights", Weights, "Weight scale granularity: per output channel, per tensor, or 128x128 blocks."),
    Flag("activations", Activations, "dynamic per-token, static per-tensor (calibrated input_scale), or none "
         "(weight-only)."),
    Flag("block_size", int, "Block edge for --weights block."),
    Flag("clip_search", bool, "Choose each Linear's weight clipping ratio (with --smooth, each layer's alpha; with "
         "channel weights, dynamic activations and compressed-tensors, each fused group's channel or 128x128-block "
         "granularity) by its output error on calibration inputs; the choices are saved in recipe.yaml.",
         ("--scale-search",), param="scale_search"),
), section="fp8")

SMOOTH = Group(SmoothStage, (
    Flag(None, bool, "Fold SmoothQuant-style channel scales into the preceding norms/linears.",
         ("--smooth/--no-smooth",), param="smooth", default=False),
    Flag("alpha", float, "Smoothing strength alpha in [0, 1].", param="smooth_alpha"),
), section="smooth", switch="smooth")

FORMAT = format_group("fp8", "compressed-tensors (vLLM/SGLang/transformers) or hf-fp8 (Qwen's block layout).")


@app.command("fp8")
@quantize_command(FP8, SMOOTH, FORMAT)
def fp8_command(ctx: typer.Context, given: Given) -> None:
    """Quantize to FP8 (E4M3) and write a compressed-tensors (or hf-fp8) checkpoint with a report."""
    quantize(ctx, given, "FP8")
