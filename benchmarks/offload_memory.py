#!/usr/bin/env python
"""Peak host memory with and without `--offload-dir`, on shape-true random Qwen3 models.

    python benchmarks/offload_memory.py --plan             # what would run
    python benchmarks/offload_memory.py                    # 0.6B-shaped random Qwen3, FP8, both modes (~5-15 min)
    python benchmarks/offload_memory.py --models 0.6b,1.7b # two sizes: the slope of the peak vs the weights
    python benchmarks/offload_memory.py --models 0.6b,0.6b:layers=56,1.7b --max-shard-mb 512   # results/offload_memory.md
    python benchmarks/offload_memory.py --scheme gptq --verify

For each model (benchmarks/random_models.py: config from ../shared/docs/formats.md, random bf16 weights, built once
into --models-root) and each mode it runs `qwenquant run RECIPE --model M --out OUT --device cpu --json
[--offload-dir DIR]` in a child process under benchmarks/memtrace.py: the child's exact peak RSS (ru_maxrss) and the
sampled peak within each phase (load, eval_source, quantize, eval_quantized, export, verify, report).

Quick settings (what is measured is memory, not accuracy): calibration --num-samples x --seq-len, perplexity off,
next-token KL on --kl-tokens tokens in one --eval-window window, verification off unless --verify. The KL
statistics take 5 float32 [kl_tokens, vocab] tensors in the `report` phase (0.78 GiB at 256 x 151936), the same in
both modes; the phases before it show what --offload-dir changes. The two modes' checkpoints are compared byte for
byte (sha256 of every written safetensors file): --offload-dir must not change the output.

Models are built in a child process: a child started with vfork/exec inherits its parent's peak RSS as the floor of
its own ru_maxrss, so building a model in this process would show up as every later run's "peak" (the JSON records
this process's own peak, `bench_process_peak_gib`, which bounds that floor).

The exporter holds one pending shard in memory (up to `export.max_shard_size_mb`, 4096 by default, set with
--max-shard-mb): for a model whose output fits one shard that is the whole output, in both modes.

Columns: weights = all parameters in bf16 (tied embeddings once); resident = what --offload-dir keeps in memory
(embeddings, final norm); layer = one decoder layer in bf16.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from harness import RESULTS_DIR, _log, environment_meta, markdown_table, print_table  # noqa: E402
from memtrace import trace_cli  # noqa: E402
from random_models import config_for, spec_dirname  # noqa: E402

SCHEMES = {
    "fp8": [{"fp8": {"weights": "channel", "activations": "dynamic"}}],
    "rtn": [{"rtn": {"bits": 4, "group_size": 128}}],
    "gptq": [{"gptq": {"bits": 4, "group_size": 128}}],
}
MODES = ("in-memory", "offload")
PHASES = ("load", "eval_source", "quantize", "eval_quantized", "export", "verify", "report")
GIB = 2**30

COLUMNS = (
    ("model", "model", "s"),
    ("mode", "mode", "s"),
    ("weights_gib", "weights GiB", ".2f"),
    ("resident_gib", "resident GiB", ".2f"),
    ("layer_gib", "layer GiB", ".3f"),
    ("peak_gib", "peak GiB", ".2f"),
    ("pre_report_peak_gib", "peak before report GiB", ".2f"),
    ("load_gib", "load", ".2f"),
    ("eval_source_gib", "eval src", ".2f"),
    ("quantize_gib", "quantize", ".2f"),
    ("eval_quantized_gib", "eval q", ".2f"),
    ("export_gib", "export", ".2f"),
    ("report_gib", "report", ".2f"),
    ("mean_kl", "mean KL", ".3e"),
    ("same_output", "same output", "s"),
    ("wall_s", "wall s", ".0f"),
)


def sizes(spec: str) -> dict:
    """bf16 bytes of the whole model, its resident part and one decoder layer, from the config."""
    c = config_for(spec)
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd, q, kv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    layer = h * q * hd + 2 * h * kv * hd + q * hd * h + 3 * h * i + 2 * h + 2 * hd
    resident = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2) + h
    return {"weights_gib": 2 * (n * layer + resident) / GIB, "resident_gib": 2 * resident / GIB,
            "layer_gib": 2 * layer / GIB, "params_b": (n * layer + resident) / 1e9}


def recipe_for(args) -> dict:
    recipe = {
        "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len},
        "stages": SCHEMES[args.scheme],
        "eval": {"perplexity": False, "window": args.eval_window, "kl_tokens": args.kl_tokens, "verify": args.verify},
    }
    if args.max_shard_mb:
        recipe["export"] = {"max_shard_size_mb": args.max_shard_mb}
    return recipe


def build_model(spec: str, root: str) -> Path:
    """benchmarks/random_models.py in a child process (see the module doc: keeps this process's peak RSS small)."""
    subprocess.run([sys.executable, str(BENCH / "random_models.py"), spec, "--root", root], check=True,
                   cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL)
    return Path(root) / spec_dirname(spec)


def bench_process_peak() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def output_hashes(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
        out[f.name] = h.hexdigest()
    return out


def run_one(spec: str, mode: str, path: Path, args, recipe_path: Path) -> dict:
    """One traced run; returns its row (the output folder is kept until both modes are compared)."""
    row: dict = {"model": spec, "mode": mode, "scheme": args.scheme} | sizes(spec)
    slug = re.sub(r"[^\w.]+", "-", spec)
    out = Path(args.work) / "out" / f"{slug}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["run", str(recipe_path), "--model", str(path), "--out", str(out), "--device", "cpu", "--json"]
    if mode == "offload":
        argv += ["--offload-dir", str(Path(args.work) / "offload")]
    row["argv"] = argv
    row["load_avg"] = os.getloadavg()[0]
    trace = trace_cli(argv, timeout_s=args.timeout, threads=args.threads)
    row["trace"] = trace.to_dict()
    row["wall_s"] = trace.wall_s
    if trace.returncode != 0:
        row["error"] = f"run exited {trace.returncode}: {trace.stderr_tail[-600:]}"
        return row
    report = json.loads((out / "qwenquant_report.json").read_text())
    row["mean_kl"] = report["evaluation"]["kl_vs_source"]["mean_kl"]
    row["report_peak_host_gib"] = report["memory"]["peak_host_bytes"] / GIB
    row["timings_s"] = report.get("timings_s")
    row["output_gib"] = report["sizes"]["output_bytes"] / GIB
    row["hashes"] = output_hashes(out)
    row["peak_gib"] = trace.peak_rss_bytes / GIB
    for phase in PHASES:
        if phase in trace.phase_peaks:
            row[f"{phase}_gib"] = trace.phase_peaks[phase] / GIB
    pre = [row[f"{p}_gib"] for p in PHASES if p != "report" and f"{p}_gib" in row]
    row["pre_report_peak_gib"] = max(pre) if pre else None
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    return row


def summary_md(rows: list[dict]) -> str:
    lines = ["## Summary", ""]
    by = {(r["model"], r["mode"]): r for r in rows if "error" not in r}
    for model in dict.fromkeys(r["model"] for r in rows):
        a, b = by.get((model, "in-memory")), by.get((model, "offload"))
        if not (a and b):
            continue
        lines.append(
            f"- {model} ({a['weights_gib']:.2f} GiB of bf16 weights, one layer {a['layer_gib'] * 1024:.0f} MiB): "
            f"peak RSS {a['peak_gib']:.2f} GiB in memory vs {b['peak_gib']:.2f} GiB with --offload-dir; before the "
            f"report phase (whose KL statistics are the same in both) {a['pre_report_peak_gib']:.2f} vs "
            f"{b['pre_report_peak_gib']:.2f} GiB; quantize phase {a.get('quantize_gib', float('nan')):.2f} vs "
            f"{b.get('quantize_gib', float('nan')):.2f} GiB. Checkpoints "
            + ("byte-identical" if a["hashes"] == b["hashes"] else "DIFFER") + f"; mean KL {a['mean_kl']:.3e} vs "
            f"{b['mean_kl']:.3e}.")
    for mode in MODES:
        done = [r for r in rows if r["mode"] == mode and "error" not in r]
        for x, y in zip(done, done[1:]):
            dw = y["weights_gib"] - x["weights_gib"]
            if not dw:
                continue
            slope = {k: (y[k] - x[k]) / dw for k in ("pre_report_peak_gib", "quantize_gib") if x.get(k) and y.get(k)}
            lines.append(f"- {mode}, {x['model']} -> {y['model']} (+{dw:.2f} GiB of weights): the peak before the "
                         f"report phase grows {slope.get('pre_report_peak_gib', float('nan')):.2f} GiB per GiB of "
                         f"weights, the quantize phase's {slope.get('quantize_gib', float('nan')):.2f} "
                         "(1.0: the whole model is held; 0: independent of the model size)")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines.append("- failed: " + "; ".join(f"{r['model']} {r['mode']}: {r['error'][:300]}" for r in failed))
    return "\n".join(lines)


def write(name: str, rows: list[dict], meta: dict) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    print_table(rows, COLUMNS, title="peak host memory with and without --offload-dir")
    full = environment_meta() | meta
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps({"meta": full, "rows": rows}, indent=1, default=str) + "\n")
    md = [
        f"# {name}: peak host memory with and without --offload-dir",
        "",
        f"- date (UTC): {full['date_utc']}; machine: {full['machine']['platform']}, {full['machine']['cpu_count']} CPUs "
        f"(shared; load average per row in the JSON); torch {full['torch']}, qwenquant @ {full['qwenquant_git_commit']}"
        + (" (uncommitted changes in qwenquant/)" if full.get("qwenquant_tree_dirty") else ""),
        f"- command: `{full['command']}`",
        f"- recipe: {json.dumps(meta['recipe'])}",
        "- models: shape-true random Qwen3 (benchmarks/random_models.py; vocabulary 151936, tied embeddings); peak = "
        "the child's ru_maxrss; phase peaks sampled every 20 ms (benchmarks/memtrace.py); GiB = 2^30 bytes.",
        "",
        summary_md(rows),
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
    ap.add_argument("--models", default="0.6b", help="comma-separated random_models specs, smallest first")
    ap.add_argument("--scheme", default="fp8", choices=sorted(SCHEMES))
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-window", type=int, default=256)
    ap.add_argument("--kl-tokens", type=int, default=256)
    ap.add_argument("--verify", action="store_true", help="also verify (in memory: a transformers reload)")
    ap.add_argument("--max-shard-mb", type=int, default=None, help="export.max_shard_size_mb (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the child (default: torch's)")
    ap.add_argument("--models-root", default="/tmp/qq-models", help="built models are cached here")
    ap.add_argument("--work", default="/tmp/qq-offload-memory")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--name", default="offload_memory")
    ap.add_argument("--plan", action="store_true")
    args = ap.parse_args()
    specs = [s.strip() for s in args.models.split(",") if s.strip()]
    recipe = recipe_for(args)
    if args.plan:
        for s in specs:
            z = sizes(s)
            print(f"{s}: {z['params_b']:.3f}B parameters, {z['weights_gib']:.2f} GiB bf16 (resident "
                  f"{z['resident_gib']:.2f}, one layer {z['layer_gib']:.3f}); modes {', '.join(MODES)}; recipe {recipe}")
        return 0
    from qwenquant.recipe import recipe_from_dict  # validates the recipe before anything runs

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe_path = work / f"recipe-{args.scheme}.yaml"
    recipe_path.write_text(recipe_from_dict(recipe).to_yaml())
    rows = []
    for spec in specs:
        path = build_model(spec, args.models_root)
        for mode in MODES:
            _log(f"{spec} {mode}")
            row = run_one(spec, mode, path, args, recipe_path)
            rows.append(row)
            _log(f"  {spec} {mode}: " + (row.get("error") or f"peak {row['peak_gib']:.2f} GiB "
                                                            f"({row['wall_s']:.0f}s)"))
    by = {(r["model"], r["mode"]): r for r in rows if "error" not in r}
    for r in rows:
        pair = [by.get((r["model"], m)) for m in MODES]
        if all(pair):
            r["same_output"] = "yes" if pair[0]["hashes"] == pair[1]["hashes"] else "NO"
    write(args.name, rows, {"models": specs, "scheme": args.scheme, "recipe": recipe,
                            "bench_process_peak_gib": bench_process_peak()})
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
