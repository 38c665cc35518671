#!/usr/bin/env python
"""GPTQ wall time, qwenquant vs llm-compressor `oneshot`, on the same calibration ids (issue 12, point 5).

    python benchmarks/gptq_speed.py                              # 3 alternating reps: results/gptq_speed.{json,md}
    python benchmarks/gptq_speed.py --before HEAD~1 --reps 4     # also time the qwenquant of a git revision
    python benchmarks/gptq_speed.py --reps 1 --name gptq_speed_smoke --num-samples 8 --seq-len 256
    python benchmarks/gptq_speed.py --reps 5 --kl-seeds 1,2 --profile   # + KL of both tools on seeds 1, 2; a profile

What is compared: GPTQ W4A16, group 128, symmetric, act-order static, dampening 0.01, block 128 (llm-compressor's
W4A16 preset; the settings of `int4_methods.py --timing-reps`), on qwen3-mini in bf16 on the CPU, one torch
thread for every tool, calibration = builtin 64 x 512 seed 0 (`qwenquant.calibration.load_calibration`; the one
[64, 512] id tensor is handed to llm-compressor through a .pt file and its sha256 is checked on both sides).

Timing: each tool runs in its own process (qwenquant: this script's `--worker` mode importing the qwenquant tree
to time, `--before` revisions extracted with `git archive`; llm-compressor: `llmcompressor_baseline.py` in its venv,
benchmarks/setup_llmcompressor.sh) and only the quantization call is timed: qwenquant's `run_sequential`
(calibration capture + GPTQ + propagation), llm-compressor's `oneshot()`; model loading and saving are not.
The tools alternate within each rep and the order rotates from rep to rep, so that each sees the same machine load
on this shared 2-core box; the table gives every rep, the median and the spread (max - min).

Quality: mean per-token KL(source || quantized) and top-1 agreement over the first --kl-windows windows of the
WikiText-2 test (`harness.Harness`, float32 log-probs), for qwenquant (the dequantized weights its worker wrote) and
for llm-compressor (its compressed-tensors folder loaded by transformers). qwenquant is deterministic: the sha256
of its records is checked equal across reps (and equal to `--before`'s when the change is bit-exact).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
GROUP, BITS = 128, 4


# -- worker: one qwenquant GPTQ run in a fresh process, importing the tree under test ----------------------------


def worker(args) -> int:
    sys.path.insert(0, str(Path(args.tree).resolve()))
    import torch

    import qwenquant
    from qwenquant.model.loader import load_model, resolve_model
    from qwenquant.pipeline import run_sequential
    from qwenquant.stages.gptq import GPTQStage
    from qwenquant.state import QuantState

    if not qwenquant.__file__.startswith(str(Path(args.tree).resolve())):
        raise SystemExit(f"imported {qwenquant.__file__}, not the tree {args.tree}")
    torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model)
    model, _ = load_model(resolved, "bfloat16")
    model.to("cpu")
    ids = torch.load(args.calib_ids)
    stages = [GPTQStage(bits=BITS, group_size=GROUP, symmetric=True, actorder="static", dampening_frac=0.01)]
    state = QuantState()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu, t = time.process_time(), time.perf_counter()
    run_sequential(model, resolved.adapter, ids, stages, torch.device("cpu"), state)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    if profiler is not None:
        profiler.disable()
        Path(args.profile).write_text(json.dumps(profile_rows(profiler, wall)))
    digest = hashlib.sha256()
    for name in sorted(state.records):
        r = state.records[name]
        for part in (r.q, r.scale, r.zero_point):
            if part is not None:
                digest.update(name.encode() + part.contiguous().view(torch.uint8).numpy().tobytes())
    if args.weights:  # the dequantized weights the quantized model computes with (for the KL)
        torch.save({n: model.get_submodule(n[: -len(".weight")]).weight.data.clone()
                    for n in (k + ".weight" for k in state.records)}, args.weights)
    Path(args.out).write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "records_sha256": digest.hexdigest(),
                                          "stage_s": state.stage_seconds, "qwenquant_file": qwenquant.__file__}))
    return 0


def profile_rows(profiler, wall: float, top: int = 14) -> dict:
    """Where a run's time went: qwenquant's functions by cumulative time, and the functions (torch ops included)
    by own time, each with its share of the run's wall time (cProfile's overhead included)."""
    import pstats

    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, ncalls, tottime, cumtime, callers)

    def row(key, value):
        file, line, name = key
        where = file.split("/qwenquant/")[-1] if "/qwenquant/" in file else Path(file).name if file != "~" else ""
        return {"function": f"{where}:{line} {name}" if where else name, "calls": value[1], "own_s": value[2],
                "cumulative_s": value[3], "cumulative_share": value[3] / wall}

    ours = sorted(((k, v) for k, v in stats.items() if "/qwenquant/" in k[0]), key=lambda kv: -kv[1][3])
    own = sorted(stats.items(), key=lambda kv: -kv[1][2])
    return {"wall_s": wall, "by_cumulative": [row(k, v) for k, v in ours[:top]],
            "by_own_time": [row(k, v) for k, v in own[:top]]}


# -- driver ----------------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_ours(tree: Path, model: str, calib_path: Path, threads: int, out: Path, weights: Path | None,
             profile: Path | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", str(tree), "--model", model,
           "--calib-ids", str(calib_path), "--threads", str(threads), "--out", str(out)]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tree), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"qwenquant worker ({tree}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def extract_revision(rev: str, work: Path) -> tuple[Path, str]:
    """`git archive` of qwenquant/ at `rev` into work/before-<sha>/ (the working tree is not touched)."""
    sha = subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    dest = work / f"before-{sha[:12]}"
    if not (dest / "qwenquant" / "__init__.py").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "qwenquant"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest, sha


def _stats(xs: list[float]) -> dict:
    return {"each": xs, "median": statistics.median(xs), "min": min(xs), "max": max(xs), "spread": max(xs) - min(xs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", default=str(REPO), help=argparse.SUPPRESS)
    p.add_argument("--calib-ids", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile", nargs="?", const="1", default=None, help="one more qwenquant run under cProfile, untimed: where the time "
                   "went, in the results (worker: the JSON file to write)")
    p.add_argument("--model", default="/work/shared/models/qwen3-mini")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--before", default=None, help="also time qwenquant at this git revision (e.g. HEAD)")
    p.add_argument("--no-llmc", action="store_true")
    p.add_argument("--kl-windows", type=int, default=8)
    p.add_argument("--kl-seeds", default="", help="more calibration seeds (e.g. 1,2,3) on which every qwenquant tree "
                   "is run once more for its KL only (the quality of a change that moves bits, beyond one seed)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/qwenquant-gptq-speed"))
    p.add_argument("--out-dir", type=Path, default=BENCH / "results")
    p.add_argument("--name", default="gptq_speed")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import torch

    sys.path.insert(0, str(BENCH))
    import harness as H
    from int4_methods import LLMC_PY, llmc_quantize
    from qwenquant.calibration import samples_hash

    torch.set_num_threads(args.threads)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if not args.no_llmc and not LLMC_PY.is_file():
        raise SystemExit(f"{LLMC_PY} missing: run benchmarks/setup_llmcompressor.sh (or pass --no-llmc)")
    h = H.Harness(args.model, ppl_windows=args.kl_windows, kl_windows=args.kl_windows, num_samples=args.num_samples,
                  seq_len=args.seq_len, threads=args.threads, source_cache=work / "source-cache")
    calib = h.calibration(0)
    calib_path = work / f"calib_n{args.num_samples}_l{args.seq_len}_s0.pt"
    torch.save(calib.clone(), calib_path)

    tools = {"qwenquant": REPO}
    before_sha = None
    if args.before:
        tree, before_sha = extract_revision(args.before, work)
        tools[f"qwenquant@{before_sha[:8]}"] = tree
    names = list(tools) + ([] if args.no_llmc else ["llm-compressor"])
    runs: list[dict] = []
    outputs: dict[str, Path] = {}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]  # each tool first in turn
        for tool in order:
            load = os.getloadavg()[0]
            if tool == "llm-compressor":
                res, mem, out_dir, _ = llmc_quantize(h.resolved.path, calib, 0, "gptq", BITS, args.threads, work,
                                                     f"-speed{rep}")
                r = {"wall_s": res["wall_s"], "cpu_s": mem["cpu_s_oneshot"], "calib_sha256": res["calib_sha256"],
                     "version": res["version"]}
                outputs.setdefault(tool, out_dir)
            else:
                weights = work / f"{tool.replace('@', '-')}-weights.pt" if tool not in outputs else None
                r = run_ours(tools[tool], args.model, calib_path, args.threads, work / f"{tool}-{rep}.json", weights)
                r["calib_sha256"] = samples_hash(calib)
                if weights is not None:
                    outputs[tool] = weights
            r |= {"tool": tool, "rep": rep, "position": order.index(tool), "loadavg_1min_before": load}
            _log(f"rep {rep} {tool}: wall {r['wall_s']:.1f}s cpu {r['cpu_s']:.1f}s (load {load:.1f})")
            runs.append(r)

    # quality: KL from the source, each tool's output evaluated the same way
    quality: dict[str, dict] = {}
    for tool, path in outputs.items():
        if tool == "llm-compressor":
            row = h.evaluate_external(tool, path, full_ppl=False)
        else:
            model = copy.deepcopy(h.source)
            for name, w in torch.load(path).items():
                model.get_parameter(name).data = w
            row = h._metrics(*h._evaluate(model, None, full_ppl=False))
            del model
        quality[tool] = {k: row[k] for k in ("mean_kl", "max_kl", "top1", "ppl_kl", "delta_ppl_kl_pct", "kl_tokens")}
        _log(f"{tool}: mean KL {row['mean_kl']:.6f} top-1 {row['top1']:.4f}")

    # more calibration seeds: KL of each qwenquant tree (not timed for the table)
    by_seed: dict[str, dict[str, float]] = {tool: {"0": quality[tool]["mean_kl"]} for tool in tools}
    if "llm-compressor" in quality:
        by_seed["llm-compressor"] = {"0": quality["llm-compressor"]["mean_kl"]}
    for seed in [int(x) for x in args.kl_seeds.split(",") if x.strip()]:
        ids_path = work / f"calib_n{args.num_samples}_l{args.seq_len}_s{seed}.pt"
        seed_ids = h.calibration(seed).clone()
        torch.save(seed_ids, ids_path)
        if "llm-compressor" in by_seed:
            _, _, seed_out, _ = llmc_quantize(h.resolved.path, seed_ids, seed, "gptq", BITS, args.threads, work,
                                              f"-kl-s{seed}")
            by_seed["llm-compressor"][str(seed)] = h.evaluate_external("llm-compressor", seed_out,
                                                                       full_ppl=False)["mean_kl"]
            _log(f"llm-compressor seed {seed}: mean KL {by_seed['llm-compressor'][str(seed)]:.6f}")
        for tool, tree in tools.items():
            weights = work / f"{tool.replace('@', '-')}-s{seed}-weights.pt"
            run_ours(tree, args.model, ids_path, args.threads, work / f"{tool}-s{seed}.json", weights)
            model = copy.deepcopy(h.source)
            for name, w in torch.load(weights).items():
                model.get_parameter(name).data = w
            by_seed[tool][str(seed)] = h._metrics(*h._evaluate(model, None, full_ppl=False))["mean_kl"]
            del model
            _log(f"{tool} seed {seed}: mean KL {by_seed[tool][str(seed)]:.6f}")

    profile = None
    if args.profile:
        prof_path = work / "qwenquant-profile.json"
        run_ours(REPO, args.model, calib_path, args.threads, work / "qwenquant-profiled.json", None, prof_path)
        profile = json.loads(prof_path.read_text())
        _log(f"profiled run: wall {profile['wall_s']:.1f}s under cProfile")

    summary: dict[str, dict] = {}
    for tool in names:
        rs = [r for r in runs if r["tool"] == tool]
        summary[tool] = {"wall_s": _stats([r["wall_s"] for r in rs]), "cpu_s": _stats([r["cpu_s"] for r in rs]),
                         **quality.get(tool, {})}
        shas = {r.get("records_sha256") for r in rs} - {None}
        if shas:
            summary[tool]["records_sha256"] = sorted(shas)
            summary[tool]["deterministic"] = len(shas) == 1
    ratios = {}
    if "llm-compressor" in summary:
        theirs = summary["llm-compressor"]
        for tool in tools:
            per_rep = [a["wall_s"] / b["wall_s"] for a, b in zip([r for r in runs if r["tool"] == tool],
                                                                 [r for r in runs if r["tool"] == "llm-compressor"])]
            ratios[tool] = {"wall_ratio_of_medians": summary[tool]["wall_s"]["median"] / theirs["wall_s"]["median"],
                            "wall_ratio_per_rep": per_rep,
                            "cpu_ratio_of_medians": summary[tool]["cpu_s"]["median"] / theirs["cpu_s"]["median"]}

    lines = [("| tool | wall s (each rep) | wall s median | spread | CPU s (each rep) | CPU s median | vs llm-compressor "
              "(wall, CPU; medians) | mean KL | top-1 |"), "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for tool in names:
        s = summary[tool]
        ratio = ratios.get(tool)
        lines.append(
            f"| {tool} | {', '.join(f'{x:.1f}' for x in s['wall_s']['each'])} | {s['wall_s']['median']:.1f} | "
            f"{s['wall_s']['spread']:.1f} | {', '.join(f'{x:.1f}' for x in s['cpu_s']['each'])} | "
            f"{s['cpu_s']['median']:.1f} | "
            + (f"{ratio['wall_ratio_of_medians']:.2f}x, {ratio['cpu_ratio_of_medians']:.2f}x" if ratio else "-")
            + f" | {s.get('mean_kl', float('nan')):.4e} | {s.get('top1', float('nan')):.4f} |")
    table = "\n".join(lines)
    profile_table = ""
    if profile:
        profile_table = "\n".join(
            [f"Where qwenquant's time went (one more run under cProfile, wall {profile['wall_s']:.1f} s with the "
             "profiler's overhead; cumulative time of qwenquant's functions, share of that wall):", "",
             "| function | calls | cumulative s | share |", "|---|---:|---:|---:|"]
            + [f"| `{r['function']}` | {r['calls']} | {r['cumulative_s']:.2f} | {100 * r['cumulative_share']:.0f}% |"
               for r in profile["by_cumulative"]]
            + ["", "Own time (torch ops included):", "", "| function | calls | own s | share |", "|---|---:|---:|---:|"]
            + [f"| `{r['function']}` | {r['calls']} | {r['own_s']:.2f} | {100 * r['own_s'] / profile['wall_s']:.0f}% |"
               for r in profile["by_own_time"]])
    seeds_table = ""
    if any(len(v) > 1 for v in by_seed.values()):
        seeds = list(next(iter(by_seed.values())))
        seeds_table = "\n".join(
            ["| tool | " + " | ".join(f"KL seed {s}" for s in seeds) + " | mean |", "|---|" + "---:|" * (len(seeds) + 1)]
            + [f"| {tool} | " + " | ".join(f"{v[s]:.4e}" for s in seeds) + f" | {statistics.mean(v.values()):.4e} |"
               for tool, v in by_seed.items()])
    print(table)
    if seeds_table:
        print(seeds_table)
    env = H.environment_meta()
    notes = []
    for tool in tools:
        if summary[tool].get("records_sha256"):
            notes.append(f"- {tool}: records sha256 {summary[tool]['records_sha256'][0][:16]}... in every rep: "
                         f"{summary[tool]['deterministic']}")
    if before_sha and len({summary[t]['records_sha256'][0] for t in tools}) == 1:
        notes.append(f"- qwenquant and qwenquant@{before_sha[:8]} wrote bit-identical records")
    meta = env | {"num_samples": args.num_samples, "seq_len": args.seq_len, "calib_sha256": samples_hash(calib),
                  "threads": args.threads, "reps": args.reps, "before": before_sha, "kl": h.meta()["kl_convention"],
                  "kl_tokens": int(h.kl_windows.numel()), "scheme": "w4 g128 sym, act-order static, damp 0.01"}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "ratios": ratios,
                                                       "kl_by_seed": by_seed, "runs": runs,
                                                       "profile": profile}, indent=1,
                                                      default=str) + "\n")
    (out / f"{args.name}.md").write_text("\n".join([
        f"# {args.name}", "",
        f"- date (UTC): {env['date_utc']}; {env['machine']['cpu_count']} CPUs, shared with other jobs; torch "
        f"{env['torch']}; one torch thread for every tool; qwenquant @ {env['qwenquant_git_commit']}"
        + (" + uncommitted changes" if env.get("qwenquant_tree_dirty") else ""),
        (f"- GPTQ W4A16 g{GROUP} sym, act-order static, dampening 0.01 on {args.model} (bf16, CPU); calibration "
         f"builtin {args.num_samples} x {args.seq_len}, seed 0: the same ids for every tool (sha256 "
         f"{samples_hash(calib)[:16]}...)"),
        f"- command: `{env['command']}`",
        ("- wall = qwenquant `run_sequential` / llm-compressor `oneshot()` (no load, no save), each tool in its own "
         "process, alternating, the first tool rotating per rep; CPU = process CPU seconds of that call; "
         "spread = max - min"),
        f"- quality: {h.meta()['kl_convention']} = {int(h.kl_windows.numel())} tokens", "",
        table, "", *notes, "",
        *(["KL from the source over more calibration seeds (same KL tokens; each tool quantized once more per seed, "
           "not timed):", "", seeds_table, ""] if seeds_table else []),
        *([profile_table, ""] if profile_table else [])]))
    _log(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
