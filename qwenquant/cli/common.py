"""Options shared by the quantize commands, and the code that runs a built Recipe."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from qwenquant.model.loader import default_output_name
from qwenquant.recipe import CalibrationConfig, EvalConfig, ExportConfig, ModelConfig
from qwenquant.recipe import MixedPrecisionStage
from qwenquant.recipe import CompensateStage

_C, _E = CalibrationConfig(), EvalConfig()

Model = Annotated[str, typer.Option("--model", "-m", help="Local folder, hub id, or shorthand like Qwen3-4B (= Qwen/Qwen3-4B).")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder [default: ./<model>-<SCHEME>].")]
Revision = Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")]
Calib = Annotated[str, typer.Option("--calib", help="builtin | builtin:en | builtin:zh | FILE.txt | FILE.jsonl | hub dataset id[:config][@split].")]
NumSamples = Annotated[int, typer.Option(help="Calibration samples.")]
SeqLen = Annotated[int, typer.Option(help="Tokens per calibration sample.")]
Seed = Annotated[int, typer.Option(help="Seed for calibration sampling.")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N: where each layer is processed.")]
EvalText = Annotated[str, typer.Option(help="wikitext2 (WikiText-2 test) or a text file for perplexity.")]
EvalWindows = Annotated[Optional[int], typer.Option(help="Evaluate only the first N windows (quick runs).")]
Window = Annotated[int, typer.Option("--eval-window", help="Tokens per perplexity window (capped at the model's max positions).")]
NoPpl = Annotated[bool, typer.Option("--no-ppl", help="Skip perplexity (KL and verification still run).")]
NoVerify = Annotated[bool, typer.Option("--no-verify", help="Do not reload and compare the written checkpoint.")]
VerifyMaxKL = Annotated[float, typer.Option(help="Fail if the reloaded checkpoint's mean next-token KL vs the source exceeds this (nats).")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output folder.")]
OffloadDir = Annotated[Optional[Path], typer.Option("--offload-dir", metavar="DIR", help="Keep decoder layers not in use on disk under DIR (created if missing; the run's files are removed at the end), so models larger than host RAM can be quantized. Evaluation and verification then run one layer at a time; not with --tasks or --keep-sensitive.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of the same command from its last finished decoder layer (kept in the hidden .OUT.partial folder).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Load nothing, write nothing: estimate peak host/device memory, output size and time per stage from config.json, the safetensors headers and a few-second speed probe, and check them against the free memory and disk (exit 5 when they do not fit).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]
MaxPplIncrease = Annotated[Optional[float], typer.Option("--max-ppl-increase", help="Quality gate: exit 3 (after writing the report) if perplexity rises more than this many percent.")]
Tasks = Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated zero-shot tasks to measure on source and result (hellaswag,piqa,arc_easy,winogrande,ceval).")]
TaskLimit = Annotated[Optional[int], typer.Option("--task-limit", help="Documents per task (quick runs).")]
MinTaskRecovery = Annotated[Optional[float], typer.Option("--min-task-recovery", help="Quality gate: exit 3 if any task keeps less than this % of the source accuracy.")]
PrintRecipe = Annotated[bool, typer.Option("--print-recipe", help="Print the resolved recipe as YAML and exit.")]
KeepSensitive = Annotated[Optional[str], typer.Option("--keep-sensitive", metavar="N|auto", help="Keep the N most sensitive fused groups (q/k/v, o, gate/up, down of a layer) in bf16; auto: the fewest meeting --max-ppl-increase.")]
MaxKeep = Annotated[int, typer.Option("--max-keep", help="With --keep-sensitive auto: keep at most this many groups.")]
DEFAULT_MAX_KEEP = MixedPrecisionStage.__dataclass_fields__["max_keep"].default


def mixed_precision_stages(keep_sensitive: str | None, max_keep: int) -> list:
    """[] or [MixedPrecisionStage] from --keep-sensitive N|auto (a bad value is a one-line exit 2)."""
    from qwenquant.errors import BadInputError

    if keep_sensitive is None:
        return []
    value = keep_sensitive.strip().lower()
    if value != "auto":
        if not value.isdigit():
            raise BadInputError(f"--keep-sensitive {keep_sensitive!r}: use a number of groups (0, 1, 2, ...) or auto")
        value = int(value)
    return [MixedPrecisionStage(keep_sensitive=value, max_keep=max_keep)]


_CP = CompensateStage()
Compensate = Annotated[bool, typer.Option("--compensate/--no-compensate", help="After quantizing each layer, tune its scales, INT rounding and norm weights so its output matches the unquantized layer (error-compensation fine-tuning).")]
CompensateSteps = Annotated[int, typer.Option(help="Signed-gradient steps per layer for --compensate.")]
CompensateLr = Annotated[float, typer.Option(help="Step size for --compensate (rounding offsets, in grid steps; scales and norms take relative steps of a fixed fraction of it).")]


CompensateTarget = Annotated[str, typer.Option("--compensate-target", metavar="float|layer", help="What --compensate fits each quantized layer to: float = the unquantized model's own layer output (also absorbs error from earlier layers); layer = the unquantized layer on the quantized model's inputs.")]


def compensate_stages(compensate: bool, steps: int, lr: float, target: str = _CP.target) -> list:
    """[] or [CompensateStage] from --compensate/--compensate-steps/--compensate-lr/--compensate-target (placed
    after the quantizer); a bad target is a one-line exit 2."""
    from qwenquant.errors import BadInputError

    try:
        return [CompensateStage(steps=steps, lr=lr, target=target)] if compensate else []
    except ValueError as err:
        raise BadInputError(f"--compensate-target {target!r}: use float or layer") from err


def base_configs(model: str, revision, calib, num_samples, seq_len, seed, eval_text, eval_windows, eval_window,
                 no_ppl, no_verify, verify_max_kl, max_ppl_increase=None, tasks=None, task_limit=None,
                 min_task_recovery=None) -> dict:
    """Recipe sections shared by every quantize command, built from their flags."""
    return {
        "model": ModelConfig(id=model, revision=revision),
        "calibration": CalibrationConfig(dataset=calib, num_samples=num_samples, seq_len=seq_len, seed=seed),
        "eval": EvalConfig(perplexity=not no_ppl, eval_text=eval_text, window=eval_window, max_windows=eval_windows,
                           verify=not no_verify, verify_max_kl=verify_max_kl, max_ppl_increase_pct=max_ppl_increase,
                           tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else [],
                           task_limit=task_limit, min_task_recovery_pct=min_task_recovery),
    }


def silence_libraries() -> None:
    """Turn off the progress bars and warnings transformers, hub and compressed-tensors print on their own."""
    import os

    os.environ["TQDM_DISABLE"] = "1"
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    disable_progress_bars()


def execute(ctx: typer.Context, recipe, out: Path | None, suffix: str, overwrite: bool, quiet: bool, json_out: bool,
            print_recipe: bool, resume: bool = False, dry_run: bool = False, offload_dir: Path | None = None) -> None:
    """Run a recipe and print the result (or just the recipe, or with `dry_run` its resource estimate)."""
    from qwenquant.progress import Reporter
    from qwenquant.report import summary
    from qwenquant.run import run_recipe

    if print_recipe:
        sys.stdout.write(recipe.to_yaml())
        return
    out = out or Path(default_output_name(recipe.model.id, suffix))
    if dry_run:
        if offload_dir is not None:
            from qwenquant.errors import BadInputError

            raise BadInputError("--dry-run does not model --offload-dir yet; run --dry-run without it (its host "
                                "memory estimate is then the in-memory upper bound)")
        return estimate_only(recipe, out, overwrite, json_out)
    reporter = Reporter(quiet=quiet or json_out)
    silence_libraries()  # our own progress display replaces theirs
    argv = (ctx.obj or {}).get("argv", sys.argv[1:])
    command = "qwenquant " + " ".join(shlex.quote(a) for a in argv)
    report = run_recipe(recipe, out, overwrite=overwrite, reporter=reporter, command=command, resume=resume,
                        offload_dir=offload_dir)
    if json_out:
        print(json.dumps(summary(report) | {"out": str(out)}))
    elif not quiet:
        s = summary(report)
        ppl = (f"perplexity {s['source_ppl']:.3f} -> {s['quantized_ppl']:.3f} ({s['delta_ppl_pct']:+.2f}%), "
               if s["source_ppl"] else "")
        reporter.console.print(f"[green]wrote {out}[/green]: {ppl}mean KL {s['mean_kl']:.5f} nats; see {out}/REPORT.md")


def estimate_only(recipe, out: Path, overwrite: bool, json_out: bool) -> None:
    """--dry-run: print the resource estimate (rich tables, or one JSON document with --json) and raise a
    ResourceError (exit 5, one line) when the run would not fit; the estimate rides along in the --json error."""
    from qwenquant.estimate import estimate_run, fits_or_raise, print_estimate

    silence_libraries()
    est = estimate_run(recipe, out, overwrite)
    if json_out:
        if est.ok:
            print(json.dumps(est.to_dict()))
    else:
        print_estimate(est)
    fits_or_raise(est)
