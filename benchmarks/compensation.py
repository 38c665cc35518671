#!/usr/bin/env python
"""Error compensation (`--compensate`) and scale search (`--scale-search`) side by side with their baselines on one
bf16 source, in one process (benchmarks/harness.py measures every row the same way).

    python benchmarks/compensation.py --quick        # smoke run: compensation_quick.{json,md}
    python benchmarks/compensation.py --plan         # list the rows and exit
    nohup python benchmarks/compensation.py > /tmp/compensation.log 2>&1 &   # full run -> compensation.{json,md}

Rows (pairs: baseline, then the same with the feature):
  FP8 channel/dynamic | + scale search (channel/block per fused group, clip per Linear) | + compensation
  FP8 tensor/static + smoothing (alpha 0.5) | + scale search (clip per Linear, alpha per layer)
  INT4 g128 RTN | + compensation to the layer target | + compensation to the float target | + scale search (clip)
  INT4 g128 GPTQ | the same three          INT3 g128 GPTQ | + compensation (layer target, float target)
Every row whose result depends on the calibration samples runs once per seed in --seeds (noise estimate); FP8 dynamic
and RTN without search or compensation are functions of the weights and run once. Mean next-token KL vs the source is
the sensitive metric; perplexity is on the full WikiText-2 test (first seed; the other seeds report perplexity on the
KL tokens) unless --ppl-windows/--quick say otherwise.
Per-layer output errors before/after compensation and the searched values come from each row's layer reports.
`--resume` continues an interrupted run from benchmarks/results/<name>.partial.json.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import (  # noqa: E402
    _log,
    add_harness_args,
    aggregate_seeds,
    harness_from_args,
    load_partial,
    save_partial,
    write_results,
)
from qwenquant.stages.compensate import CompensateStage  # noqa: E402
from qwenquant.stages.fp8 import FP8Stage  # noqa: E402
from qwenquant.stages.gptq import GPTQStage  # noqa: E402
from qwenquant.stages.rtn import RTNStage  # noqa: E402
from qwenquant.stages.smooth import SmoothStage  # noqa: E402

# The harness evaluates a deep copy and drops the pipeline state; keep each row's state to read its layer reports.
_last_state: dict = {}
_run_sequential = harness.run_sequential


def _keeping_state(model, adapter, ids, stages, device, state, **kw):
    out = _run_sequential(model, adapter, ids, stages, device, state, **kw)
    _last_state["state"] = state
    return out


harness.run_sequential = _keeping_state


def variants(steps: int, lr: float) -> list[dict]:
    """name, stages, whether the result depends on calibration, the baseline it is compared with."""
    comp = CompensateStage(steps=steps, lr=lr, target="layer")
    comp_f = CompensateStage(steps=steps, lr=lr, target="float")
    fp8 = dict(weights="channel", activations="dynamic")
    static = dict(weights="tensor", activations="static")
    out = [
        ("fp8 ch/dyn", [FP8Stage(**fp8)], False, None),
        ("fp8 ch/dyn + scale search", [FP8Stage(**fp8, clip_search=True, granularity_search=True)], True, "fp8 ch/dyn"),
        ("fp8 ch/dyn + compensate", [FP8Stage(**fp8), comp], True, "fp8 ch/dyn"),
        ("fp8 t/static smooth", [SmoothStage(0.5), FP8Stage(**static)], True, None),
        ("fp8 t/static smooth + scale search", [SmoothStage(0.5, alpha_search=True), FP8Stage(**static, clip_search=True)],
         True, "fp8 t/static smooth"),
        ("int4 g128 rtn", [RTNStage(4, 128)], False, None),
        ("int4 g128 rtn + compensate", [RTNStage(4, 128), comp], True, "int4 g128 rtn"),
        ("int4 g128 gptq", [GPTQStage(4, 128)], True, None),
        ("int4 g128 gptq + compensate", [GPTQStage(4, 128), comp], True, "int4 g128 gptq"),
        ("int3 g128 gptq", [GPTQStage(3, 128)], True, None),
        ("int3 g128 gptq + compensate", [GPTQStage(3, 128), comp], True, "int3 g128 gptq"),
        # target "float": fit to the unquantized model's own layer outputs (absorbs error from earlier layers)
        ("int4 g128 rtn + compensate (float target)", [RTNStage(4, 128), comp_f], True, "int4 g128 rtn"),
        ("int4 g128 gptq + compensate (float target)", [GPTQStage(4, 128), comp_f], True, "int4 g128 gptq"),
        ("int3 g128 gptq + compensate (float target)", [GPTQStage(3, 128), comp_f], True, "int3 g128 gptq"),
        ("int4 g128 rtn + scale search", [RTNStage(4, 128, clip_search=True)], True, "int4 g128 rtn"),
        ("int4 g128 gptq + scale search", [GPTQStage(4, 128, clip_search=True)], True, "int4 g128 gptq"),
    ]
    return [{"name": n, "stages": s, "calib": c, "baseline": b} for n, s, c, b in out]


def plan(args) -> list[dict]:
    """Every variant with the first seed (full-test perplexity), then the other seeds (KL tokens only, unless
    --full-ppl-all-seeds): an interrupted run has one complete row per variant first."""
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for i, seed in enumerate(seeds):
        for v in variants(args.steps, args.lr):
            if (args.only and not re.search(args.only, v["name"])) or (i and not v["calib"]):
                continue
            rows.append(v | {"seed": seed, "full_ppl": i == 0 or args.full_ppl_all_seeds})
    return rows


def layer_summary(state) -> dict:
    """Per-layer output errors before/after compensation, and the scale search's choices."""
    comp, alphas, clips = [], {}, {}
    for rep in state.layer_reports:
        c = rep.get("compensate")
        if c:
            comp.append({"layer": rep["layer"], "before": c["output_error_before"], "after": c["output_error_after"],
                         "codes_changed": c.get("codes_changed_frac"), "seconds": c["seconds"], "status": c["status"]})
        a = rep.get("smooth", {}).get("alpha_search")
        if a:
            alphas[rep["layer"]] = {"alpha": a["alpha"], "error_at_default": a["error_at_default"], "error": a["error"]}
        for n, v in {**(rep.get("fp8") or {}), **(rep.get("rtn") or {}), **(rep.get("gptq") or {})}.items():
            if isinstance(v, dict) and "clip_search" in v:
                clips[f"{rep['layer']}.{n}"] = v["clip_search"]
    return {"compensate": comp, "alpha": alphas, "clip": clips}


