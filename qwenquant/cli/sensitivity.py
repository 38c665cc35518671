"""`qwenquant sensitivity`: how much quantizing each Linear, fused group and decoder block ALONE hurts the model."""

from __future__ import annotations

import json
import shlex
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from qwenquant.cli import app
from qwenquant.cli import common as c
from qwenquant.errors import BadInputError

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


@app.command("sensitivity")
def sensitivity_command(
    ctx: typer.Context,
    model: c.Model,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report folder (default ./<model>-sensitivity).")] = None,
    scheme: Annotated[Scheme, typer.Option(help="fp8: E4M3 channel weights + dynamic per-token activations; wNa16: INT N RTN weight-only.")] = Scheme.fp8,
    group_size: Annotated[int, typer.Option(help="INT schemes: input columns per scale group (-1: per channel).")] = 128,
    levels: Annotated[str, typer.Option(help="Units to measure: linear, group (vLLM fused groups), block.")] = "linear,group,block",
    revision: c.Revision = None,
    calib: c.Calib = c._C.dataset,
    num_samples: c.NumSamples = DEFAULT_NUM_SAMPLES,
    seq_len: c.SeqLen = DEFAULT_SEQ_LEN,
    seed: c.Seed = c._C.seed,
    seeds: Annotated[Optional[str], typer.Option(help="Several calibration seeds, e.g. 0,1: measures each and reports the rank correlation between them.")] = None,
    device: c.Device = "auto",
    top: Annotated[Optional[int], typer.Option(help="Rows per level printed on the terminal (default 10); the files always list every unit.")] = None,
    quiet: c.Quiet = False,
    json_out: c.Json = False,
) -> None:
    """Rank every Linear, fused group and decoder block by end-to-end KL when quantized alone (+ a cheap proxy)."""
    import torch

    from qwenquant import __version__
    from qwenquant.calibration import load_calibration, samples_hash
    from qwenquant.model.loader import default_output_name, load_model, resolve_model
    from qwenquant.model.qwen3 import linear_shapes
    from qwenquant.progress import Reporter
    from qwenquant.run import resolve_device
    from qwenquant.sensitivity import list_units, measure_sensitivity, scheme_from_name
    from qwenquant.sensitivity_report import build_sensitivity_report, render_markdown, write_sensitivity_report

    started = time.time()
    seed_list = parse_seeds(seed, seeds)
    level_list = parse_levels(levels)
    if num_samples < 1 or seq_len < 8:
        raise BadInputError("--num-samples must be >= 1 and --seq-len >= 8")
    if top is not None and top < 1:
        raise BadInputError(f"--top must be >= 1, got {top}")
    try:
        unit_scheme = scheme_from_name(scheme.value, group_size)
    except ValueError as err:
        raise BadInputError(str(err)) from err
    out = out or Path(default_output_name(model, "sensitivity"))
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out}: is a file; choose a folder path")
    dev = resolve_device(device)
    reporter = Reporter(quiet=quiet or json_out)
    c.silence_libraries()

    resolved = resolve_model(model, revision)
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
        ids = load_calibration(calib, tokenizer, num_samples, seq_len, s)
        hashes[str(s)] = samples_hash(ids)
        with reporter.step(f"sensitivity seed {s} ({n_units} units, {unit_scheme.label})", n_units) as advance:
            results[s] = measure_sensitivity(source, adapter, ids, unit_scheme, dev, level_list,
                                             on_unit=lambda i, n: advance())
    source.to("cpu")
    del source
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    argv = (ctx.obj or {}).get("argv", sys.argv[1:])
    report = build_sensitivity_report(
        results,
        model={"reference": resolved.reference, "path": str(resolved.path), "num_layers": n_layers},
        calibration={"dataset": calib, "num_samples": num_samples, "seq_len": seq_len, "sha256_token_ids": hashes},
        command="qwenquant " + " ".join(shlex.quote(a) for a in argv),
        version=__version__,
        started=started,
    )
    files = write_sensitivity_report(out, report)
    if json_out:
        print(json.dumps({"ok": True, "out": str(out), "files": [str(f) for f in files],
                          "rank_correlation": report["rank_correlation"],
                          "most_sensitive": {lv: [u["unit"] for u in report["units"] if u["level"] == lv][:5]
                                             for lv in report["levels"]}}))
    elif not quiet:
        md = render_markdown(report, top=top or 10)
        print(md.split("\n", 2)[2].rsplit("![", 1)[0].rstrip())
        print(f"\nwrote {', '.join(str(f) for f in files)}")
