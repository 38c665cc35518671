"""`qwenquant gptq | awq | rtn`: INT weight-only quantization (W4A16 by default)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from qwenquant.cli import app
from qwenquant.cli import common as c
from qwenquant.recipe import AWQStage, ExportConfig, GPTQStage, Recipe, RTNStage, validate


class IntFormat(str, Enum):
    compressed_tensors = "compressed-tensors"
    gptq = "gptq"
    awq = "awq"


class ActOrder(str, Enum):
    static = "static"
    group = "group"
    none = "none"


Bits = Annotated[int, typer.Option(help="Weight bits: 4 (default), 3, 8 or 2.")]
GroupSize = Annotated[int, typer.Option(help="Input columns per scale group: 32, 64, 128, or -1 for per output channel.")]
Format = Annotated[IntFormat, typer.Option("--format", help="compressed-tensors (pack-quantized, vLLM native), gptq (v1) or awq (GEMM).")]


def _recipe(stage, format: IntFormat, device, base: dict, mixed=lambda: [], after=lambda: []) -> Recipe:
    return validate(lambda: Recipe(stages=[*mixed(), stage(), *after()], export=ExportConfig(format=format.value), device=device, **base))


@app.command("gptq")
def gptq_command(
    ctx: typer.Context,
    model: c.Model,
    out: c.Out = None,
    bits: Bits = 4,
    group_size: GroupSize = 128,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric (zero point fixed) or asymmetric grid.")] = True,
    act_order: Annotated[ActOrder, typer.Option(help="static: quantize columns by Hessian diagonal, natural groups; group: groups follow that order (needs --format gptq); none.")] = ActOrder.static,
    dampening: Annotated[float, typer.Option(help="Hessian dampening as a fraction of its mean diagonal.")] = 0.01,
    scale_search: Annotated[bool, typer.Option("--scale-search", help="Choose each Linear's weight clipping ratio by its round-to-nearest output error on calibration inputs; the choices are saved in recipe.yaml.")] = False,
    format: Format = IntFormat.compressed_tensors,
    revision: c.Revision = None,
    calib: c.Calib = c._C.dataset,
    num_samples: c.NumSamples = c._C.num_samples,
    seq_len: c.SeqLen = c._C.seq_len,
    seed: c.Seed = c._C.seed,
    device: c.Device = "auto",
    eval_text: c.EvalText = c._E.eval_text,
    eval_windows: c.EvalWindows = None,
    eval_window: c.Window = c._E.window,
    no_ppl: c.NoPpl = False,
    no_verify: c.NoVerify = False,
    verify_max_kl: c.VerifyMaxKL = c._E.verify_max_kl,
    max_ppl_increase: c.MaxPplIncrease = None,
    tasks: c.Tasks = None,
    task_limit: c.TaskLimit = None,
    min_task_recovery: c.MinTaskRecovery = None,
    keep_sensitive: c.KeepSensitive = None,
    max_keep: c.MaxKeep = c.DEFAULT_MAX_KEEP,
    compensate: c.Compensate = False,
    compensate_steps: c.CompensateSteps = c._CP.steps,
    compensate_lr: c.CompensateLr = c._CP.lr,
    compensate_target: c.CompensateTarget = c._CP.target,
    overwrite: c.Overwrite = False,
    resume: c.Resume = False,
    offload_dir: c.OffloadDir = None,
    dry_run: c.DryRun = False,
    quiet: c.Quiet = False,
    json_out: c.Json = False,
    print_recipe: c.PrintRecipe = False,
) -> None:
    """INT weight-only quantization with GPTQ (Hessian-aware error compensation)."""
    base = c.base_configs(model, revision, calib, num_samples, seq_len, seed, eval_text, eval_windows, eval_window,
                          no_ppl, no_verify, verify_max_kl, max_ppl_increase,
                          tasks, task_limit, min_task_recovery)
    stage = lambda: GPTQStage(bits=bits, group_size=group_size, symmetric=sym, actorder=act_order.value, dampening_frac=dampening,  # noqa: E731
                               clip_search=scale_search)
    mixed = lambda: c.mixed_precision_stages(keep_sensitive, max_keep)  # noqa: E731
    after = lambda: c.compensate_stages(compensate, compensate_steps, compensate_lr, compensate_target)  # noqa: E731
    c.execute(ctx, _recipe(stage, format, device, base, mixed, after), out, f"W{bits}A16-GPTQ", overwrite, quiet, json_out, print_recipe, resume, dry_run, offload_dir)


@app.command("awq")
def awq_command(
    ctx: typer.Context,
    model: c.Model,
    out: c.Out = None,
    bits: Bits = 4,
    group_size: GroupSize = 128,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric or asymmetric (AWQ's usual) grid.")] = False,
    clip: Annotated[bool, typer.Option("--clip/--no-clip", help="Search the clipping ratio of each weight group.")] = True,
    norm_mappings: Annotated[bool, typer.Option("--qkv-scaling/--no-qkv-scaling", help="Also scale input_layernorm -> q/k/v.")] = AWQStage().norm_mappings,
    format: Format = IntFormat.compressed_tensors,
    revision: c.Revision = None,
    calib: c.Calib = c._C.dataset,
    num_samples: c.NumSamples = c._C.num_samples,
    seq_len: c.SeqLen = c._C.seq_len,
    seed: c.Seed = c._C.seed,
    device: c.Device = "auto",
    eval_text: c.EvalText = c._E.eval_text,
    eval_windows: c.EvalWindows = None,
    eval_window: c.Window = c._E.window,
    no_ppl: c.NoPpl = False,
    no_verify: c.NoVerify = False,
    verify_max_kl: c.VerifyMaxKL = c._E.verify_max_kl,
    max_ppl_increase: c.MaxPplIncrease = None,
    tasks: c.Tasks = None,
    task_limit: c.TaskLimit = None,
    min_task_recovery: c.MinTaskRecovery = None,
    keep_sensitive: c.KeepSensitive = None,
    max_keep: c.MaxKeep = c.DEFAULT_MAX_KEEP,
    compensate: c.Compensate = False,
    compensate_steps: c.CompensateSteps = c._CP.steps,
    compensate_lr: c.CompensateLr = c._CP.lr,
    compensate_target: c.CompensateTarget = c._CP.target,
    overwrite: c.Overwrite = False,
    resume: c.Resume = False,
    offload_dir: c.OffloadDir = None,
    dry_run: c.DryRun = False,
    quiet: c.Quiet = False,
    json_out: c.Json = False,
    print_recipe: c.PrintRecipe = False,
) -> None:
    """INT weight-only quantization with AWQ (activation-aware scaling + clipping search)."""
    base = c.base_configs(model, revision, calib, num_samples, seq_len, seed, eval_text, eval_windows, eval_window,
                          no_ppl, no_verify, verify_max_kl, max_ppl_increase,
                          tasks, task_limit, min_task_recovery)
    stage = lambda: AWQStage(bits=bits, group_size=group_size, symmetric=sym, clip=clip, norm_mappings=norm_mappings)  # noqa: E731
    mixed = lambda: c.mixed_precision_stages(keep_sensitive, max_keep)  # noqa: E731
    after = lambda: c.compensate_stages(compensate, compensate_steps, compensate_lr, compensate_target)  # noqa: E731
    c.execute(ctx, _recipe(stage, format, device, base, mixed, after), out, f"W{bits}A16-AWQ", overwrite, quiet, json_out, print_recipe, resume, dry_run, offload_dir)


@app.command("rtn")
def rtn_command(
    ctx: typer.Context,
    model: c.Model,
    out: c.Out = None,
    bits: Bits = 4,
    group_size: GroupSize = 128,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric or asymmetric grid.")] = True,
    scale_search: Annotated[bool, typer.Option("--scale-search", help="Choose each Linear's weight clipping ratio by its output error on the default calibration set; the choices are saved in recipe.yaml.")] = False,
    format: Format = IntFormat.compressed_tensors,
    revision: c.Revision = None,
    device: c.Device = "auto",
    eval_text: c.EvalText = c._E.eval_text,
    eval_windows: c.EvalWindows = None,
    eval_window: c.Window = c._E.window,
    no_ppl: c.NoPpl = False,
    no_verify: c.NoVerify = False,
    verify_max_kl: c.VerifyMaxKL = c._E.verify_max_kl,
    max_ppl_increase: c.MaxPplIncrease = None,
    tasks: c.Tasks = None,
    task_limit: c.TaskLimit = None,
    min_task_recovery: c.MinTaskRecovery = None,
    keep_sensitive: c.KeepSensitive = None,
    max_keep: c.MaxKeep = c.DEFAULT_MAX_KEEP,
    compensate: c.Compensate = False,
    compensate_steps: c.CompensateSteps = c._CP.steps,
    compensate_lr: c.CompensateLr = c._CP.lr,
    compensate_target: c.CompensateTarget = c._CP.target,
    overwrite: c.Overwrite = False,
    resume: c.Resume = False,
    offload_dir: c.OffloadDir = None,
    dry_run: c.DryRun = False,
    quiet: c.Quiet = False,
    json_out: c.Json = False,
    print_recipe: c.PrintRecipe = False,
) -> None:
    """INT weight-only round-to-nearest: the baseline GPTQ and AWQ are measured against (with --compensate:
    SignRound-style tuning of the rounding, on the default calibration set)."""
    base = c.base_configs(model, revision, c._C.dataset, c._C.num_samples, c._C.seq_len, c._C.seed, eval_text,
                          eval_windows, eval_window, no_ppl, no_verify, verify_max_kl, max_ppl_increase,
                          tasks, task_limit, min_task_recovery)
    stage = lambda: RTNStage(bits=bits, group_size=group_size, symmetric=sym, clip_search=scale_search)  # noqa: E731
    mixed = lambda: c.mixed_precision_stages(keep_sensitive, max_keep)  # noqa: E731
    after = lambda: c.compensate_stages(compensate, compensate_steps, compensate_lr, compensate_target)  # noqa: E731
    c.execute(ctx, _recipe(stage, format, device, base, mixed, after), out, f"W{bits}A16-RTN", overwrite, quiet, json_out, print_recipe, resume, dry_run, offload_dir)
