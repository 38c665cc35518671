"""What the commands that run a recipe share: the quantize commands' decorator and body, and `execute` (print the
recipe, estimate it with --dry-run, or run it and print the summary)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from qwenquant.cli.flags import Given, Group, with_groups
from qwenquant.cli.options import DEVICE, OUTPUT, QUANTIZE_GROUPS, RUN
from qwenquant.model.loader import default_output_name
from qwenquant.recipe import Recipe
from qwenquant.recipe_builder import output_tag, quantize_recipe
from qwenquant.reporting import command_line
from qwenquant.runner.options import RunOptions

# for commands that declare plain parameters (bench)
Quiet = OUTPUT.flag("quiet").annotation()
Json = OUTPUT.flag("json_out").annotation()


def quantize_command(*scheme: Group):
    """Decorator of a quantize command: its scheme's groups (the quantizer stage's flags, --format, ...) and the
    shared QUANTIZE_GROUPS attached, in that order after --model and --out."""
    return with_groups(*scheme, *QUANTIZE_GROUPS)


def quantize(ctx: typer.Context, given: Given, suffix: str) -> None:
    """The body of a quantize command: the recipe its flags describe, executed (output folder default
    ./<model>-<suffix>-<what the flags changed>, `output_tag`)."""
    recipe = quantize_recipe(given.sections(), **given.settings(DEVICE))
    execute(ctx, recipe, given, output_tag(recipe, suffix))


def silence_libraries() -> None:
    """Turn off the progress bars and warnings transformers, hub and compressed-tensors print on their own."""
    import os

    os.environ["TQDM_DISABLE"] = "1"
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    disable_progress_bars()


def execute(ctx: typer.Context, recipe: Recipe, given: Given, suffix: str) -> None:
    """Print the recipe (--print-recipe), or its resource estimate (--dry-run), or run it and print the summary.
    `given` holds the RUN and OUTPUT groups' values; the output folder defaults to ./<model>-<suffix>."""
    from qwenquant.progress import Reporter
    from qwenquant.runner.run import run_recipe  # heavy: only when a run starts

    if given["print_recipe"]:
        sys.stdout.write(recipe.to_yaml())
        return
    run = given.settings(RUN)
    run["out"] = run["out"] or Path(default_output_name(recipe.model.id, suffix))
    argv = (ctx.obj or {}).get("argv", sys.argv[1:])
    options = RunOptions(**run, command=command_line(argv))
    if given["dry_run"]:
        return estimate_only(recipe, options, given["json_out"], given["nproc"])
    if given["nproc"] != 1:
        sys.exit(launch_ranks(given["nproc"], argv))
    from qwenquant.distributed import env_rank

    worker = env_rank() != 0  # a distributed run's other ranks print nothing but errors
    reporter = Reporter(quiet=given["quiet"] or given["json_out"] or worker)
    silence_libraries()  # our own progress display replaces theirs
    report = run_recipe(recipe, options, reporter)
    if report is not None:
        print_summary(report, options.out, reporter, given["quiet"], given["json_out"])


def launch_ranks(nproc: int, argv: list[str]) -> int:
    """--nproc N: this command without --nproc in N processes (torch.distributed.run); rank 0's exit status."""
    from qwenquant.distributed import relaunch
    from qwenquant.errors import BadInputError

    if nproc < 1:
        raise BadInputError(f"--nproc: must be at least 1, got {nproc}")
    rest, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    return relaunch(nproc, rest)


def print_summary(report: dict, out: Path, reporter, quiet: bool, json_out: bool) -> None:
    """One JSON line (--json), or one line naming the folder and its perplexity and KL (unless --quiet)."""
    from qwenquant.report import summary

    if json_out:
        print(json.dumps(summary(report) | {"out": str(out)}))
    elif not quiet:
        s = summary(report)
        ppl = (f"perplexity {s['source_ppl']:.3f} -> {s['quantized_ppl']:.3f} ({s['delta_ppl_pct']:+.2f}%), "
               if s["source_ppl"] else "")
        kl = f"mean KL {s['mean_kl']:.5f} nats" if s["mean_kl"] is not None else "KL not measured"
        reporter.console.print(f"[green]wrote {out}[/green]: {ppl}{kl}; see {out}/REPORT.md", soft_wrap=True)


def estimate_only(recipe: Recipe, options: RunOptions, json_out: bool, nproc: int = 1) -> None:
    """--dry-run: print the resource estimate of the run `options` describe (rich tables, or one JSON document with
    --json) and raise a ResourceError (exit 5, one line) when the run would not fit; the estimate rides along in the
    --json error."""
    from qwenquant.estimate import estimate_run, fits_or_raise, print_estimate

    silence_libraries()
    est = estimate_run(recipe, options.out, options.overwrite, options.offload_dir, options.stream)
    if nproc > 1:  # --nproc N: N ranks on this machine (qwenquant/estimate/ranks.py)
        from qwenquant.estimate.ranks import with_ranks

        est = with_ranks(est, nproc, nproc)
    if json_out:
        if est.ok:
            print(json.dumps(est.to_dict()))
    else:
        print_estimate(est)
    fits_or_raise(est)
