#!/usr/bin/env python
"""Accuracy at length (issue 15, part B): source vs FP8 vs W4A16 GPTQ on qwen3-mini, bf16 vs FP8 KV cache.

    python benchmarks/long_context.py [--model ../shared/models/qwen3-mini] [--seeds 0,1] [--docs 2] [--trials 2]
                                      [--lengths 512,1024,2048,4096] [--yarn-factor 2] [--yarn-docs 1]
                                      [--yarn-trials T]
                                      [--work DIR] [--name long_context] [--only-yarn | --no-yarn]
    python benchmarks/long_context.py --render      # rewrite the sections of results/long_context.md

Quantized folders come from the CLI as users run it (`qwenquant fp8 --kv-cache fp8`, `qwenquant gptq --seed S
--kv-cache fp8`, default builtin calibration 128 x 512, per-tensor K/V scales; evaluation and verification off:
this script measures). FP8 dynamic weights are data-free (only its K/V scales use the calibration set), so it runs
once; GPTQ once per seed (the spread is the noise). `--work DIR` keeps the folders and reuses them.

Each model is measured in this process with `qwenquant.eval.long_context` (float32 on the CPU): perplexity on
`--docs` WikiText-2 test documents of 4096 tokens at every window of `--lengths` (same tokens, less context), the
longest window's NLL by position, mean next-token KL(source with a bf16 cache || model with the cache) over the same
4096-token windows, and passkey retrieval (10/50/90% depth x `--trials` keys per length, 10 candidates), each with
three KV caches: bf16; FP8 with each window's prefill absmax / 448 per layer; FP8 with the checkpoint's calibrated
k_scale / v_scale (the source has none: it takes the FP8 dynamic checkpoint's). The YaRN setting copies the source
config with rope_parameters yarn (factor `--yarn-factor`, original 4096, max positions 4096 x factor; weights
symlinked), quantizes it with GPTQ seed 0 and measures source and GPTQ at windows 4096 and 8192, bf16 cache.
Writes results/<name>.json and results/<name>_yarn.json (`.partial.json` until each is done), the load average
before and after every model. `--render` writes the "Accuracy at length" and "Chat calibration" sections of
results/long_context.md from the JSON files (long_context_render.py), leaving the other sections as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from qwenquant.eval.long_context import (LongContextSettings, checkpoint_kv_scales, long_documents,  # noqa: E402
                                         measure_long_context)
from qwenquant.eval.perplexity import kl_stats, load_eval_text, next_token_logprobs  # noqa: E402
from qwenquant.eval.precision import evaluation_precision  # noqa: E402
from qwenquant.kernels.kv_cache import make_static_cache  # noqa: E402

THREADS = 2


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def quantize(cmd: list[str], model: Path, out: Path) -> dict:
    """Run the CLI into `out` (reused with its recorded time when it already holds a finished folder)."""
    record = out.with_name(out.name + ".quantize.json")
    args = [sys.executable, "-m", "qwenquant", *cmd, "--model", str(model), "--out", str(out), "--quiet",
            "--no-ppl", "--no-verify", "--device", "cpu", "--kv-cache", "fp8"]
    if (out / "config.json").exists() and record.exists():
        return json.loads(record.read_text()) | {"reused": True}
    t, before = time.time(), load()
    subprocess.run(args, check=True, cwd=REPO)
    info = {"command": ["qwenquant", *args[3:]], "seconds": time.time() - t, "loadavg_before": before,
            "loadavg_after": load()}
    record.write_text(json.dumps(info))
    return info


def yarn_copy(src: Path, dst: Path, factor: float) -> Path:
    if (dst / "config.json").exists():
        return dst
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    orig = cfg["max_position_embeddings"]
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
                              "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    cfg["max_position_embeddings"] = int(orig * factor)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


@torch.no_grad()
def cache_logprobs(model, docs: torch.Tensor, kv: str, scales: dict) -> torch.Tensor:
    """[docs, tokens, vocab] fp16 log-probabilities with the given KV cache (bf16: the plain forward)."""
    if kv == "bf16":
        return next_token_logprobs(model, docs, torch.device("cpu"))
    out = []
    for row in docs:
        cache = make_static_cache(model.config, row.numel(), "fp8", scales or None)
        logits = model(input_ids=row[None], cache=cache, use_cache=True).logits[0]
        out.append(F.log_softmax(logits.float(), dim=-1).to(torch.float16))
    return torch.stack(out)


def measure(path: Path, text: str, s: LongContextSettings, ref: torch.Tensor | None, scales: dict,
            scales_from: str | None):
    """(result, bf16 log-probs): `measure_long_context` with caches bf16 and fp8 (prefill absmax), then fp8 with
    `scales` as "fp8_calibrated" (when given); KL per cache against `ref` (None: this is the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(path)
    dev, t, before = torch.device("cpu"), time.time(), load()
    log = lambda m: print("  " + m, flush=True)  # noqa: E731
    with evaluation_precision(model, dev):
        result = measure_long_context(model, tok, text, dataclasses.replace(s, kv_scales={}), dev, log)
        if scales and "fp8" in s.kv_caches:
            cal = measure_long_context(model, tok, text, dataclasses.replace(s, kv_caches=("fp8",), kv_scales=scales),
                                       dev, log)
            result["by_kv_cache"]["fp8_calibrated"] = cal["by_kv_cache"]["fp8"]
        result["kv_scales"] = {"fp8": "prefill absmax / 448 per layer",
                               "fp8_calibrated": scales_from if scales else None}
        docs = long_documents(tok, text, max(s.lengths), s.docs)
        logps = {kv: cache_logprobs(model, docs, kv, scales if kv == "fp8_calibrated" else {})
                 for kv in result["by_kv_cache"]}
    ref = logps["bf16"] if ref is None else ref
    result["kl_by_kv_cache"] = {kv: kl_stats(ref, lp) for kv, lp in logps.items()}
    result |= {"seconds": time.time() - t, "loadavg_before": before, "loadavg_after": load()}
    return result, logps["bf16"]


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip()


def new_report(a, src: Path, seeds: list[int]) -> dict:
    return {"model": str(src), "seeds": seeds, "docs": a.docs, "trials": a.trials, "torch_threads": THREADS,
            "machine": {"cpus": os.cpu_count(), "note": "shared CPU, loaded by other jobs (timings indicative only)",
                        "loadavg_start": load()},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
            "settings": {}, "rows": {}, "quantize": {}}


def settings_dict(s: LongContextSettings) -> dict:
    return {k: v for k, v in dataclasses.asdict(s).items() if k != "kv_scales"} | {"lengths": list(s.lengths)}


def run_rows(report: dict, setting: str, models: dict, s: LongContextSettings, text: str, partial: Path) -> None:
    """Measure every (name -> (path, scales, scales_from)) into report["rows"][setting]; the first is the
    reference of the KL."""
    report["settings"][setting] = settings_dict(s)
    rows = report["rows"].setdefault(setting, {})
    ref = None
    for name, (path, scales, scales_from) in models.items():
        print(f"{name}: measuring (load {load()})", flush=True)
        r, logp = measure(path, text, s, ref, scales, scales_from)
        ref = logp if ref is None else ref
        rows[name] = r
        print(f"{name}: {r['seconds']:.0f} s", flush=True)
        partial.write_text(json.dumps(report, indent=1))


def finish(report: dict, out: Path, partial: Path) -> None:
    report["machine"]["loadavg_end"] = load()
    out.write_text(json.dumps(report, indent=1))
    partial.unlink(missing_ok=True)


def native(a, src: Path, seeds: list[int], work: Path, text: str) -> None:
    out = BENCH / "results" / f"{a.name}.json"
    partial = out.with_suffix(".partial.json")
    report = new_report(a, src, seeds)
    report["quantize"]["FP8 dynamic"] = quantize(["fp8"], src, work / "fp8")
    paths = {"FP8 dynamic": work / "fp8"}
    for s in seeds:
        report["quantize"][f"W4A16 GPTQ s{s}"] = quantize(["gptq", "--seed", str(s)], src, work / f"gptq{s}")
        paths[f"W4A16 GPTQ s{s}"] = work / f"gptq{s}"
    fp8_scales = checkpoint_kv_scales(work / "fp8")
    models = {"source": (src, fp8_scales, "calibrated: the FP8 dynamic checkpoint's k_scale/v_scale")}
    models |= {n: (p, checkpoint_kv_scales(p), "calibrated: this checkpoint's k_scale/v_scale (per tensor)")
               for n, p in paths.items()}
    s = LongContextSettings(lengths=tuple(int(x) for x in a.lengths.split(",")), docs=a.docs, trials=a.trials,
                            kv_caches=("bf16", "fp8"))
    run_rows(report, "native", models, s, text, partial)
    finish(report, out, partial)


def yarn(a, src: Path, seeds: list[int], work: Path, text: str) -> None:
    out = BENCH / "results" / f"{a.name}_yarn.json"
    partial = out.with_suffix(".partial.json")
    trials = a.trials if a.yarn_trials is None else a.yarn_trials
    report = new_report(a, src, seeds) | {"docs": a.yarn_docs, "trials": trials, "yarn_factor": a.yarn_factor}
    y = yarn_copy(src, work / f"yarn{a.yarn_factor:g}-src", a.yarn_factor)
    report["quantize"]["W4A16 GPTQ s0 (YaRN source)"] = quantize(["gptq", "--seed", "0"], y,
                                                                 work / f"yarn{a.yarn_factor:g}-gptq0")
    top = int(4096 * a.yarn_factor)
    s = LongContextSettings(lengths=(top // 2, top), docs=a.yarn_docs, trials=trials, kv_caches=("bf16",))
    models = {"source + YaRN": (y, {}, None), "W4A16 GPTQ s0 + YaRN": (work / f"yarn{a.yarn_factor:g}-gptq0", {}, None)}
    run_rows(report, "yarn", models, s, text, partial)
    report["settings"]["yarn"]["factor"] = a.yarn_factor
    finish(report, out, partial)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/qwen3-mini"))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--yarn-factor", type=float, default=2.0)
    ap.add_argument("--yarn-docs", type=int, default=1)
    ap.add_argument("--yarn-trials", type=int, default=None, help="passkey keys per length of the YaRN setting "
                    "(default: --trials)")
    ap.add_argument("--no-yarn", action="store_true")
    ap.add_argument("--only-yarn", action="store_true", help="skip the native setting")
    ap.add_argument("--work", default=None, help="keep the quantized folders here (reused when present)")
    ap.add_argument("--name", default="long_context")
    ap.add_argument("--render", action="store_true", help="only rewrite results/long_context.md's sections")
    a = ap.parse_args()
    if a.render:
        from long_context_render import render_file

        render_file(BENCH / "results")
        return
    torch.set_num_threads(THREADS)
    src = Path(a.model)
    text, _ = load_eval_text("wikitext2")
    seeds = [int(s) for s in a.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not a.only_yarn:
            native(a, src, seeds, work, text)
        if not a.no_yarn:
            yarn(a, src, seeds, work, text)


if __name__ == "__main__":
    main()
