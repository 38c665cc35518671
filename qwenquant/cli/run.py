"""`qwenquant run RECIPE`: run a recipe file (the quantize commands are sugar for building one); `qwenquant run
--target GPU` runs that GPU's shipped recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from qwenquant.cli import app
from qwenquant.cli.common import execute
from qwenquant.cli.flags import Given, with_groups
from qwenquant.cli.options import OUTPUT, RUN, TARGET
from qwenquant.errors import BadInputError
from qwenquant.recipe import load_recipe


@app.command("run")
@with_groups(TARGET, RUN, OUTPUT)
def run_command(
    ctx: typer.Context,
    recipe_file: Annotated[Optional[Path], typer.Argument(metavar="[RECIPE]", help="A recipe YAML (see recipes/); "
                           "without it, --target picks the recipe.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Overrides the recipe's model.id.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Overrides the recipe's device.")] = None,
    *,
    given: Given,
) -> None:
    """Run the stages of a recipe file (or of --target's recipe) and write the checkpoint and report."""
    from qwenquant.targets import TARGETS, target_recipe

    target = given.settings(TARGET)
    if recipe_file is None:
        if target["name"] is None:
            raise BadInputError("run: give a recipe file (see recipes/) or --target GPU")
        recipe_file = target_recipe(target["name"])
        if not given["quiet"] and not given["json_out"]:
            chosen = TARGETS[target["name"]]
            typer.echo(f"--target {target['name']} ({chosen.gpu.name}): {chosen.recipe}, because {chosen.why}",
                       err=True)
    overrides = {"model.id": model} if model else {}
    if target["name"] is not None:
        overrides |= {"target.name": target["name"], "target.force": target["force"]}
    recipe = load_recipe(recipe_file, overrides)
    if device:
        recipe.device = device
    if not recipe.model.id:
        raise BadInputError(f"recipe {recipe_file}: no model; pass --model or set model.id in the recipe")
    execute(ctx, recipe, given, recipe_file.stem.upper())
