"""`qwenquant run RECIPE`: run a recipe file (the quantize commands are sugar for building one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from qwenquant.cli import app
from qwenquant.cli import common as c
from qwenquant.errors import BadInputError
from qwenquant.recipe import load_recipe


@app.command("run")
def run_command(
    ctx: typer.Context,
    recipe_file: Annotated[Path, typer.Argument(metavar="RECIPE", help="A recipe YAML (see recipes/).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Overrides the recipe's model.id.")] = None,
    out: c.Out = None,
    device: Annotated[Optional[str], typer.Option(help="Overrides the recipe's device.")] = None,
    overwrite: c.Overwrite = False,
    resume: c.Resume = False,
    offload_dir: c.OffloadDir = None,
    dry_run: c.DryRun = False,
    quiet: c.Quiet = False,
    json_out: c.Json = False,
    print_recipe: c.PrintRecipe = False,
) -> None:
    """Run the stages of a recipe file and write the checkpoint and report."""
    overrides = {}
    if model:
        overrides["model.id"] = model
    recipe = load_recipe(recipe_file, overrides)
    if device:
        recipe.device = device
    if not recipe.model.id:
        raise BadInputError(f"recipe {recipe_file}: no model; pass --model or set model.id in the recipe")
    c.execute(ctx, recipe, out, recipe_file.stem.upper(), overwrite, quiet, json_out, print_recipe, resume, dry_run, offload_dir)
