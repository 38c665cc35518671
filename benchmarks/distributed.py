#!/usr/bin/env python
"""1 vs 2 gloo ranks (torch.distributed on the CPU, one torch thread per rank) through the CLI (issue 16).

    python benchmarks/distributed.py [--seeds 0,1] [--random 0.6b:layers=4] [--name distributed]

Each row is `qwenquant <command> ... --nproc N --json` in its own process (OMP_NUM_THREADS=1 for every rank, the
single process included), on qwen3-mini (the trained fixture) and on a shape-true random Qwen3 (benchmarks/
random_models.py; its accuracy means nothing, its shapes make calibration forwards and GPTQ solves dominate). Per
seed (the calibration sampling seed, so the seeds are also the repeats): the quantize phase's wall time (rank 0's
`timings.quantize`: the part the ranks share; the source and quantized evaluation, export and verification run on
rank 0 alone), the whole command's wall time, peak host memory per rank, the mean KL vs the source, and whether
the 2-rank checkpoint equals the 1-rank one tensor for tensor. Evaluation is kept small (--no-ppl, 1024 KL tokens)
so the quantize phase dominates. Recipes that do not run distributed yet are run once to record their refusal.
Writes benchmarks/results/<name>.{json,md}. No NCCL numbers: there is no GPU on this machine.
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

import torch
from safetensors.torch import load_file

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from random_models import build_random_qwen3  # noqa: E402

MINI = REPO.parent / "shared" / "models" / "qwen3-mini"
SCHEMES = {
    "gptq": ("GPTQ W4A16 g128", ["gptq"]),
    "fp8": ("FP8 static + smoothing", ["fp8", "--activations", "static", "--smooth", "--weights", "tensor"]),
    "awq": ("AWQ W4A16 g128", ["awq"]),
    "comp": ("GPTQ W4A16 g128 + compensation", ["gptq", "--compensate"]),
    # decoder layers on disk, one in memory per rank (its own work dir under the folder): per-rank memory
    "gptq-offload": ("GPTQ W4A16 g128, --offload-dir", ["gptq", "--offload-dir", "/tmp/qq-dist-offload"]),
}
REFUSED = {  # not distributed yet: run once each to record the one-line refusal
    "GPTQ + --keep-sensitive 2": ["gptq", "--keep-sensitive", "2"],
}
EVAL = ["--no-ppl", "--kl-tokens", "1024", "--device", "cpu"]


NOTES = """- Quantize s: rank 0's `timings_s.quantize`, the phase the ranks share (calibration forwards over each rank's
  share, GPTQ solves split by rows, AWQ's alpha grid and clip rows split, the collectives). Command s: the whole
  command, which also holds what rank 0 does alone (load, source and quantized evaluation, export, verification)
  and, at 2 ranks, a second process importing torch and loading the model beside it.
- The machine: 2 CPU cores (AMD EPYC, one thread per core, one shared L3), nothing else of ours running (the load
  average column is the ranks themselves); it is a shared host, so identical runs still differ by 10-20%: each
  seed runs 1 and then 2 ranks back to back, and the table gives the median and range over the seeds.
