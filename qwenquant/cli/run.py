"""`qwenquant run RECIPE`: run a recipe file (the quantize commands are sugar for building one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from qwenquant.cli import app
from qwenquant.cli.common import execute
from qwenquant.cli.flags import Given, with_groups
from qwenquant.cli.options import OUTPUT, RUN
from qwenquant.errors import BadInputError
from qwenquant.recipe import load_recipe


@app.command("run")
@with_groups(RUN, OUTPUT)
def run_command(
    ctx: typer.Context,
    recipe_file: Annotated[Path, typer.Argument(metavar="RECIPE", help="A recipe YAML (see recipes/).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Overrides the recipe's model.id.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Overrides the recipe's device.")] = None,
    *,
    given: Given,
) -> None:
    """Run the stages of a recipe file and write the checkpoint and report."""
    recipe = load_recipe(recipe_file, {"model.id": model} if model else {})
    if device:
        recipe.device = device
    if not recipe.model.id:
        raise BadInputError(f"recipe {recipe_file}: no model; pass --model or set model.id in the recipe")
    execute(ctx, recipe, given, recipe_file.stem.upper())
