"""What evaluation costs on the CPU, before and after issue 18 (lm-eval speed) and issue 12 (float32 evaluation),
measured side by side in one process on qwen3-mini.

1. lm-eval log-likelihood requests per second, the same tasks, documents and bf16 model for every variant:
   - before: `run_tasks` as it was at --before-ref (git; default fc650f9, the last version before this change),
     loaded from git history and run as is: lm-eval's HFLM, 8 requests per forward, computing in bf16;
   - float32 only: the same old `run_tasks` inside `evaluation_precision` (float32 forwards), to separate the
     effect of the dtype from that of the batching;
   - after: `qwenquant.eval.tasks.run_tasks` now: `BatchedLM` (identical inputs once, batches of up to
     DEFAULT_BATCH_SIZE requests / MAX_BATCH_TOKENS padded tokens, logits only where continuations are) in float32.
   The variants alternate within each repeat (the order rotates), so a change of the machine's load hits all of
   them; the table gives the median and the min-max spread over the repeats, and whether the accuracies of every
   run equal the first "after" run's (bf16 rounding may flip a document: the before column lists what differs). Requests per second = log-likelihood requests / seconds spent in
   `loglikelihood` (lm-eval's task building is not counted; the end-to-end seconds are listed beside).
2. One 2048-token perplexity window, forward in bf16 vs float32 (`evaluation_precision`), repeated.
3. The README's first command (`qwenquant fp8 --model MODEL --out OUT`, default evaluation) in a child process:
   seconds of each phase from its report, and the evaluation setting the report states.

    python benchmarks/eval_speed.py                    # ~10-15 min on the shared 2-core box
    python benchmarks/eval_speed.py --quick            # smoke run: limit 5, 1 repeat, no README command
    python benchmarks/eval_speed.py --threads 1 --readme-repeats 0 --tag threads1   # one torch thread
    python benchmarks/eval_speed.py --from-json benchmarks/results/eval_speed.json   # re-render the .md only

Writes benchmarks/results/eval_speed.json and .md (--out-dir to change; --quick writes eval_speed_quick.*).
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
import types
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from harness import code_state, environment_meta  # noqa: E402
from qwenquant.eval import tasks as current  # noqa: E402
from qwenquant.eval.precision import evaluation_precision  # noqa: E402

BEFORE_REF = "fc650f9"
TASKS = "hellaswag,piqa,arc_easy,winogrande,ceval"
CPU = torch.device("cpu")


def old_tasks_module(ref: str) -> types.ModuleType:
    """qwenquant/eval/tasks.py as it was at `ref`, as a module (its data loaders resolve to the current ones, which
    read the same files)."""
    src = subprocess.run(["git", "show", f"{ref}:qwenquant/eval/tasks.py"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    module = types.ModuleType("qwenquant_eval_tasks_before")
    module.__file__ = str(REPO / "qwenquant" / "eval" / "tasks.py")  # its YAML folder is unchanged
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(src, f"git:{ref}:qwenquant/eval/tasks.py", "exec"), module.__dict__)
    return module


class LoglikelihoodClock:
    """Counts lm-eval log-likelihood requests and the seconds spent answering them (every LM class)."""

    def __init__(self):
        from lm_eval.api.model import TemplateLM

        self.cls, self.original = TemplateLM, TemplateLM.loglikelihood
        self.requests, self.seconds = 0, 0.0
        clock = self

        def timed(lm, requests, disable_tqdm: bool = False):
            t = time.perf_counter()
            try:
                return clock.original(lm, requests, disable_tqdm=disable_tqdm)
            finally:
                clock.seconds += time.perf_counter() - t
                clock.requests += len(requests)

        TemplateLM.loglikelihood = timed

    def reset(self) -> None:
        self.requests, self.seconds = 0, 0.0

    def close(self) -> None:
        self.cls.loglikelihood = self.original


def _variants(before: types.ModuleType):
    def run_before(model, tok, plan, limit):
        return before.run_tasks(model, tok, plan, limit, 8)

    def run_float32_only(model, tok, plan, limit):
        with evaluation_precision(model, CPU):
            return before.run_tasks(model, tok, plan, limit, 8)

    def run_after(model, tok, plan, limit):
        return current.run_tasks(model, tok, plan, limit)

    return {"before: HFLM, 8 per forward, bf16": run_before,
            "float32 only: HFLM, 8 per forward, float32": run_float32_only,
            f"after: BatchedLM (<= {current.DEFAULT_BATCH_SIZE} requests / {current.MAX_BATCH_TOKENS} tokens), "
            "float32": run_after}


def measure_tasks(model, tok, plan, limit: int, repeats: int, before: types.ModuleType) -> dict:
    variants = _variants(before)
    names = list(variants)
    runs = {n: [] for n in names}
    clock = LoglikelihoodClock()
    try:
        for rep in range(repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                clock.reset()
                t = time.perf_counter()
                acc = variants[name](model, tok, plan, limit)
                wall = time.perf_counter() - t
                runs[name].append({"repeat": rep, "requests": clock.requests, "loglikelihood_s": clock.seconds,
                                   "wall_s": wall, "requests_per_s": clock.requests / clock.seconds,
                                   "accuracy": {k: {"acc": v["acc"], "acc_norm": v["acc_norm"], "n": v["n"]}
                                                for k, v in acc.items()}})
                print(f"  repeat {rep}: {name}: {clock.requests} requests in {clock.seconds:.1f} s "
                      f"({clock.requests / clock.seconds:.1f}/s), wall {wall:.1f} s", flush=True)
    finally:
        clock.close()
    return runs


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def measure_window(model, window: int, repeats: int) -> dict:
    """Seconds of one forward over `window` tokens, bf16 vs float32, alternating."""
    ids = torch.randint(0, model.config.vocab_size, (1, window), generator=torch.Generator().manual_seed(0))
    out = {"bfloat16": [], "float32": []}
    with torch.no_grad():
        model(input_ids=ids[:, :64], use_cache=False)  # warm-up
        for _ in range(repeats):
            for name in out:
                with evaluation_precision(model, CPU) if name == "float32" else nullcontext():
                    t = time.perf_counter()
                    model(input_ids=ids, use_cache=False)
                    out[name].append(time.perf_counter() - t)
    return {name: _stats(v) for name, v in out.items()}


def measure_readme_command(model_dir: str, repeats: int) -> list[dict]:
    runs = []
    for rep in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "mini-fp8"
            cmd = [sys.executable, "-m", "qwenquant", "fp8", "--model", model_dir, "--out", str(out), "--quiet"]
            t = time.perf_counter()
            subprocess.run(cmd, cwd=REPO, check=True, env=os.environ | {"PYTHONPATH": str(REPO)})
            wall = time.perf_counter() - t
            report = json.loads((out / "qwenquant_report.json").read_text())
        ev = report["evaluation"]
        timings = {k: v for k, v in report["timings_s"].items() if isinstance(v, float)}
        eval_phases = [k for k in timings if k.startswith("eval") or k == "verify"]
        runs.append({"repeat": rep, "wall_s": wall, "timings_s": timings, "eval_phases": eval_phases,
                     "eval_s": sum(timings[k] for k in eval_phases), "path": report.get("path"),
                     "setting": {k: ev.get(k) for k in ("text", "window", "windows", "ppl_tokens", "text_windows",
                                                        "whole_text", "kl_tokens", "compute_dtype")}})
        print(f"  README command, repeat {rep}: wall {wall:.1f} s, evaluation ({' + '.join(eval_phases)}) "
              f"{runs[-1]['eval_s']:.1f} s", flush=True)
    return runs


def _differences(runs: list[dict], reference: dict) -> str:
    """'yes' when every run's accuracies equal `reference`, else the metrics that differ."""
    diffs = sorted({f"{task} {k} {r['accuracy'][task][k]} vs {v}" for r in runs for task, m in reference.items()
                    for k, v in m.items() if r["accuracy"][task][k] != v})
    return "yes" if not diffs else "no: " + "; ".join(diffs)


