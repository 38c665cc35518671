#!/usr/bin/env python
"""Peak host memory vs model size: is it bounded by one layer plus activations beyond the loaded weights?

    python benchmarks/memory_scaling.py --plan                 # what would run
    python benchmarks/memory_scaling.py                        # 0.6B- and 1.7B-shaped random Qwen3, FP8 (~10-20 min)
    python benchmarks/memory_scaling.py --models 0.6b:layers=14,0.6b --scheme rtn     # any sizes, any scheme
    python benchmarks/memory_scaling.py --resume               # skip models already in results/<name>.partial.json
    python benchmarks/memory_scaling.py --rebuild              # rewrite the tables from the partial file

For each model (shape-true, random weights, built once by benchmarks/random_models.py and cached in --models-root)
it runs `qwenquant run RECIPE --model M --out OUT --json` in a child process under benchmarks/memtrace.py, which
gives the child's peak RSS (ru_maxrss, exact) and the sampled peak within each phase of the run (load, eval_source,
quantize, eval_quantized, export, verify, report). The recipe is the chosen scheme with quick settings (calibration
--num-samples x --seq-len, perplexity off, next-token KL on --kl-tokens tokens in one --eval-window window,
verification off unless --verify): what is measured is memory, and the KL statistics' float32 temporaries
(5 x kl_tokens x vocab x 4 B, 3.1 GB at 1024 x 151936) are a fixed, vocabulary-sized term, the same for every model
here. Before each run the `--dry-run` estimate is taken too (column "est").

Columns: weights = the loaded model in bf16 (parameters x 2 B; tied embeddings once); peak - weights for the whole
run and for the quantization phase; slope = change of the peak per byte of weights between consecutive models
(1.0: the peak grows only by the weights themselves; above 1: something else scales with the model, e.g. the
quantization records held until export, 1 B/weight for FP8 and 4 B/weight for INT codes, or the export's
pending shard). The report's `memory.peak_host_bytes` is recorded too when the report has it.
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
from random_models import build_random_qwen3, config_for  # noqa: E402

SCHEMES = {  # name -> recipe stages
    "fp8": [{"fp8": {"weights": "channel", "activations": "dynamic"}}],
    "rtn": [{"rtn": {"bits": 4, "group_size": 128}}],
    "gptq": [{"gptq": {"bits": 4, "group_size": 128}}],
    "awq": [{"awq": {"bits": 4, "group_size": 128}}],
}

COLUMNS = (
    ("model", "model", "s"),
    ("params_b", "params B", ".3f"),
    ("weights_gib", "weights GiB", ".2f"),
    ("output_gib", "output GiB", ".3f"),
    ("peak_gib", "peak GiB", ".2f"),
    ("est_peak_gib", "est peak GiB", ".2f"),
    ("peak_minus_weights_gib", "peak-weights GiB", ".2f"),
    ("quantize_peak_gib", "quantize GiB", ".2f"),
    ("quantize_minus_weights_gib", "quantize-weights GiB", ".2f"),
    ("export_peak_gib", "export GiB", ".2f"),
    ("anon_peak_gib", "anon peak GiB", ".2f"),
    ("quantize_anon_gib", "quantize anon GiB", ".2f"),
    ("peak_phase", "peak phase", "s"),
    ("slope", "slope", ".2f"),
    ("quantize_slope", "quantize slope", ".2f"),
    ("anon_slope", "anon slope", ".2f"),
    ("wall_s", "wall s", ".0f"),
)


def params_of(spec: str) -> int:
    """Parameters of a random_models spec from its config (embedding counted once when tied)."""
    c = config_for(spec)
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd, q, kv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    layer = h * q * hd + 2 * h * kv * hd + q * hd * h + 3 * h * i + 2 * h + 2 * hd
    emb = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2)
    return n * layer + emb + h


def recipe_for(args) -> dict:
    return {
        "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len},
        "stages": SCHEMES[args.scheme],
        "eval": {"perplexity": False, "window": args.eval_window, "kl_tokens": args.kl_tokens, "verify": args.verify},
    }


def _dry_run_peak(argv: list[str], timeout: float) -> int | None:
    try:
        proc = subprocess.run([sys.executable, "-m", "qwenquant", *argv, "--dry-run", "--json"], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        return json.loads(proc.stdout)["memory"]["peak_host_bytes"]
    except Exception:  # the estimate is a bonus column; its absence must not stop the measurement
        return None


def run_model(spec: str, args, recipe_path: Path) -> dict:
    """Build (or reuse) the model, run the recipe under memtrace, return the row."""
    row: dict = {"model": spec, "scheme": args.scheme}
    try:
        path = build_random_qwen3(spec, args.models_root)
    except Exception as err:
        row["error"] = f"building the model failed: {type(err).__name__}: {err}"
        return row
    params = params_of(spec)
    out = Path(args.work) / "out" / re.sub(r"\W+", "-", spec)
    shutil.rmtree(out, ignore_errors=True)
    argv = ["run", str(recipe_path), "--model", str(path), "--out", str(out), "--device", "cpu"]
    row.update({"path": str(path), "argv": argv, "params_b": params / 1e9, "weights_gib": 2 * params / 2**30,
                "source_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors"))})
    if args.estimate:
        est = _dry_run_peak(argv, 600)
        row["est_peak_gib"] = est / 2**30 if est else None
    row["load_avg"] = os.getloadavg()[0]
    trace = trace_cli(argv + ["--json"], timeout_s=args.timeout, threads=args.threads)
    row["trace"] = trace.to_dict()
    row["wall_s"] = trace.wall_s
    if trace.returncode != 0:
        row["error"] = f"run exited {trace.returncode}: {trace.stderr_tail[-600:]}"
    report_file = out / "qwenquant_report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        row["report_peak_gib"] = (report.get("memory") or {}).get("peak_host_bytes", 0) / 2**30 or None
        row["output_gib"] = (report.get("sizes") or {}).get("output_bytes", 0) / 2**30 or None
        row["timings_s"] = report.get("timings_s")
    peak = trace.peak_rss_bytes / 2**30
    phases = {k: v / 2**30 for k, v in trace.phase_peaks.items() if k != "process"}
    row.update({
        "peak_gib": peak,
        "peak_minus_weights_gib": peak - row["weights_gib"],
        "phase_peaks_gib": phases,
        "peak_phase": max(phases, key=phases.get) if phases else None,
        "quantize_peak_gib": phases.get("quantize"),
        "quantize_minus_weights_gib": phases["quantize"] - row["weights_gib"] if "quantize" in phases else None,
        "export_peak_gib": phases.get("export"),
        "anon_peak_gib": trace.sampled_peak_anon_bytes / 2**30,
        "phase_anon_peaks_gib": {k: v / 2**30 for k, v in trace.phase_anon_peaks.items() if k != "process"},
    })
    row["quantize_anon_gib"] = row["phase_anon_peaks_gib"].get("quantize")
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    return row


def add_slopes(rows: list[dict]) -> None:
    """Slope of the peak (and of the quantize-phase peak) per byte of weights vs the previous finished model."""
    prev = None
    for r in rows:
        if "error" in r or r.get("peak_gib") is None:
            continue
        if prev is not None and r["weights_gib"] != prev["weights_gib"]:
            dw = r["weights_gib"] - prev["weights_gib"]
            r["slope"] = (r["peak_gib"] - prev["peak_gib"]) / dw
            if r.get("quantize_peak_gib") is not None and prev.get("quantize_peak_gib") is not None:
                r["quantize_slope"] = (r["quantize_peak_gib"] - prev["quantize_peak_gib"]) / dw
            if r.get("anon_peak_gib") and prev.get("anon_peak_gib"):
                r["anon_slope"] = (r["anon_peak_gib"] - prev["anon_peak_gib"]) / dw
            if r.get("quantize_anon_gib") is not None and prev.get("quantize_anon_gib") is not None:
                r["quantize_anon_slope"] = (r["quantize_anon_gib"] - prev["quantize_anon_gib"]) / dw
        prev = r


def summary_md(rows: list[dict], args) -> str:
    ok = [r for r in rows if "error" not in r]
    lines = ["## Summary", ""]
    if len(ok) < 2:
        lines.append("Fewer than two models finished: no slope.")
    for r in ok:
        if r.get("slope") is not None:
            anon = (f"; anonymous memory (RSS without file-backed pages) grows {r['anon_slope']:.2f} GiB per GiB"
                    if r.get("anon_slope") is not None else "")
            lines.append(
                f"- {r['model']} vs the previous model: the whole-run RSS peak grows {r['slope']:.2f} GiB per GiB of "
                f"weights, the quantization phase's RSS peak {r.get('quantize_slope') or float('nan'):.2f} GiB per GiB"
                f"{anon} (1.0 = only the weights themselves grow; the rest bounded)."
            )
    for r in ok:
        lines.append(f"- {r['model']}: peak {r['peak_gib']:.2f} GiB during {r['peak_phase']}; peak - weights "
                     f"{r['peak_minus_weights_gib']:.2f} GiB; phases: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in r["phase_peaks_gib"].items()))
    kl = 5 * 4 * args.kl_tokens * 151936 / 2**30
    lines += ["", f"The KL statistics alone take {kl:.2f} GiB at these settings (5 float32 [kl_tokens, vocab] tensors), "
              "the same for every model here: it is part of `peak - weights` whenever the peak is in the `report` "
              "or `verify` phase.", "",
              "How to read the RSS: transformers memory-maps bf16 safetensors, so the loaded weights are file-backed "
              "pages in the RSS. The quantizer gives every Linear a new (dequantized) weight while the mapped "
              "original stays resident (clean page cache the kernel may drop, but counted in RSS), so from the "
              "quantization phase on the RSS holds the quantized Linears twice: a slope near 2 over the model size. "
              "The anonymous-memory columns leave file-backed pages out."]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines.append("- failed: " + "; ".join(f"{r['model']}: {r['error'][:300]}" for r in failed))
    return "\n".join(lines)


def write(name: str, rows: list[dict], meta: dict, args) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    print_table(rows, COLUMNS, title=f"peak host memory vs model size ({args.scheme})")
    full = environment_meta() | meta
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps({"meta": full, "rows": rows}, indent=1, default=str) + "\n")
    m = full
    md = [
        f"# {name}: peak host memory vs model size",
        "",
        f"- date (UTC): {m['date_utc']}; machine: {m['machine']['platform']}, {m['machine']['cpu_count']} CPUs "
        f"(shared; load average per row in the JSON); torch {m['torch']}, qwenquant @ {m['qwenquant_git_commit']}"
        + (" (uncommitted changes in qwenquant/)" if m.get("qwenquant_tree_dirty") else ""),
        f"- command: `{m['command']}`",
        f"- recipe: {json.dumps(meta['recipe'])}",
        "- models: shape-true random Qwen3 (benchmarks/random_models.py; vocabulary 151936, tied embeddings); "
        "peak = the child's ru_maxrss; phase peaks sampled every 20 ms (benchmarks/memtrace.py).",
        "",
        summary_md(rows, args),
        "",
        "## Rows",
        "",
        markdown_table(rows, COLUMNS),
        "",
    ]
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(md))
    _log(f"wrote {RESULTS_DIR / name}.json and .md")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="0.6b,1.7b", help="comma-separated random_models specs, smallest first")
    ap.add_argument("--scheme", default="fp8", choices=sorted(SCHEMES))
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-window", type=int, default=1024)
    ap.add_argument("--kl-tokens", type=int, default=1024)
    ap.add_argument("--verify", action="store_true", help="also reload and verify the checkpoint (more memory)")
    ap.add_argument("--no-estimate", dest="estimate", action="store_false", help="skip the --dry-run column")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the child (default: torch's)")
    ap.add_argument("--models-root", default="/tmp/qq-models", help="built models are cached here")
    ap.add_argument("--work", default="/tmp/qq-memory-scaling")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--name", default="memory_scaling")
    ap.add_argument("--plan", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    specs = [s.strip() for s in args.models.split(",") if s.strip()]
    recipe = recipe_for(args)
    if args.plan:
        for s in specs:
            print(f"{s}: {params_of(s) / 1e9:.3f}B parameters, {2 * params_of(s) / 2**30:.2f} GiB bf16; recipe {recipe}")
        return 0
    from qwenquant.recipe import recipe_from_dict  # validates the recipe before anything runs

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe_path = work / f"recipe-{args.scheme}.yaml"
    recipe_path.write_text(recipe_from_dict(recipe).to_yaml())
    partial = RESULTS_DIR / f"{args.name}.partial.json"
    rows = load_partial(partial) if (args.resume or args.rebuild) else []
    final = RESULTS_DIR / f"{args.name}.json"
    if args.rebuild and not rows and final.is_file():  # a finished run keeps its rows in the final JSON
        rows = json.loads(final.read_text())["rows"]
    meta = {"models": specs, "scheme": args.scheme, "recipe": recipe}
    if not args.rebuild:
        done = {r["model"] for r in rows if "error" not in r}
        rows = [r for r in rows if r["model"] in done]
        for spec in specs:
            if spec in done:
                continue
            _log(f"model {spec}")
            t = time.time()
            row = run_model(spec, args, recipe_path)
            rows.append(row)
            save_partial(partial, rows)
            _log(f"  {spec}: " + (row.get("error") or f"peak {row['peak_gib']:.2f} GiB, weights "
                                                      f"{row['weights_gib']:.2f} GiB ({time.time() - t:.0f}s)"))
    order = {s: i for i, s in enumerate(specs)}
    rows.sort(key=lambda r: order.get(r["model"], len(order)))
    add_slopes(rows)
    write(args.name, rows, meta, args)
    if not args.rebuild and all("error" not in r for r in rows):
        partial.unlink(missing_ok=True)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
