#!/usr/bin/env python
"""INT8 W8A8 and NVFP4 beside FP8 dynamic and W4A16 GPTQ on one source, through the CLI as users run them (issue 13).

    python benchmarks/int8_nvfp4.py [--model ../shared/models/qwen3-mini] [--seeds 0,1] [--name int8_nvfp4]

Each row is one `qwenquant <command> ... --json` in its own process (the README's flags; default calibration: builtin
128 x 512 with `--seed S`; default evaluation: perplexity on the first 4 WikiText-2 test windows of 2048 tokens and
mean next-token KL(source || quantized) on the first 4096 tokens, float32 on the CPU, every run verified). Rows whose
result depends on the calibration samples run once per seed (the spread between seeds is the noise beside each
difference); data-free rows (FP8 dynamic, RTN without smoothing) are functions of the weights and run once. Wall time
is the whole command (quantize + evaluate + verify + write) on a shared 2-core machine, so it compares rows only
roughly. Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

# name -> (command + flags, depends on calibration)
ROWS: dict[str, tuple[list[str], bool]] = {
    "FP8 dynamic (channel, per-token)": (["fp8"], False),
    "NVFP4A16 RTN": (["nvfp4", "--method", "rtn", "--activations", "none"], False),
    "INT8 W8A8 RTN, no smoothing": (["int8", "--method", "rtn", "--no-smooth"], False),
    "W4A16 GPTQ g128": (["gptq"], True),
    "NVFP4A16 GPTQ": (["nvfp4", "--method", "gptq", "--activations", "none"], True),
    "NVFP4 W4A4 RTN": (["nvfp4", "--method", "rtn", "--activations", "dynamic"], True),
    "NVFP4 W4A4 GPTQ": (["nvfp4", "--method", "gptq", "--activations", "dynamic"], True),
    "INT8 W8A8 GPTQ, no smoothing": (["int8", "--method", "gptq", "--no-smooth"], True),
    "INT8 W8A8 GPTQ, smoothing alpha 0.5 (global)": (["int8", "--method", "gptq", "--no-alpha-search"], True),
    "INT8 W8A8 GPTQ, smoothing alpha per layer (default)": (["int8", "--method", "gptq"], True),
    "INT8 W8A8 RTN, smoothing alpha per layer": (["int8", "--method", "rtn"], True),
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_row(flags: list[str], model: str, seed: int, work: Path) -> dict:
    out = work / f"{flags[0]}-{abs(hash(tuple(flags))) % 10**8}-s{seed}"
    cmd = [sys.executable, "-m", "qwenquant", *flags, "--model", model, "--seed", str(seed), "--out", str(out),
           "--overwrite", "--json", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((out / "qwenquant_report.json").read_text())
    alphas = report.get("searched", {}) or {}
    return {"seed": seed, "wall_s": wall, "ppl": summary["quantized_ppl"], "source_ppl": summary["source_ppl"],
            "delta_ppl_pct": summary["delta_ppl_pct"], "mean_kl": summary["mean_kl"],
            "output_bytes": summary["output_bytes"], "verified": summary["verification"],
            "searched": alphas, "command": " ".join(["qwenquant", *flags, "--seed", str(seed)])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "qwen3-mini"))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rows", default="", help="comma-separated row numbers (1-based) to run; default all")
    p.add_argument("--name", default="int8_nvfp4")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [n for i, n in enumerate(ROWS, 1) if not args.rows or str(i) in args.rows.split(",")]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="qq-int8-nvfp4-") as tmp:
        for name in chosen:
            flags, calibrated = ROWS[name]
            results[name] = []
            for seed in (seeds if calibrated else seeds[:1]):
                r = run_row(flags, args.model, seed, Path(tmp))
                _log(f"{name} seed {seed}: ppl {r['ppl']:.3f} ({r['delta_ppl_pct']:+.2f}%) KL {r['mean_kl']:.3e} "
                     f"wall {r['wall_s']:.0f}s")
                results[name].append(r)
            write(results, args, seeds, done=False)
    write(results, args, seeds, done=True)
    return 0


def write(results: dict[str, list[dict]], args, seeds: list[int], done: bool) -> None:
    """The table so far: `<name>.partial.json` / `.partial.md` while rows remain, `<name>.json` / `.md` at the end."""
    rows = []
    for name, runs in results.items():
        kls = [r["mean_kl"] for r in runs]
        rows.append({"row": name, "runs": runs, "mean_kl": statistics.mean(kls),
                     "kl_spread": max(kls) - min(kls) if len(kls) > 1 else None,
                     "delta_ppl_pct": statistics.mean(r["delta_ppl_pct"] for r in runs),
                     "wall_s": statistics.median(r["wall_s"] for r in runs),
                     "output_mib": runs[0]["output_bytes"] / 2**20, "verified": all(r["verified"] for r in runs)})
    table = ["| scheme | seeds | mean KL | KL spread (seeds) | ppl change (mean) | output MiB | wall s (median) | "
             "verified |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        spread = "data-free" if r["kl_spread"] is None else f"{r['kl_spread']:.2e}"
        table.append(f"| {r['row']} | {','.join(str(x['seed']) for x in r['runs'])} | {r['mean_kl']:.3e} | {spread} | "
                     f"{r['delta_ppl_pct']:+.2f}% | {r['output_mib']:.1f} | {r['wall_s']:.0f} | {r['verified']} |")
    source_ppl = next(iter(results.values()))[0]["source_ppl"]
    meta = {"model": args.model, "seeds": seeds, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpus": os.cpu_count(), "source_ppl": source_ppl,
            "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                         text=True).stdout.strip()}
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    name = args.name if done else f"{args.name}.partial"
    if done:
        for stale in (out / f"{args.name}.partial.json", out / f"{args.name}.partial.md"):
            stale.unlink(missing_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / f"{name}.md").write_text("\n".join([
        f"# {name}", "",
        f"- {meta['date_utc']}, qwenquant @ {meta['git_commit']}, {meta['cpus']} CPUs shared with other jobs; model "
        f"{args.model} (source perplexity {source_ppl:.3f} on the first 4 WikiText-2 windows)",
        "- each row: the CLI command with `--seed S` (builtin calibration 128 x 512); KL = mean next-token KL(source "
        "|| quantized) on 4096 tokens, float32; calibrated rows per seed (spread = max - min), data-free rows once",
        "- INT8 and NVFP4 activations are simulated as the engines quantize them (INT8 per token; FP4 per 16 with "
        "E4M3 scales under a calibrated global input scale); no GPU ran any of this", "",
        *table, ""]))
    print("\n".join(table), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
