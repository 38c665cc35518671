"""`qwenquant nvfp4`: FP4 E2M1 weights in groups of 16 (FP8 group scales, FP32 global scale), with FP4 activations
(W4A4, Blackwell) or weight-only (NVFP4A16)."""

from __future__ import annotations

from enum import Enum

import typer

from qwenquant.cli import app
from qwenquant.cli.common import quantize, quantize_command
from qwenquant.cli.flags import Flag, Given, Group
from qwenquant.cli.options import format_group
from qwenquant.stages.nvfp4 import NVFP4Stage


class Method(str, Enum):
    rtn = "rtn"
    gptq = "gptq"


class Activations(str, Enum):
    dynamic = "dynamic"
    none = "none"


class ActOrder(str, Enum):
    static = "static"
    none = "none"


NVFP4 = Group(NVFP4Stage, (
    Flag("method", Method, "Weight rounding: round-to-nearest (no data needed weight-only) or GPTQ on the NVFP4 grid "
         "(calibrated)."),
    Flag("activations", Activations, "dynamic: FP4 activations in groups of 16 (W4A4; static global input scale "
         "calibrated here), or none (weight-only NVFP4A16, also for pre-Blackwell GPUs)."),
    Flag("group_size", int, "Weights per FP8 scale: NVFP4 defines 16 (any other value is refused)."),
    Flag("actorder", ActOrder, "GPTQ column order: static (by Hessian diagonal, natural groups) or none.",
         param="act_order"),
    Flag("dampening_frac", float, "GPTQ Hessian dampening as a fraction of its mean diagonal.", param="dampening"),
), section="nvfp4")

FORMAT = format_group("nvfp4", "compressed-tensors (nvfp4-pack-quantized: vLLM, transformers).")


@app.command("nvfp4")
@quantize_command(NVFP4, FORMAT)
def nvfp4_command(ctx: typer.Context, given: Given) -> None:
    """Quantize to NVFP4 (FP4 E2M1, groups of 16) and write a compressed-tensors checkpoint with a report."""
    acts = given["activations"]
    quantize(ctx, given, "NVFP4A16" if getattr(acts, "value", acts) == "none" else "NVFP4")