def stage_seconds(row: dict) -> float:
    """Seconds spent in the recipe's stages (not in capture and propagation, which every row does alike)."""
    return sum(v for k, v in row.get("stage_s", {}).items() if k not in ("capture", "propagate"))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(rows: list[dict], meta: dict) -> str:
    """Findings: each feature vs its baseline with the seed noise, wall time added, per-layer errors that moved."""
    agg = {g["variant"]: g for g in aggregate_seeds(rows)}
    verdicts = []
    by = lambda name: [r for r in rows if r["variant"] == name]  # noqa: E731
    out = ["## Findings (computed from the rows below)", "",
           "Noise = the larger seed spread |KL(seed a) - KL(seed b)| of the two rows (calibration-independent rows "
           "have none); a change smaller than the noise is reported as within noise.", "",
           "Added time = the compensate stage's seconds, or for the search the extra seconds of the fp8/smooth stages, "
           "mean over seeds; whole-pipeline "
           "wall times (`quant s` below) include propagation and swing with the load of the shared machine.", "",
           "| feature | baseline KL | with feature KL | ΔKL | noise | Δppl pts (full test, first seed) | added s | verdict |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for v in variants(meta["steps"], meta["lr"]):
        base = v["baseline"]
        if base is None or v["name"] not in agg or base not in agg:
            continue
        a, b = agg[base], agg[v["name"]]
        d = b["mean_kl"] - a["mean_kl"]
        noise = max(x for x in (a.get("mean_kl_spread"), b.get("mean_kl_spread"), 0.0) if x is not None)
        dppl = (b["delta_ppl_pct"] - a["delta_ppl_pct"]) if a.get("delta_ppl_pct") is not None and b.get("delta_ppl_pct") is not None else None
        verdict = ("within noise" if abs(d) <= noise else ("better" if d < 0 else "worse"))
        verdicts.append((v["name"], verdict, 100 * d / a["mean_kl"], noise / a["mean_kl"]))
        added = _mean([r["stage_s"].get("compensate") for r in by(v["name"])])  # the compensate stage itself, or
        if added is None:  # the search's share of the fp8/smooth stages
            added = _mean([stage_seconds(r) for r in by(v["name"])]) - _mean([stage_seconds(r) for r in by(base)])
        out.append(f"| {v['name']} | {a['mean_kl']:.3e} | {b['mean_kl']:.3e} | {100 * d / a['mean_kl']:+.1f}% | "
                   f"{noise:.1e} | {'-' if dppl is None else f'{dppl:+.3f}'} | {added:+.0f} | {verdict} |")
    fp8 = [f for f in verdicts if f[0].startswith("fp8 ch/dyn +")]
    if fp8 and all(f[1] == "within noise" for f in fp8):
        comp = [r for r in by("fp8 ch/dyn + compensate") if r["seed"] == 0 and r.get("layers", {}).get("compensate")]
        moved = (_mean([1 - c["after"] / c["before"] for c in comp[0]["layers"]["compensate"]]) if comp else None)
        out += ["", "FP8 channel weights + dynamic activations are at the noise floor on this model: "
                + "; ".join(f"`{n}` changes mean KL by {d:+.1f}% against a seed noise of {100 * z:.1f}%" for n, _, d, z in fp8)
                + (f". The layer outputs compensation acts on did move (by {100 * moved:.1f}% on average, below), "
                   "but that does not reach the model's next-token distribution beyond the noise." if moved else ".")]
    out += ["", "### Per-layer output error before -> after compensation (seed 0; relative squared error of the "
                "layer's residual branches vs the unquantized layer, on the samples it was tuned on)", ""]
    for v in variants(meta["steps"], meta["lr"]):
        rs = [r for r in by(v["name"]) if r["seed"] == 0 and r.get("layers", {}).get("compensate")]
        if not rs:
            continue
        cells = [f"L{c['layer']} {c['before']:.2e}->{c['after']:.2e} ({100 * (c['after'] / c['before'] - 1):+.0f}%)"
                 for c in rs[0]["layers"]["compensate"]]
        secs = sum(c["seconds"] for c in rs[0]["layers"]["compensate"])
        kept = sum(1 for c in rs[0]["layers"]["compensate"] if c["status"] != "compensated")
        out.append(f"- {v['name']} ({secs:.0f}s, {kept} layer(s) kept the quantizer's result): " + "; ".join(cells))
    out += ["", "### Scale search choices (seed 0)", ""]
    for v in variants(meta["steps"], meta["lr"]):
        rs = [r for r in by(v["name"]) if r["seed"] == 0 and (r.get("layers", {}).get("clip") or r.get("layers", {}).get("alpha"))]
        if not rs:
            continue
        lay = rs[0]["layers"]
        clipped = {k: c for k, c in lay["clip"].items() if c["clip"] < 1.0}
        gain = _mean([1 - c["error"] / c["error_at_1"] for c in lay["clip"].values() if c["error_at_1"]])
        names = ", ".join(f"{k} {c['clip']:g}" for k, c in clipped.items()) or "none"
        line = (f"- {v['name']}: clip < 1 on {len(clipped)} of {len(lay['clip'])} Linears ({names}); mean reduction "
                f"of the Linears' output error vs clip 1.0: {100 * (gain or 0):.2f}%")
        if lay["alpha"]:
            line += "; alpha per layer: " + ", ".join(
                f"L{k} {a['alpha']:g} ({100 * (a['error'] / a['error_at_default'] - 1):+.1f}%)" for k, a in lay["alpha"].items())
        out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_harness_args(p)
    p.add_argument("--name", default=None, help="results name (default compensation, or compensation_quick)")
    p.add_argument("--seeds", default="0,1", help="calibration seeds for calibration-dependent rows")
    p.add_argument("--steps", type=int, default=CompensateStage().steps, help="compensation steps per layer")
    p.add_argument("--lr", type=float, default=CompensateStage().lr, help="compensation step size")
    p.add_argument("--only", default=None, help="regex: run only variants whose name matches")
    p.add_argument("--full-ppl-all-seeds", action="store_true",
                   help="full-test perplexity for every seed (default: the first seed; the others get KL, which is "
                        "the sensitive metric, and perplexity on the KL tokens)")
    p.add_argument("--plan", action="store_true", help="print the rows that would run, and exit")
    p.add_argument("--resume", action="store_true", help="skip rows already in <name>.partial.json")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render the tables and findings of a finished results JSON (no model is loaded)")
    args = p.parse_args(argv)
    name = args.name or ("compensation_quick" if args.quick else "compensation")
    todo = plan(args)
    if args.plan:
        for r in todo:
            print(f"{r['name']:40s} seed={r['seed']}  ({'full-test ppl' if r['full_ppl'] else 'KL tokens only'})")
        print(f"{len(todo)} quantized rows + the source")
        return 0

    if args.from_json:
        import json

        data = json.loads(args.from_json.read_text())
        rows = [r for r in data["rows"] if r.get("seed") is not None]
        summary = summarize(rows, data["meta"])
        print(summary)
        write_results(args.from_json.stem, data["rows"], data["meta"], args.from_json.parent, summary_md=summary)
        return 0

    t0 = time.perf_counter()
    h = harness_from_args(args)
    src = h.source_row()
    partial = args.out_dir / f"{name}.partial.json"
    rows = load_partial(partial) if args.resume else []
    done = {(r["variant"], r["seed"]) for r in rows}
    for i, item in enumerate(todo, 1):
        if (item["name"], item["seed"]) in done:
            continue
        _log(f"[{i}/{len(todo)}] {item['name']} seed={item['seed']}")
        row = h.evaluate_variant(item["name"], item["stages"], item["seed"], tags={"baseline": item["baseline"]},
                                 full_ppl=item["full_ppl"])
        row["calib_dependent"] = item["calib"]  # the harness' rule does not know the search and compensation
        row["layers"] = layer_summary(_last_state.pop("state"))
        rows.append(row)
        save_partial(partial, rows)
    meta = h.meta() | {"seeds": args.seeds, "steps": args.steps, "lr": args.lr,
                       "total_wall_s": time.perf_counter() - t0}
    summary = summarize(rows, meta)
    print(summary)
    write_results(name, [src, *rows], meta, args.out_dir, summary_md=summary)
    if partial.exists() and len(rows) == len(todo):
        partial.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
