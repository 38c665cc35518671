"""`qwenquant int8`: INT8 W8A8 (per-channel INT8 weights, dynamic per-token INT8 activations) with SmoothQuant
smoothing on by default, each layer's alpha searched by its INT8 output error."""

from __future__ import annotations

from enum import Enum

import typer

from qwenquant.cli import app
from qwenquant.cli.common import execute, quantize_command
from qwenquant.cli.flags import Flag, Given, Group
from qwenquant.cli.options import DEVICE, format_group
from qwenquant.quant.int8 import KIND
from qwenquant.recipe import Recipe
from qwenquant.recipe_builder import output_tag, quantize_recipe
from qwenquant.stages.int8 import Int8Stage
from qwenquant.stages.registry import spec_of
from qwenquant.stages.smooth import SmoothStage

SCHEME = "W8A8-INT8"


class Method(str, Enum):
    gptq = "gptq"
    rtn = "rtn"


INT8 = Group(Int8Stage, (
    Flag("method", Method, "Weight rounding: gptq (Hessian-aware, calibrated) or rtn (round-to-nearest)."),
    Flag("group_size", int, "Input columns per weight scale: only -1 (per output channel), what vLLM's INT8 W8A8 "
         "kernels read."),
), section="int8")

# `qwenquant int8` smooths by default (INT8 activations lose far more to outlier channels than FP8 ones), with each
# layer's alpha chosen by the INT8 output error: these two switch defaults are the command's, not the stage's.
SMOOTH = Group(SmoothStage, (
    Flag(None, bool, "Fold SmoothQuant-style channel scales into the preceding norms/linears (default on).",
         ("--smooth/--no-smooth",), param="smooth", default=True),
    Flag("alpha", float, "Smoothing strength alpha in [0, 1] (the search's first candidate; with --no-alpha-search "
         "every layer's).", param="smooth_alpha"),
    Flag("alpha_search", bool, "Choose each layer's alpha by its INT8-quantized (weights and activations) output "
         "error on calibration inputs; the choices are saved in recipe.yaml and the report.",
         ("--alpha-search/--no-alpha-search",), param="alpha_search", default=True),
), section="smooth", switch="smooth")

FORMAT = format_group(KIND, "compressed-tensors (int-quantized: vLLM's W8A8 INT8 path, transformers).")


@app.command("int8")
@quantize_command(INT8, SMOOTH, FORMAT)
def int8_command(ctx: typer.Context, given: Given) -> None:
    """Quantize to INT8 W8A8 (for GPUs without FP8: A100, A10, RTX 30xx, T4) and write a compressed-tensors
    checkpoint with a report."""
    recipe = quantize_recipe(given.sections(), **given.settings(DEVICE))
    execute(ctx, recipe, given, folder_suffix(recipe))


def folder_suffix(recipe: Recipe) -> str:
    """The default output folder's suffix: smoothing with searched alphas is this command's default (no tag),
    one global alpha is tagged SMOOTH (the smooth stage's tag), no smoothing NOSMOOTH."""
    tag = output_tag(recipe, SCHEME)
    smooth = recipe.stage("smooth")
    if smooth is None:
        return f"{tag}-NOSMOOTH"
    return tag.replace(f"-{spec_of(smooth).tag(smooth)}", "", 1) if smooth.alpha_search else tag