- What does not divide at 2 ranks: GPTQ's factorizations and its column loop's per-column steps (the ranks split
  the rows, and at qwen3-mini's widths a column costs about the same for 768 rows as for 1536), the time ranks wait
  for each other at the collectives, and two single-threaded processes sharing one L3 and memory bus (each rank's
  calibration forwards run 10-20% slower than the single process's).
- Compensation at N ranks takes the same number of steps, each on N minibatches (one per rank, gradients
  averaged, as DDP), so its per-rank work per step is the single process's: only the forwards over the samples
  (targets, errors before and after) are split.
- Peak host memory: every rank loads the whole model (only the calibration activations are split), so per-rank
  memory does not fall with N and one machine needs N times it; with --offload-dir (its row) each rank holds the
  resident tensors and the decoder layer in use. The per-rank peak is the process's peak so far (ru_maxrss):
  rank 0's includes its source evaluation, which runs before the layer loop; rank 1's is the quantize phase's.
- Checkpoint vs 1 rank: with whole-batch shards (128 samples = 16 batches of 8) FP8 static + smoothing (maxima),
  AWQ (the same sampled rows; the grid and rows the ranks split are the single process's) and GPTQ (float64 Hessian
  sums of the same float32 batch products, rounded once) give the single process's bits, each rank running one
  torch thread as the single process does. Compensation steps on gradients averaged over 2 minibatches, so its
  checkpoint differs: compare the KL columns (seed to seed spread beside the rank difference).
- Not measured: NCCL (no GPU on this machine), more than 2 ranks (2 cores), several machines.
"""


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(flags: list[str], model: Path, nproc: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "qwenquant", *flags, "--model", str(model), "--out", str(out), "--overwrite",
           "--json", "--nproc", str(nproc), *EVAL, *extra]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        errors = [l for l in p.stderr.splitlines() if l.startswith("qwenquant: error:")]
        return {"ok": False, "exit": p.returncode, "error": errors[0] if errors else p.stderr[-400:], "wall_s": wall}
    r = json.loads((out / "qwenquant_report.json").read_text())
    ranks = r.get("ranks")
    return {"ok": True, "wall_s": wall, "quantize_s": r["timings_s"]["quantize"],
            "mean_kl": r["evaluation"]["kl_vs_source"]["mean_kl"],
            "peak_host_rank0_gib": r["memory"]["peak_host_bytes"] / 2**30,
            "peak_host_per_rank_quantize_gib": [b / 2**30 for b in ranks["peak_host_bytes_per_rank"]] if ranks else None,
            "samples_per_rank": ranks["samples_per_rank"] if ranks else None}


def same_tensors(a: Path, b: Path) -> dict:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    return {"tensors": len(ta), "differ": len(differ), "identical": not differ}


def med(xs: list[float], digits: int = 1) -> str:
    """Median (min-max) of the seeds."""
    return f"{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})" if xs else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--random", default="0.6b:layers=2")
    ap.add_argument("--random-calib", default="32x512", help="num-samples x seq-len on the random model")
    ap.add_argument("--models", default="mini,random")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help=f"of {', '.join(SCHEMES)}")
    ap.add_argument("--name", default="distributed")
    ap.add_argument("--merge", default="", help="comma-separated result names whose rows join this document")
    ap.add_argument("--render-only", action="store_true", help="measure nothing: merge and rewrite the results")
    args = ap.parse_args()
    if args.render_only:
        args.models, args.schemes = "", ""
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="qq-dist-"))
    n, length = args.random_calib.split("x")
    models = {}
    if "mini" in args.models:
        models["qwen3-mini (128 x 512 calibration)"] = (MINI, [])
    if "random" in args.models:
        models[f"random {args.random} (shape-true, {n} x {length})"] = (
            build_random_qwen3(args.random, "/tmp/qq-models"), ["--num-samples", n, "--seq-len", length])
    results = BENCH / "results"
    previous = json.loads((results / f"{args.name}.json").read_text()) if (results / f"{args.name}.json").exists() \
        else {"rows": [], "refused": {}}  # rows of earlier invocations are kept unless measured again
    rows, refusals = [], dict(previous["refused"])
    for model_name, (model, extra) in models.items():
        for key in filter(None, args.schemes.split(",")):
            scheme, flags = SCHEMES[key]
            per = {1: [], 2: []}
            for seed in seeds:
                outs = {}
                for nproc in (1, 2):
                    outs[nproc] = work / f"{len(rows)}-{seed}-{nproc}"
                    _log(f"{model_name} / {scheme} / seed {seed} / {nproc} rank(s)")
                    res = run(flags, model, nproc, outs[nproc], [*extra, "--seed", str(seed)])
                    per[nproc].append(res)
                    _log(f"  -> {res}")
                if per[1][-1]["ok"] and per[2][-1]["ok"]:
                    per[2][-1]["vs_1_rank"] = same_tensors(outs[1], outs[2])
            rows.append({"model": model_name, "scheme": scheme, "seeds": seeds, "runs": per,
                         "load_average_after": os.getloadavg()[0]})
            (results / f"{args.name}.partial.json").write_text(json.dumps(rows, indent=1))
    for scheme, flags in REFUSED.items() if not args.render_only else ():
        res = run(flags, MINI, 2, work / f"refused-{scheme[:4]}", [])
        refusals[scheme] = res
        _log(f"{scheme}: {res}")
    measured = {(r["model"], r["scheme"]) for r in rows}
    rows = [r for r in previous["rows"] if (r["model"], r["scheme"]) not in measured] + rows
    for other in filter(None, args.merge.split(",")):  # rows measured by a concurrent invocation
        doc_other = json.loads((results / f"{other}.json").read_text())  # a document, or a .partial list of rows
        other_rows = doc_other if isinstance(doc_other, list) else doc_other["rows"]
        refusals |= {} if isinstance(doc_other, list) else doc_other.get("refused", {})
        rows = [r for r in rows if (r["model"], r["scheme"]) not in {(o["model"], o["scheme"]) for o in other_rows}]
        rows += other_rows
    doc = {"machine": f"{os.cpu_count()} cores on a shared host (load average 1/5/15 min at the end: "
                      f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())})",
           "torch": torch.__version__, "backend": "gloo (CPU); no NCCL numbers: no GPU here", "seeds": seeds,
           "rows": rows, "refused": refusals}
    (results / f"{args.name}.json").write_text(json.dumps(doc, indent=1))
    (results / f"{args.name}.partial.json").unlink(missing_ok=True)
    text = table(doc)
    (results / f"{args.name}.md").write_text(f"# 1 vs 2 gloo ranks (`benchmarks/distributed.py`)\n\n{doc['machine']}; "
                                             f"torch {doc['torch']}; {doc['backend']}; each row: median "
                                             "(min-max) over its seeds (the calibration sampling seeds, also the "
                                             "repeats).\n\n" + text + "\n\n" + NOTES)
    print(text)


def table(doc: dict) -> str:
    lines = ["| model | scheme | seeds | quantize s, 1 rank | quantize s, 2 ranks | speed-up (quantize) | command s, 1 / 2 "
             "ranks | peak host GiB per rank while quantizing (2 ranks) | rank 0 peak GiB 1 / 2 | mean KL 1 / 2 "
             "ranks (per seed) | 2-rank checkpoint vs 1-rank | load average after |", "|" + "---|" * 12]
    for row in doc["rows"]:
        runs = {int(k): v for k, v in row["runs"].items()}  # int keys in memory, strings once written as JSON
        one, two = runs[1], runs[2]
        ok = [(a, b) for a, b in zip(one, two) if a["ok"] and b["ok"]]
        if not ok:
            lines.append(f"| {row['model']} | {row['scheme']} | failed: {one[0].get('error') or two[0].get('error')} |")
            continue
        q1, q2 = [a["quantize_s"] for a, _ in ok], [b["quantize_s"] for _, b in ok]
        speed = [a / b for a, b in zip(q1, q2)]
        w1, w2 = [a["wall_s"] for a, _ in ok], [b["wall_s"] for _, b in ok]
        peaks = "; ".join("/".join(f"{g:.2f}" for g in b["peak_host_per_rank_quantize_gib"]) for _, b in ok)
        p0 = f"{statistics.median(a['peak_host_rank0_gib'] for a, _ in ok):.2f} / " \
             f"{statistics.median(b['peak_host_rank0_gib'] for _, b in ok):.2f}"
        kl = "; ".join(f"{a['mean_kl']:.3e} / {b['mean_kl']:.3e}" for a, b in ok)
        eq = "; ".join("identical" if b["vs_1_rank"]["identical"] else
                       f"{b['vs_1_rank']['differ']}/{b['vs_1_rank']['tensors']} tensors differ" for _, b in ok)
        lines.append(f"| {row['model']} | {row['scheme']} | {','.join(map(str, row['seeds']))} | {med(q1)} | {med(q2)} "
                     f"| {med(speed, 2)} | {med(w1)} / {med(w2)} | {peaks} | {p0} | {kl} | {eq} "
                     f"| {row.get('load_average_after', float('nan')):.1f} |")
    for scheme, res in doc["refused"].items():
        lines.append(f"| qwen3-mini | {scheme} | refused at 2 ranks (exit {res.get('exit')}): {res.get('error')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
