"""`qwenquant gptq | awq | rtn`: INT weight-only quantization (W4A16 by default)."""

from __future__ import annotations

from enum import Enum

import typer

from qwenquant.cli import app
from qwenquant.cli.common import quantize, quantize_command
from qwenquant.cli.flags import Flag, Given, Group
from qwenquant.cli.options import format_group
from qwenquant.stages.awq import AWQStage
from qwenquant.stages.gptq import GPTQStage
from qwenquant.stages.rtn import RTNStage


class ActOrder(str, Enum):
    static = "static"
    group = "group"
    none = "none"


BITS = Flag("bits", int, "Weight bits: 4 (default), 3, 8 or 2.")
GROUP_SIZE = Flag("group_size", int, "Input columns per scale group: 32, 64, 128, or -1 for per output channel.")


def symmetric(help: str) -> Flag:
    return Flag("symmetric", bool, help, ("--sym/--asym",), param="sym")


def scale_search(help: str) -> Flag:
    return Flag("clip_search", bool, help, ("--scale-search",), param="scale_search")


FORMAT = format_group("int", "compressed-tensors (pack-quantized, vLLM native), gptq (v1) or awq (GEMM).")

GPTQ = Group(GPTQStage, (
    BITS, GROUP_SIZE, symmetric("Symmetric (zero point fixed) or asymmetric grid."),
    Flag("actorder", ActOrder, "static: quantize columns by Hessian diagonal, natural groups; group: groups follow "
         "that order (needs --format gptq); none.", param="act_order"),
    Flag("dampening_frac", float, "Hessian dampening as a fraction of its mean diagonal.", param="dampening"),
    scale_search("Choose each Linear's weight clipping ratio by its round-to-nearest output error on calibration "
                 "inputs; the choices are saved in recipe.yaml."),
), section="gptq")

AWQ = Group(AWQStage, (
    BITS, GROUP_SIZE, symmetric("Symmetric or asymmetric (AWQ's usual) grid."),
    Flag("clip", bool, "Search the clipping ratio of each weight group.", ("--clip/--no-clip",)),
    Flag("norm_mappings", bool, "Also scale input_layernorm -> q/k/v.", ("--qkv-scaling/--no-qkv-scaling",)),
), section="awq")

RTN = Group(RTNStage, (
    BITS, GROUP_SIZE, symmetric("Symmetric or asymmetric grid."),
    scale_search("Choose each Linear's weight clipping ratio by its output error on calibration inputs; the "
                 "choices are saved in recipe.yaml."),
), section="rtn")


@app.command("gptq")
@quantize_command(GPTQ, FORMAT)
def gptq_command(ctx: typer.Context, given: Given) -> None:
    """INT weight-only quantization with GPTQ (Hessian-aware error compensation)."""
    quantize(ctx, given, f"W{given['bits']}A16-GPTQ")


@app.command("awq")
@quantize_command(AWQ, FORMAT)
def awq_command(ctx: typer.Context, given: Given) -> None:
    """INT weight-only quantization with AWQ (activation-aware scaling + clipping search)."""
    quantize(ctx, given, f"W{given['bits']}A16-AWQ")


@app.command("rtn")
@quantize_command(RTN, FORMAT)
def rtn_command(ctx: typer.Context, given: Given) -> None:
    """INT weight-only round-to-nearest: the baseline GPTQ and AWQ are measured against (with --compensate:
    SignRound-style tuning of the rounding, on the calibration set)."""
    quantize(ctx, given, f"W{given['bits']}A16-RTN")
