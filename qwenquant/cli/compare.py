"""`qwenquant compare` (run recipes side by side) and `qwenquant report` (merge finished runs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from qwenquant.cli import app
from qwenquant.cli.common import silence_libraries
from qwenquant.cli.flags import Given, with_groups
from qwenquant.cli.options import DEVICE, MODEL, PERPLEXITY_TEXT, PRINTING
from qwenquant.compare import bench_columns, load_report, render_table, row_for, write_comparison
from qwenquant.device import resolve_device
from qwenquant.errors import BadInputError
from qwenquant.recipe import EvalConfig, load_recipe
from qwenquant.runner.options import RunOptions


@app.command("compare")
@with_groups(MODEL.only("model"), PERPLEXITY_TEXT, DEVICE, PRINTING)
def compare_command(
    ctx: typer.Context,
    recipes: Annotated[list[Path], typer.Option("--recipes", help="Recipe files to compare (repeat the flag or list them).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Comparison folder; each run goes to OUT/<recipe name>/.")],
    bench: Annotated[Optional[bool], typer.Option("--bench/--no-bench", help="Also run `qwenquant bench` (batch 1, short context) on the source and each run: decode/prefill tok/s and peak memory columns (default: on when CUDA is available).")] = None,
    *,
    given: Given,
) -> None:
    """Run each recipe on one model (reusing finished runs), evaluate them identically, write one table."""
    from qwenquant.progress import Reporter
    from qwenquant.runner.run import run_recipe  # heavy: only when runs start

    model, device, quiet, json_out = given["model"], given["device"], given["quiet"], given["json_out"]
    silence_libraries()
    names = [r.stem for r in recipes]
    if len(set(names)) != len(names):
        raise BadInputError("--recipes: two recipes share a file name; rename one (runs are stored by name)")
    shared_eval = EvalConfig(**given.settings(PERPLEXITY_TEXT))
    reporter = Reporter(quiet=quiet or json_out)
    resolved = [(name, load_recipe(path, {"model.id": model})) for name, path in zip(names, recipes)]
    rows = []
    for name, recipe in resolved:
        recipe.eval = dataclasses.replace(shared_eval, verify=recipe.eval.verify, verify_max_kl=recipe.eval.verify_max_kl)
        recipe.device = device
        run_dir = out / name
        previous = run_dir / "recipe.yaml"
        if previous.is_file() and (run_dir / "qwenquant_report.json").is_file() and previous.read_text() == recipe.to_yaml():
            reporter.log(f"{name}: reusing {run_dir} (same recipe, report present)")
            report = load_report(run_dir)
        else:
            reporter.log(f"{name}: running")
            options = RunOptions(run_dir, overwrite=True, command=f"qwenquant run {recipes[names.index(name)]}")
            report = run_recipe(recipe, options, reporter)
        rows.append(row_for(name, report))
    meta = {"model": model, "recipes": [str(r) for r in recipes]}
    if bench if bench is not None else _cuda_available():
        meta["source_bench"] = _bench_runs(model, rows, out, device, reporter)
    data = write_comparison(rows, out, meta)
    _print(data, out, quiet, json_out)


@app.command("report")
@with_groups(PRINTING)
def report_command(
    folders: Annotated[list[Path], typer.Argument(metavar="RUN_DIR...", help="Finished qwenquant output folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the merged comparison.")],
    *,
    given: Given,
) -> None:
    """Merge the reports of finished runs into one comparison table with plots."""
    rows = [row_for(f.name, load_report(f)) | bench_columns(f) for f in folders]
    data = write_comparison(rows, out, {"folders": [str(f) for f in folders]})
    _print(data, out, given["quiet"], given["json_out"])


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _bench_runs(model: str, rows: list[dict], out: Path, device: str, reporter) -> dict:
    """Bench each run (into OUT/bench/<name>) and the source (OUT/bench/source); returns the source's summary."""
    from qwenquant.bench.runner import quick_bench
    from qwenquant.model.loader import resolve_model

    dev = resolve_device(device)
    for row in rows:
        reporter.log(f"{row['name']}: bench")
        row["bench"] = quick_bench(out / row["name"], out / "bench" / row["name"], dev)
    reporter.log("source: bench")
    return quick_bench(resolve_model(model).path, out / "bench" / "source", dev)


def _print(data: dict, out: Path, quiet: bool, json_out: bool) -> None:
    if json_out:
        print(json.dumps({"ok": True, "out": str(out), "rows": data["rows"]}))
    elif not quiet:
        print(render_table(data["rows"]))
        print(f"wrote {out}/COMPARE.md")
