"""`qwenquant sensitivity`: how much quantizing each Linear, fused group and decoder block ALONE hurts the model."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from qwenquant.cli import app
from qwenquant.cli.common import silence_libraries
from qwenquant.cli.flags import Given, with_groups
from qwenquant.cli.options import CALIBRATION, DEVICE, MODEL, PRINTING
from qwenquant.errors import BadInputError
from qwenquant.progress import Reporter
from qwenquant.reporting import command_line

DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN = 8, 512  # 4096 tokens: ~the KL budget of a quantize run (eval.kl_tokens)


class Scheme(str, Enum):
    fp8 = "fp8"
    w4a16 = "w4a16"
    w3a16 = "w3a16"
    w8a16 = "w8a16"


def parse_seeds(seed: int, seeds: str | None) -> list[int]:
    if seeds is None:
        return [seed]
    try:
        values = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise BadInputError(f"--seeds {seeds!r}: use comma-separated integers like 0,1") from None
    if not values or len(set(values)) != len(values):
        raise BadInputError(f"--seeds {seeds!r}: give distinct seeds like 0,1")
    return values


def parse_levels(levels: str) -> tuple[str, ...]:
    from qwenquant.sensitivity import LEVELS

    values = tuple(v.strip() for v in levels.split(",") if v.strip())
    bad = [v for v in values if v not in LEVELS]
    if bad or not values:
        raise BadInputError(f"--levels {levels!r}: use a comma-separated subset of {', '.join(LEVELS)}")
    return values


@dataclass
class Measured:
    """What a sensitivity measurement produced, for the report."""

    results: dict  # seed -> measure_sensitivity result
    hashes: dict  # str(seed) -> sha256 of the calibration token ids
    resolved: object  # the ResolvedModel
    n_layers: int


@app.command("sensitivity")
@with_groups(MODEL, CALIBRATION.with_defaults(num_samples=DEFAULT_NUM_SAMPLES, seq_len=DEFAULT_SEQ_LEN), DEVICE,
             PRINTING)
def sensitivity_command(
    ctx: typer.Context,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report folder (default ./<model>-sensitivity).")] = None,
    scheme: Annotated[Scheme, typer.Option(help="fp8: E4M3 channel weights + dynamic per-token activations; wNa16: INT N RTN weight-only.")] = Scheme.fp8,
    group_size: Annotated[int, typer.Option(help="INT schemes: input columns per scale group (-1: per channel).")] = 128,
    levels: Annotated[str, typer.Option(help="Units to measure: linear, group (vLLM fused groups), block.")] = "linear,group,block",
    seeds: Annotated[Optional[str], typer.Option(help="Several calibration seeds, e.g. 0,1: measures each and reports the rank correlation between them.")] = None,
    top: Annotated[Optional[int], typer.Option(help="Rows per level printed on the terminal (default 10); the files always list every unit.")] = None,
    *,
    given: Given,
) -> None:
    """Rank every Linear, fused group and decoder block by end-to-end KL when quantized alone (+ a cheap proxy)."""
    from qwenquant import __version__
    from qwenquant.model.loader import default_output_name
    from qwenquant.sensitivity import scheme_from_name
    from qwenquant.sensitivity_report import build_sensitivity_report, write_sensitivity_report

    started = time.time()
    model, calib = given.settings(MODEL), given.settings(CALIBRATION)
    seed_list = parse_seeds(calib["seed"], seeds)
    level_list = parse_levels(levels)
    if calib["num_samples"] < 1 or calib["seq_len"] < 8:
        raise BadInputError("--num-samples must be >= 1 and --seq-len >= 8")
    if top is not None and top < 1:
        raise BadInputError(f"--top must be >= 1, got {top}")
    try:
        unit_scheme = scheme_from_name(scheme.value, group_size)
    except ValueError as err:
        raise BadInputError(str(err)) from err
    out = out or Path(default_output_name(model["id"], "sensitivity"))
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out}: is a file; choose a folder path")
    quiet, json_out = given["quiet"], given["json_out"]
    measured = _measure(model, calib, seed_list, level_list, unit_scheme, group_size, given["device"],
                        Reporter(quiet=quiet or json_out))
    report = build_sensitivity_report(
        measured.results,
        model={"reference": measured.resolved.reference, "path": str(measured.resolved.path),
               "num_layers": measured.n_layers},
        calibration={"dataset": calib["dataset"], "num_samples": calib["num_samples"], "seq_len": calib["seq_len"],
                     "sha256_token_ids": measured.hashes},
        command=command_line((ctx.obj or {}).get("argv", sys.argv[1:])),
        version=__version__,
        started=started,
    )
    files = write_sensitivity_report(out, report)
    _print(report, out, files, top, quiet, json_out)


def _measure(model: dict, calib: dict, seed_list: list[int], level_list: tuple[str, ...], unit_scheme,
             group_size: int, device: str, reporter: Reporter) -> Measured:
    """Load the model and measure every unit's sensitivity once per calibration seed."""
    import torch

    from qwenquant.calibration import load_calibration, samples_hash
    from qwenquant.device import resolve_device
    from qwenquant.model.loader import load_model, resolve_model
    from qwenquant.model.qwen3 import linear_shapes
    from qwenquant.sensitivity import list_units, measure_sensitivity

    dev = resolve_device(device)
    silence_libraries()
    resolved = resolve_model(model["id"], model["revision"])
    if unit_scheme.kind == "int" and group_size != -1:
        for name, (_n, k) in linear_shapes(resolved.config).items():
            if k % group_size:
                raise BadInputError(f"{name} has {k} input features, not divisible by --group-size {group_size}")
    source, tokenizer = load_model(resolved)
    adapter = resolved.adapter
    n_layers = len(source.get_submodule(adapter.layers_path))
    n_units = len(list_units(adapter, n_layers, level_list, source.config))
    source.to(dev)
    results, hashes = {}, {}
    for s in seed_list:
        ids = load_calibration(calib["dataset"], tokenizer, calib["num_samples"], calib["seq_len"], s)
        hashes[str(s)] = samples_hash(ids)
        with reporter.step(f"sensitivity seed {s} ({n_units} units, {unit_scheme.label})", n_units) as advance:
            results[s] = measure_sensitivity(source, adapter, ids, unit_scheme, dev, level_list,
                                             on_unit=lambda i, n: advance())
    source.to("cpu")
    del source
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return Measured(results, hashes, resolved, n_layers)


def _print(report: dict, out: Path, files: list, top: int | None, quiet: bool, json_out: bool) -> None:
    from qwenquant.sensitivity_report import render_markdown

    if json_out:
        print(json.dumps({"ok": True, "out": str(out), "files": [str(f) for f in files],
                          "rank_correlation": report["rank_correlation"],
                          "most_sensitive": {lv: [u["unit"] for u in report["units"] if u["level"] == lv][:5]
                                             for lv in report["levels"]}}))
    elif not quiet:
        md = render_markdown(report, top=top or 10)
        print(md.split("\n", 2)[2].rsplit("![", 1)[0].rstrip())
        print(f"\nwrote {', '.join(str(f) for f in files)}")
