#!/usr/bin/env python
"""Every FP8 variant of qwenquant side by side with the bf16 source, in one process (see benchmarks/README.md).

    python benchmarks/fp8_variants.py --quick          # smoke run, ~2 min: fp8_variants_quick.{json,md}
    python benchmarks/fp8_variants.py --plan           # list the rows that would run and exit
    nohup python benchmarks/fp8_variants.py > /tmp/fp8_variants.log 2>&1 &   # full run -> fp8_variants.{json,md}

Rows: weights {channel, tensor, block} x activations {dynamic, static, none} (block pairs only with dynamic
group activations), each without smoothing and with SmoothQuant-style smoothing (alpha = --default-alpha), plus an
alpha sweep (--alphas) for the combinations in --sweep. Variants whose result depends on calibration (static
activation scales, any smoothing) run once per seed in --seeds; the others (dynamic / none without smoothing) are
functions of the weights alone and run once (seed 0: their calibration pass only propagates activations).
`--resume` continues an interrupted run from benchmarks/results/<name>.partial.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    _log,
    add_harness_args,
    aggregate_seeds,
    calibration_dependent,
    harness_from_args,
    load_partial,
    save_partial,
    write_results,
)
from qwenquant.stages.fp8 import FP8Stage  # noqa: E402
from qwenquant.stages.smooth import SmoothStage  # noqa: E402

WEIGHTS = ("channel", "tensor", "block")
ACTIVATIONS = ("dynamic", "static", "none")
ACCEPTANCE = ("channel", "dynamic")  # the target: within 1% of the bf16 source perplexity
ACCEPTANCE_PCT = 1.0
# which rows get perplexity on the full WikiText-2 test (the others: on the KL tokens only)
FULL_PPL = {"all": ".*", "none": "a^", "unsmoothed": r"^fp8 w:\w+ a:\w+$"}


def combos() -> list[tuple[str, str]]:
    return [(w, a) for w in WEIGHTS for a in ACTIVATIONS if not (w == "block" and a == "static")]


def variant_name(weights: str, acts: str, alpha: float | None) -> str:
    base = f"fp8 w:{weights} a:{acts}"
    return base if alpha is None else f"{base} + smooth a={alpha:g}"


def parse_sweep(spec: str, alphas: list[float]) -> dict[tuple[str, str], list[float]]:
    """`channel/static;tensor/static=0.3,0.85` -> {(channel, static): alphas, (tensor, static): [0.3, 0.85]}."""
    out = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        combo, _, own = entry.partition("=")
        w, a = combo.split("/")
        if (w, a) not in combos():
            raise SystemExit(f"--sweep: {combo} is not a valid weights/activations combination")
        out[(w, a)] = [float(x) for x in own.split(",")] if own else alphas
    return out


def plan(args) -> list[dict]:
    """Rows to run, most important first: the unsmoothed grid, smoothing at the default alpha, then the sweep."""
    seeds = [int(s) for s in args.seeds.split(",")]
    sweep = parse_sweep(args.sweep, [float(a) for a in args.alphas.split(",")])
    entries = []
    for w, a in combos():
        entries.append({"weights": w, "activations": a, "smooth_alpha": None, "group": "grid"})
    for w, a in combos():
        entries.append({"weights": w, "activations": a, "smooth_alpha": args.default_alpha, "group": "grid"})
    for alpha in sorted({al for als in sweep.values() for al in als}):
        if alpha == args.default_alpha:
            continue
        for w, a in combos():
            if alpha in sweep.get((w, a), ()):
                entries.append({"weights": w, "activations": a, "smooth_alpha": alpha, "group": "alpha-sweep"})
    rows = []
    for e in entries:
        stages = [SmoothStage(alpha=e["smooth_alpha"])] if e["smooth_alpha"] is not None else []
        stages.append(FP8Stage(weights=e["weights"], activations=e["activations"], block_size=128))
        name = variant_name(e["weights"], e["activations"], e["smooth_alpha"])
        if (args.only and not re.search(args.only, name)) or (args.skip and re.search(args.skip, name)):
            continue
        full = bool(re.search(FULL_PPL.get(args.full_ppl, args.full_ppl), name))
        for seed in (seeds if calibration_dependent(stages) else seeds[:1]):
            rows.append({"name": name, "stages": stages, "seed": seed, "tags": e | {"full_ppl": full}})
    # The acceptance row first, then the cheap KL-only rows (the smoothing / alpha decisions), then the other
    # full-test perplexity rows: an interrupted run (see --resume) has the decision-relevant rows first.
    accept = variant_name(*ACCEPTANCE, None)
    return sorted(rows, key=lambda r: (r["name"] != accept, r["tags"]["full_ppl"]))


def _by(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(rows: list[dict], src: dict, meta: dict) -> str:
    """Markdown findings computed from the rows (acceptance, best variant, smoothing and alpha, seed noise)."""
    out = ["## Findings (computed from the rows below)", ""]
    w, a = ACCEPTANCE
    acc = _by(rows, weights=w, activations=a, smooth_alpha=None)
    if acc:
        r = acc[0]
        full = meta["ppl_windows"] == meta["ppl_windows_total"]
        ok = abs(r["delta_ppl_pct"]) <= ACCEPTANCE_PCT
        out.append(
            f"- **Acceptance (FP8 channel weights + dynamic per-token activations within {ACCEPTANCE_PCT:g}% of the "
            f"bf16 source perplexity on WikiText-2 test)**: source {src['ppl']:.4f}, FP8 {r['ppl']:.4f}, "
            f"Δ {r['delta_ppl_pct']:+.3f}% -> **{'PASS' if ok else 'FAIL'}**"
            + ("" if full else f" (SUBSET of {meta['ppl_windows']} windows, not the full test: smoke run only)")
            + f"; mean KL {r['mean_kl']:.2e} nats, top-1 agreement {r['top1']:.4f}."
        )
    agg = aggregate_seeds([r for r in rows if r["variant"] != src["variant"]])
    with_acts = [g for g in agg if g.get("activations") != "none"]
    if with_acts:
        best = min(with_acts, key=lambda g: g["mean_kl"])
        out.append(f"- Lowest mean KL with FP8 activations: `{best['variant']}` ({best['mean_kl']:.3e} nats, "
                   f"Δppl on the KL tokens {best['delta_ppl_kl_pct']:+.3f}%).")
    wo = [g for g in agg if g.get("activations") == "none"]
    if wo:
        best = min(wo, key=lambda g: g["mean_kl"])
        out.append(f"- Lowest mean KL weight-only: `{best['variant']}` ({best['mean_kl']:.3e} nats).")
    spreads = [g["mean_kl_spread"] / g["mean_kl"] for g in agg if g.get("mean_kl_spread") is not None and g["mean_kl"]]
    if spreads:
        out.append(f"- Seed noise (calibration-dependent variants, seeds {meta.get('seeds')}): |KL(seed a) - KL(seed b)| "
                   f"/ mean KL: median {sorted(spreads)[len(spreads) // 2] * 100:.1f}%, max {max(spreads) * 100:.1f}%.")
    out += ["", "### Smoothing: mean KL (nats) by alpha: mean over seeds (seed 0 / seed 1; Δppl % on the KL tokens, "
               "mean over seeds)", ""]
    header = "| weights / activations | no smoothing | " + " | ".join(
        f"a={al:g}" for al in sorted({r['smooth_alpha'] for r in rows if r.get('smooth_alpha') is not None})) + " | best |"
    alphas = sorted({r["smooth_alpha"] for r in rows if r.get("smooth_alpha") is not None})
    # noise scale: a row's own seed spread, but at least the median spread of all calibration-dependent rows
    # (two seeds give a poor estimate of any single row's spread)
    abs_spreads = sorted(g["mean_kl_spread"] for g in agg if g.get("mean_kl_spread") is not None)
    typical = abs_spreads[len(abs_spreads) // 2] if abs_spreads else 0.0
    header += " best - none: ΔKL (seed spread) |"
    out += [header, "|---|" + "---:|" * (len(alphas) + 3)]
    for w, a in combos():
        cells = []
        options = {}
        for al in [None, *alphas]:
            rs = _by(rows, weights=w, activations=a, smooth_alpha=al)
            if not rs:
                cells.append("-")
                continue
            kl = _mean([r["mean_kl"] for r in rs])
            options[al] = kl
            per_seed = "/".join(f"{r['mean_kl']:.2e}" for r in sorted(rs, key=lambda r: r["seed"]))
            dppl = _mean([r["delta_ppl_kl_pct"] for r in rs])
            cells.append(f"{kl:.2e} ({per_seed}; {dppl:+.2f}%)" if len(rs) > 1 else f"{kl:.2e} ({dppl:+.2f}%)")
        if not options:
            continue
        best = min(options, key=options.get)
        verdict = "-"
        if best is not None and None in options:
            d = options[best] - options[None]
            spread = max(typical, *(_spread(_by(rows, weights=w, activations=a, smooth_alpha=al)) for al in (best, None)))
            verdict = f"{d:+.1e} ({spread:.1e}; {'beyond' if abs(d) > spread else 'within'} seed noise)"
        elif best is None and len(options) > 1:
            second = min((al for al in options if al is not None), key=options.get)
            d = options[second] - options[None]
            spread = max(typical, *(_spread(_by(rows, weights=w, activations=a, smooth_alpha=al)) for al in (second, None)))
            verdict = (f"best smoothing a={second:g}: {d:+.1e} ({spread:.1e}; "
                       f"{'beyond' if abs(d) > spread else 'within'} seed noise)")
        out.append(f"| {w} / {a} | " + " | ".join(cells) + f" | {'none' if best is None else f'a={best:g}'} | {verdict} |")
    out += ["", f"Seed spread = |KL(seed 0) - KL(seed 1)| of a calibration-dependent row (0 for calibration-independent "
                f"rows). A difference is called beyond seed noise when it exceeds the larger spread of the two rows "
                f"and the median spread of all calibration-dependent variants ({typical:.1e} nats); with two seeds "
                f"this is a rough screen, not a significance test."]
    return "\n".join(out)


def _spread(rs: list[dict]) -> float:
    kls = [r["mean_kl"] for r in rs]
    return max(kls) - min(kls) if len(kls) > 1 else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_harness_args(p)
    p.add_argument("--name", default=None, help="results name (default fp8_variants, or fp8_variants_quick)")
    p.add_argument("--seeds", default="0,1", help="calibration seeds for calibration-dependent variants")
    p.add_argument("--default-alpha", type=float, default=SmoothStage().alpha,
                   help="smoothing alpha for combinations outside the sweep (default: SmoothStage's default)")
    p.add_argument("--alphas", default="0.3,0.5,0.7,0.85", help="alpha sweep")
    p.add_argument("--sweep", default="channel/static;tensor/static;channel/dynamic",
                   help="';'-separated weights/activations combinations that get the alpha sweep, each optionally "
                        "with its own alphas: 'channel/static;channel/dynamic=0.5,0.85'")
    p.add_argument("--full-ppl", default="unsmoothed",
                   help="rows that get perplexity on the full test: unsmoothed (default), all, none, or a regex on the "
                        "variant name; the others get perplexity on the KL tokens only (KL is always on all KL tokens)")
    p.add_argument("--only", default=None, help="regex: run only variants whose name matches")
    p.add_argument("--skip", default=None, help="regex: skip variants whose name matches")
    p.add_argument("--plan", action="store_true", help="print the rows that would run, and exit")
    p.add_argument("--resume", action="store_true", help="skip rows already in <name>.partial.json")
    p.add_argument("--rebuild", action="store_true",
                   help="rewrite <name>.md (and the JSON) from an existing <name>.json with the current summary code")
    args = p.parse_args(argv)
    name = args.name or ("fp8_variants_quick" if args.quick else "fp8_variants")

    if args.rebuild:
        data = json.loads((args.out_dir / f"{name}.json").read_text())
        src, rows = data["rows"][0], data["rows"][1:]
        summary = summarize(rows, src, data["meta"])
        print(summary)
        write_results(name, data["rows"], data["meta"], args.out_dir, summary_md=summary)
        return 0

    todo = plan(args)
    if args.plan:
        for r in todo:
            print(f"{r['name']:45s} seed={r['seed']}  ({r['tags']['group']}, "
                  f"{'full-test ppl' if r['tags']['full_ppl'] else 'KL tokens only'})")
        print(f"{len(todo)} quantized rows + the source")
        return 0

    t0 = time.perf_counter()
    h = harness_from_args(args)
    src = h.source_row()
    partial = args.out_dir / f"{name}.partial.json"
    done = load_partial(partial) if args.resume else []
    done_keys = {(r["variant"], r["seed"]) for r in done}
    rows = [r for r in done if r["variant"] != src["variant"]]
    for i, item in enumerate(todo, 1):
        if (item["name"], item["seed"]) in done_keys:
            continue
        _log(f"[{i}/{len(todo)}] {item['name']} seed={item['seed']}")
        rows.append(h.evaluate_variant(item["name"], item["stages"], item["seed"], tags=item["tags"],
                                       full_ppl=item["tags"]["full_ppl"]))
        save_partial(partial, rows)
    wall = time.perf_counter() - t0
    meta = h.meta() | {
        "seeds": args.seeds,
        "default_alpha": args.default_alpha,
        "alphas": args.alphas,
        "sweep": args.sweep,
        "full_ppl_rows": args.full_ppl,
        "calibration_independent_variants": "FP8 with dynamic or no activation quantization and no smoothing: "
                                            "weights-only functions, run once (seed 0)",
        "total_wall_s": wall,
    }
    all_rows = [src | {"weights": None, "activations": None, "smooth_alpha": None, "group": "source"}, *rows]
    summary = summarize(rows, src, meta)
    print(summary)
    write_results(name, all_rows, meta, args.out_dir, summary_md=summary)
    if partial.exists() and len(rows) == len(todo):
        partial.unlink()
    _log(f"total wall {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