def render(result: dict) -> str:
    m, tasks = result["meta"], result["tasks"]
    before = next(iter(tasks.values()))
    lines = ["# Evaluation speed on the CPU (qwen3-mini)", "",
             f"{m['date']}, {m['machine']}, torch threads {m['torch_threads']}, load average before/after "
             f"{m['load_before']} / {m['load_after']}; qwenquant {m['code']['qwenquant_git_commit']} "
             f"(tree dirty: {m['code']['qwenquant_tree_dirty']}), before = `run_tasks` at {m['before_ref']}.", "",
             f"## lm-eval log-likelihood requests ({m['tasks']}, limit {m['limit']}, {m['repeats']} repeats, "
             "variants alternating)", "",
             "| variant | requests | requests/s median (min-max) | speed-up | loglikelihood s median | wall s median |"
             " accuracies = after's |", "|---|---|---|---|---|---|---|"]
    base = statistics.median(r["requests_per_s"] for r in before)
    reference = result["tasks"][list(tasks)[-1]][0]["accuracy"]
    for name, runs in tasks.items():
        rps = _stats([r["requests_per_s"] for r in runs])
        lines.append(f"| {name} | {runs[0]['requests']} | {rps['median']:.1f} ({rps['min']:.1f}-{rps['max']:.1f}) | "
                     f"x{rps['median'] / base:.2f} | {statistics.median(r['loglikelihood_s'] for r in runs):.1f} | "
                     f"{statistics.median(r['wall_s'] for r in runs):.1f} | {_differences(runs, reference)} |")
    lines += ["", "Accuracies (after): " + ", ".join(f"{k} {v['acc']:.2f}" for k, v in reference.items()), ""]
    w = result["window"]
    lines += [f"## One perplexity window ({m['window']} tokens), forward seconds ({m['window_repeats']} repeats)", "",
              "| compute dtype | median s (min-max) |", "|---|---|"]
    lines += [f"| {k} | {v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f}) |" for k, v in w.items()]
    if result.get("readme"):
        s = result["readme"][0]["setting"]
        lines += ["", "## README's first command: `qwenquant fp8 --model MODEL --out OUT` (default evaluation)", "",
                  f"Evaluation setting: {s['windows']} of {s['text_windows']} windows of {s['window']} tokens "
                  f"({s['ppl_tokens']} predicted tokens, whole text: {s['whole_text']}), KL on {s['kl_tokens']} "
                  f"tokens, computed in {s['compute_dtype']}; path: {result['readme'][0]['path']}.", "",
                  "| repeat | wall s | evaluation s | phases |", "|---|---|---|---|"]
        for r in result["readme"]:
            lines.append(f"| {r['repeat']} | {r['wall_s']:.1f} | {r['eval_s']:.1f} | "
                         + ", ".join(f"{k} {v:.1f}" for k, v in r["timings_s"].items()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "qwen3-mini"))
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--window-repeats", type=int, default=3)
    ap.add_argument("--readme-repeats", type=int, default=2, help="0: skip the README command")
    ap.add_argument("--before-ref", default=BEFORE_REF)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the result files (eval_speed_TAG.json)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--from-json", type=Path, help="only rewrite the .md beside this results JSON")
    args = ap.parse_args()
    if args.from_json:
        args.from_json.with_suffix(".md").write_text(render(json.loads(args.from_json.read_text())))
        return
    if args.quick:
        args.limit, args.repeats, args.window_repeats, args.readme_repeats = 5, 1, 1, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_before = os.getloadavg()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    plan = current.resolve_tasks(args.tasks)
    print(f"lm-eval tasks {args.tasks}, limit {args.limit}, {args.repeats} repeats", flush=True)
    tasks = measure_tasks(model, tok, plan, args.limit, args.repeats, old_tasks_module(args.before_ref))
    print(f"one {args.window}-token window, bf16 vs float32", flush=True)
    window = measure_window(model, args.window, args.window_repeats)
    readme = measure_readme_command(args.model, args.readme_repeats) if args.readme_repeats else []
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} CPUs", "model": args.model,
            "tasks": args.tasks, "limit": args.limit, "repeats": args.repeats, "window": args.window,
            "window_repeats": args.window_repeats, "before_ref": args.before_ref,
            "torch_threads": torch.get_num_threads(),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "code": code_state(), "environment": environment_meta()}
    result = {"meta": meta, "tasks": tasks, "window": window, "readme": readme}
    name = "_".join(["eval_speed"] + ["quick"] * args.quick + [args.tag] * bool(args.tag))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    md = render(result)
    (args.out_dir / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
