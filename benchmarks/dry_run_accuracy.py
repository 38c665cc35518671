#!/usr/bin/env python
"""How close is `--dry-run` to reality? Estimate, then run the same command, and compare.

    python benchmarks/dry_run_accuracy.py --plan              # list the cases
    python benchmarks/dry_run_accuracy.py                     # all cases (~30-60 min on 2 shared cores)
    python benchmarks/dry_run_accuracy.py --only mini         # regex on case names
    python benchmarks/dry_run_accuracy.py --resume            # skip cases already in results/<name>.partial.json
    python benchmarks/dry_run_accuracy.py --rebuild           # rewrite the tables from the partial file
    python benchmarks/dry_run_accuracy.py --redo "0.6b gptq"  # run matching cases again, keep the others

Each case runs `python -m qwenquant <command> ... --dry-run --json` (a child process, as a user would) and right
after it the same command for real under `benchmarks/memtrace.py`, which measures the child's peak RSS (ru_maxrss)
and the peak within each phase; the real run's report gives the output size and per-stage times. Compared:
output safetensors bytes, peak host RSS, and total wall time (estimate total vs the child's wall time), plus every
stage in the JSON. Models: the trained qwen3-mini (../shared) and shape-true random Qwen3-0.6B checkpoints built by
`benchmarks/random_models.py` (real shapes incl. the 151936-token vocabulary; random weights: accuracy numbers from
them mean nothing, memory and time do). The 0.6B cases use quick settings (8 x 256 calibration tokens, one
perplexity window); the ones that verify use a recipe with eval.kl_tokens 2048 so that the run's KL statistics
(5 x tokens x vocab x 4 B, see qwenquant/estimate/memory.py) fit this 24 GiB machine beside other work. The
--offload-dir cases run Qwen3-8B's widths (one decoder layer: its 12288-wide MLP and GPTQ Hessians, the untied
151936 x 4096 embedding and lm_head) and a 4-layer 1.7B, the largest that finish in minutes here, with SMALL_8B's
settings; fp8 and rtn with their defaults take the data-free streaming path.

The machine is shared: the load average before each dry run and each real run is recorded; times measured under a
different load than the probe saw differ by that much (the probe takes the fastest of a few calls).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from harness import RESULTS_DIR, _log, environment_meta, load_partial, markdown_table, print_table, save_partial  # noqa: E402
from memtrace import trace_cli  # noqa: E402
from random_models import build_random_qwen3  # noqa: E402

MINI = "/work/shared/models/qwen3-mini"
QUICK = ["--num-samples", "8", "--seq-len", "256", "--eval-windows", "1"]
OFFLOAD = "{offload}"  # replaced by a folder under --work
# shape-true 8B layers on the 2-core box: a bf16 layer forward costs ~0.03-0.06 s per token and the 151936 x 4096
# lm_head ~0.1-0.2 s per token, so these runs use few calibration tokens and one 512-token window for everything
SMALL_8B = {"calibration": {"num_samples": 4, "seq_len": 128}, "eval": {"window": 512, "max_windows": 1,
                                                                          "kl_tokens": 512}}

# name, model (a path or a random_models spec prefixed "random:"), argv after the model (a recipe: ("run", {...}))
CASES = [
    ("mini fp8", MINI, ["fp8", "--eval-windows", "4"]),
    ("mini gptq w4", MINI, ["gptq", "--eval-windows", "4"]),
    ("mini awq w4 (awq format)", MINI, ["awq", "--eval-windows", "4", "--format", "awq"]),
    ("mini rtn w4", MINI, ["rtn", "--eval-windows", "4"]),
    ("0.6b fp8 (no verify)", "random:0.6b", ["fp8", *QUICK, "--no-verify"]),
    ("0.6b gptq w4 (no verify)", "random:0.6b", ["gptq", *QUICK, "--no-verify"]),
    ("0.6b rtn w4 (verify, kl_tokens 2048)", "random:0.6b",
     ["run", {"stages": [{"rtn": {"bits": 4, "group_size": 128}}],
              "eval": {"max_windows": 1, "kl_tokens": 2048}}]),
    # --offload-dir at Qwen3-8B widths (one decoder layer; the untied 151936-row embedding and lm_head): the
    # commands `qwenquant fp8 --activations static --smooth` and `qwenquant gptq` run as recipes for SMALL_8B's
    # evaluation settings
    ("8b:1 layer fp8 static smooth (offload)", "random:8b:layers=1",
     ["run", {"stages": [{"smooth": {}}, {"fp8": {"activations": "static"}}]} | SMALL_8B,
      "--offload-dir", OFFLOAD]),
    ("1.7b:4 layers gptq w4 (offload)", "random:1.7b:layers=4",
     ["run", {"stages": [{"gptq": {"bits": 4, "group_size": 128}}]} | SMALL_8B, "--offload-dir", OFFLOAD]),
    ("8b:1 layer gptq w4 (offload)", "random:8b:layers=1",
     ["run", {"stages": [{"gptq": {"bits": 4, "group_size": 128}}]} | SMALL_8B, "--offload-dir", OFFLOAD]),
]

COLUMNS = (
    ("case", "case", "s"),
    ("size_est_mib", "size est MiB", ".2f"),
    ("size_real_mib", "size MiB", ".2f"),
    ("size_err_pct", "size err %", "+.3f"),
    ("peak_est_gib", "peak est GiB", ".2f"),
    ("peak_real_gib", "peak GiB", ".2f"),
    ("peak_err_pct", "peak err %", "+.1f"),
    ("peak_phase_est", "est phase", "s"),
    ("peak_phase_real", "real phase", "s"),
    ("time_est_s", "time est s", ".0f"),
    ("time_est_after_s", "est after s", ".0f"),
    ("time_real_s", "time s", ".0f"),
    ("time_ratio", "est/real", ".2f"),
    ("time_ratio_after", "after/real", ".2f"),
    ("load_dry", "load@dry", ".1f"),
    ("load_run", "load@run", ".1f"),
    ("load_dry_after", "load@after", ".1f"),
)


def _recipe_file(body: dict, folder: Path) -> Path:
    """A recipe YAML with the given sections (calibration: the quick settings) validated by qwenquant itself."""
    from qwenquant.recipe import recipe_from_dict

    data = {"calibration": {"num_samples": 8, "seq_len": 256}} | body
    recipe = recipe_from_dict(data)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("recipe-" + str(abs(hash(json.dumps(body, sort_keys=True)))) + ".yaml")
    path.write_text(recipe.to_yaml())
    return path


def case_argv(argv: list, model: str, out: Path, work: Path) -> list[str]:
    """The qwenquant argument list of a case (its recipe written to `work` when it has one; OFFLOAD becomes a
    folder under `work`)."""
    rest = [str(work / "offload") if a == OFFLOAD else a for a in argv[2 if argv[0] == "run" else 1:]]
    if argv[0] == "run":
        return ["run", str(_recipe_file(argv[1], work)), "--model", model, *rest, "--out", str(out), "--device", "cpu"]
    return [argv[0], "--model", model, *rest, "--out", str(out), "--device", "cpu"]


def _dry_run(args: list[str], timeout_s: float) -> tuple[dict | None, float, str]:
    """(estimate JSON, seconds, stderr tail) of `python -m qwenquant <args> --dry-run --json`."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qwenquant", *args, "--dry-run", "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    took = time.perf_counter() - t
    try:
        return json.loads(proc.stdout), took, proc.stderr[-2000:]
    except json.JSONDecodeError:
        return None, took, proc.stderr[-2000:]


