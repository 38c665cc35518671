"""`qwenquant fp8`: E4M3 weights with optional FP8 activations and SmoothQuant-style smoothing."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from qwenquant.cli import app
from qwenquant.cli import common as c
from qwenquant.recipe import ExportConfig, FP8Stage, Recipe, SmoothStage, validate

DEFAULT_SMOOTH_ALPHA = SmoothStage().alpha


class Weights(str, Enum):
    channel = "channel"
    tensor = "tensor"
    block = "block"


class Activations(str, Enum):
    dynamic = "dynamic"
    static = "static"
    none = "none"


class FP8Format(str, Enum):
    compressed_tensors = "compressed-tensors"
    hf_fp8 = "hf-fp8"


@app.command("fp8")
def fp8_command(
    ctx: typer.Context,
    model: c.Model,
    out: c.Out = None,
    weights: Annotated[Weights, typer.Option(help="Weight scale granularity: per output channel, per tensor, or 128x128 blocks.")] = Weights.channel,
    activations: Annotated[Activations, typer.Option(help="dynamic per-token, static per-tensor (calibrated input_scale), or none (weight-only).")] = Activations.dynamic,
    block_size: Annotated[int, typer.Option(help="Block edge for --weights block.")] = 128,
    smooth: Annotated[bool, typer.Option("--smooth/--no-smooth", help="Fold SmoothQuant-style channel scales into the preceding norms/linears.")] = False,
    smooth_alpha: Annotated[float, typer.Option(help="Smoothing strength alpha in [0, 1].")] = DEFAULT_SMOOTH_ALPHA,
    format: Annotated[FP8Format, typer.Option("--format", help="compressed-tensors (vLLM/SGLang/transformers) or hf-fp8 (Qwen's block layout).")] = FP8Format.compressed_tensors,
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
    scale_search: Annotated[bool, typer.Option("--scale-search", help="Choose each Linear's weight clipping ratio (with --smooth, each layer's alpha; with channel weights, dynamic activations and compressed-tensors, each fused group's channel or 128x128-block granularity) by its output error on calibration inputs; the choices are saved in recipe.yaml.")] = False,
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
    """Quantize to FP8 (E4M3) and write a compressed-tensors (or hf-fp8) checkpoint with a report."""

    def build() -> Recipe:
        stages = c.mixed_precision_stages(keep_sensitive, max_keep)
        stages += [SmoothStage(alpha=smooth_alpha, alpha_search=scale_search)] if smooth else []
        # the granularity is searched too where one checkpoint can hold both (channel/block, dynamic, compressed-tensors)
        granularity = (scale_search and weights.value == "channel" and activations.value == "dynamic"
                       and format.value == "compressed-tensors")
        stages.append(FP8Stage(weights=weights.value, activations=activations.value, block_size=block_size,
                               clip_search=scale_search, granularity_search=granularity))
        stages += c.compensate_stages(compensate, compensate_steps, compensate_lr, compensate_target)
        return Recipe(
            stages=stages,
            export=ExportConfig(format=format.value),
            device=device,
            **c.base_configs(model, revision, calib, num_samples, seq_len, seed, eval_text, eval_windows, eval_window,
                             no_ppl, no_verify, verify_max_kl, max_ppl_increase,
                          tasks, task_limit, min_task_recovery),
        )

    recipe = validate(build)
    c.execute(ctx, recipe, out, "FP8", overwrite, quiet, json_out, print_recipe, resume, dry_run, offload_dir)