def _pct(est: float | None, real: float | None) -> float | None:
    return None if not est or not real else 100.0 * (est / real - 1.0)


def run_case(name: str, model: str, argv: list, work: Path, timeout_s: float, keep: bool) -> dict:
    """Dry run, then the real run; one row comparing them."""
    if model.startswith("random:"):
        model = str(build_random_qwen3(model.split(":", 1)[1], work / "models"))
    out = work / "out" / re.sub(r"\W+", "-", name).strip("-")
    shutil.rmtree(out, ignore_errors=True)
    args = case_argv(argv, model, out, work)
    row: dict = {"case": name, "model": model, "argv": args,
                 "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    row["load_dry"] = os.getloadavg()[0]
    est, dry_s, dry_err = _dry_run(args, timeout_s)
    row["dry_run_s"] = dry_s
    if est is None or not est.get("dry_run"):
        row["error"] = f"dry run failed: {dry_err}"
        return row
    row["estimate"] = {k: est[k] for k in ("sizes", "memory", "timings_s", "run", "disk", "fits", "notes")}
    row["probe"] = est["probe"]
    row["load_run"] = os.getloadavg()[0]
    trace = trace_cli(args + ["--json"], timeout_s=timeout_s)
    row["trace"] = trace.to_dict()
    report_file = out / "qwenquant_report.json"
    if trace.returncode != 0 or not report_file.is_file():
        row["error"] = f"real run exited {trace.returncode}: {trace.stderr_tail[-800:]}"
        return row
    report = json.loads(report_file.read_text())
    row["report"] = {k: report[k] for k in ("sizes", "memory", "timings_s")}
    # the machine is shared and its load changes within minutes: estimate again right after the run (its output
    # folder exists now, hence --overwrite) and compare the run with both estimates
    row["load_dry_after"] = os.getloadavg()[0]
    after, _, _ = _dry_run(args + ["--overwrite"], timeout_s)
    row["time_est_after_s"] = after["timings_s"]["total"] if after and after.get("dry_run") else None
    real_peak = max(trace.peak_rss_bytes, report["memory"]["peak_host_bytes"])
    phases = {k: v for k, v in trace.phase_peaks.items() if k != "process"}  # "process" is the whole run
    est_phases: dict[str, int] = {}
    for k, v in est["memory"]["host_phases"].items():  # "verify (KL)" is the second half of the real "verify"
        key = k.split(" (")[0]
        est_phases[key] = max(est_phases.get(key, 0), v)
    row.update({
        "size_est_mib": est["sizes"]["output_bytes"] / 2**20,
        "size_real_mib": report["sizes"]["output_bytes"] / 2**20,
        "size_err_pct": _pct(est["sizes"]["output_bytes"], report["sizes"]["output_bytes"]),
        "peak_est_gib": est["memory"]["peak_host_bytes"] / 2**30,
        "peak_real_gib": real_peak / 2**30,
        "peak_err_pct": _pct(est["memory"]["peak_host_bytes"], real_peak),
        "peak_phase_est": est["memory"]["peak_host_phase"].split(" (")[0],
        "peak_phase_real": max(phases, key=phases.get) if phases else None,
        "time_est_s": est["timings_s"]["total"],
        "time_real_s": trace.wall_s,
        "time_ratio": est["timings_s"]["total"] / trace.wall_s,
    })
    if row["time_est_after_s"]:
        row["time_ratio_after"] = row["time_est_after_s"] / trace.wall_s
        row["time_ratio_geomean"] = (row["time_ratio"] * row["time_ratio_after"]) ** 0.5
    # per phase: estimated host bytes vs the sampled peak while that phase ran
    row["phases"] = {p: {"est_gib": est_phases.get(p, 0) / 2**30, "real_gib": phases.get(p, 0) / 2**30}
                     for p in est_phases if p in phases}
    row["stage_times"] = _stage_times(est["timings_s"], report["timings_s"], trace)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def _stage_times(est: dict, real: dict, trace) -> dict:
    """{stage: [estimated s, measured s]} for the report's timed stages, the pipeline stages, and the rest."""
    out = {k: [est.get(k), real.get(k)] for k in real if not isinstance(real[k], dict)}
    for k, v in (real.get("stages") or {}).items():
        out[f"quantize: {k}"] = [est.get("stages", {}).get(k), v]
    timed = sum(v for v in real.values() if isinstance(v, float))
    out["startup + report + untimed"] = [est.get("startup", 0) + est.get("report", 0), trace.wall_s - timed]
    out["total"] = [est.get("total"), trace.wall_s]
    return out


def summary_md(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return "No case finished."
    size = max(abs(r["size_err_pct"]) for r in ok)
    peak = [r["peak_err_pct"] for r in ok]
    ratio = [r["time_ratio"] for r in ok] + [r["time_ratio_after"] for r in ok if r.get("time_ratio_after")]
    geo = [r["time_ratio_geomean"] for r in ok if r.get("time_ratio_geomean")]
    lines = [
        "## Summary",
        "",
        f"- output size: estimate within {size:.3f}% of the written safetensors in every case (target 5%).",
        f"- peak host RSS: estimate {min(peak):+.1f}% to {max(peak):+.1f}% of the measured peak (target 30%).",
        f"- total time: estimate / measured between {min(ratio):.2f} and {max(ratio):.2f} over the estimates taken "
        "before and after each run"
        + (f" (geometric mean of the two: {min(geo):.2f} to {max(geo):.2f})" if geo else "")
        + "; target: within a factor 2. The probe and the run do not see the same contention on this shared "
        "machine (load averages in the table): the same estimate taken minutes apart differs by the ratio of "
        "the two columns.",
    ]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines.append(f"- {len(failed)} case(s) failed: " + "; ".join(f"{r['case']}: {r['error'][:200]}" for r in failed))
    lines += ["", "## Per stage (estimate s / measured s)", ""]
    for r in ok:
        parts = [f"{k} {e:.1f}/{m:.1f}" for k, (e, m) in r["stage_times"].items() if e is not None and m is not None]
        lines.append(f"- {r['case']}: " + ", ".join(parts))
    lines += ["", "## Per phase host peak (estimate GiB / sampled GiB)", ""]
    for r in ok:
        parts = [f"{k} {v['est_gib']:.2f}/{v['real_gib']:.2f}" for k, v in r["phases"].items()]
        lines.append(f"- {r['case']}: " + ", ".join(parts))
    return "\n".join(lines)


def write(name: str, rows: list[dict], meta: dict) -> None:
    """Print the table; write results/<name>.json and .md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    print_table(rows, COLUMNS, title="--dry-run estimate vs measured")
    full = environment_meta() | meta
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps({"meta": full, "rows": rows}, indent=1, default=str) + "\n")
    m = full
    md = [
        f"# {name}: `--dry-run` estimate vs the real run",
        "",
        f"- date (UTC): {m['date_utc']}; machine: {m['machine']['platform']}, {m['machine']['cpu_count']} CPUs, "
        f"shared with other work (load averages per case below); torch {m['torch']}, transformers "
        f"{m['transformers']}, qwenquant @ {m['qwenquant_git_commit']}"
        + (" (uncommitted changes in qwenquant/)" if m.get("qwenquant_tree_dirty") else ""),
        f"- command: `{m['command']}`",
        "- size: `sizes.output_bytes` of the dry run vs the written safetensors (report); peak: "
        "`memory.peak_host_bytes` vs the child's ru_maxrss; time: `timings_s.total` vs the child's wall time.",
        "",
        summary_md(rows),
        "",
        "## Cases",
        "",
        markdown_table(rows, COLUMNS),
        "",
    ]
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(md))
    _log(f"wrote {RESULTS_DIR / name}.json and .md")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", action="store_true", help="list the cases and exit")
    ap.add_argument("--only", default=None, help="regex on case names")
    ap.add_argument("--resume", action="store_true", help="skip cases already in the partial file")
    ap.add_argument("--rebuild", action="store_true", help="rewrite the tables from the partial file")
    ap.add_argument("--redo", default=None, help="regex: run these cases again, keep the other finished ones")
    ap.add_argument("--work", default="/tmp/qq-dry-run-accuracy", help="models, outputs and recipes go here")
    ap.add_argument("--name", default="dry_run_accuracy")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--keep", action="store_true", help="keep the output folders")
    a = ap.parse_args()
    cases = [c for c in CASES if (a.only is None or re.search(a.only, c[0])) and (a.redo is None or re.search(a.redo, c[0]))]
    if a.plan:
        for name, model, argv in cases:
            print(f"{name}: {model} {argv}")
        return 0
    partial = RESULTS_DIR / f"{a.name}.partial.json"
    rows = load_partial(partial) if (a.resume or a.rebuild or a.redo) and partial.is_file() else []
    final = RESULTS_DIR / f"{a.name}.json"
    if (a.resume or a.rebuild or a.redo) and not rows and final.is_file():  # a finished run: rows in the final JSON
        rows = json.loads(final.read_text())["rows"]
    if a.redo:
        rows = [r for r in rows if not re.search(a.redo, r["case"])]
    meta = {"cases": [c[0] for c in CASES], "work": a.work,
            "note": "each row has its own date_utc: --redo / --resume rows come from separate invocations"}
    if not a.rebuild:
        work = Path(a.work)
        done = {r["case"] for r in rows if "error" not in r}
        rows = [r for r in rows if r["case"] in done]
        for name, model, argv in cases:
            if name in done:
                continue
            _log(f"case {name}")
            row = run_case(name, model, argv, work, a.timeout, a.keep)
            rows.append(row)
            save_partial(partial, rows)
            _log(f"  {name}: " + (row.get("error") or f"size {row['size_err_pct']:+.3f}%, peak {row['peak_err_pct']:+.1f}%, "
                                                      f"time x{row['time_ratio']:.2f}"))
    order = {c[0]: i for i, c in enumerate(CASES)}
    rows.sort(key=lambda r: order.get(r["case"], len(order)))
    write(a.name, rows, meta)
    if not a.rebuild and all("error" not in r for r in rows) and {r["case"] for r in rows} >= {c[0] for c in CASES}:
        partial.unlink(missing_ok=True)  # complete: the final files are the record
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
