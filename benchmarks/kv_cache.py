#!/usr/bin/env python
"""The accuracy cost of an FP8 KV cache on qwen3-mini (issue 15 part A): FP8 dynamic W8A8 and W4A16 GPTQ weights,
each with a bf16 cache, an FP8 cache with calibrated scales (per tensor, per KV head) and an FP8 cache with
uncalibrated scales (each forward's own absmax per layer: what `qwenquant bench` did before calibrated scales),
plus the bf16 source with each FP8 cache (the cache's cost alone). Seeds 0 and 1 (the calibration samples).

    python benchmarks/kv_cache.py [--model ../shared/models/qwen3-mini] [--seeds 0,1] [--name kv_cache]

Per (scheme, seed) one `qwenquant <scheme> --kv-cache fp8 --kv-cache-strategy head --seed S` writes the weights and
the per-head scales (default calibration: builtin 128 x 512). Per-tensor scales are the max of the per-head ones:
rounding to bf16 is monotonic, so max_h bf16(a_h / 448) = bf16(max_h a_h / 448), bit for bit what
`--kv-cache-strategy tensor` writes (checked once, on FP8 seed 0, with a second run). Evaluation here, in process:
the checkpoint reloaded with transformers, float32 on the CPU, FP8 dynamic activations simulated per token as the
report does, the FP8 cache simulated by qwenquant/kv_simulation.py (every K/V the attention reads goes through the
cache: the decode-time model, an upper bound for engines whose prefill attends over bf16 K/V); perplexity on the
first 4 WikiText-2 test windows of 2048 tokens, mean next-token KL(source || variant) on the first 4096 tokens.
Writes benchmarks/results/<name>.json and prints a table (the .md write-up is benchmarks/results/long_context.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SCHEMES = {"FP8 dynamic W8A8": ["fp8"], "W4A16 GPTQ g128": ["gptq"]}
CACHES = ("bf16 cache", "FP8 cache, calibrated per tensor", "FP8 cache, calibrated per head",
          "FP8 cache, uncalibrated (per-forward absmax)")


def quantize(model: str, cmd: list[str], seed: int, strategy: str, out: Path) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qwenquant", *cmd, "--model", model, "--seed", str(seed), "--kv-cache",
                    "fp8", "--kv-cache-strategy", strategy, "--no-ppl", "--kl-tokens", "128", "--no-verify",
                    "--out", str(out), "--quiet"], check=True, cwd=REPO)
    return time.perf_counter() - t


def evaluate(model, windows, kl_windows, source_logp, scales, names, act_specs):
    from qwenquant.activations import activation_quantization
    from qwenquant.eval.perplexity import evaluate_windows, kl_stats
    from qwenquant.eval.precision import evaluation_precision
    from qwenquant.kv_simulation import kv_cache_quantization

    cpu = torch.device("cpu")
    kv = kv_cache_quantization(model, scales, names) if scales != "bf16" else kv_cache_quantization(model, {})
    with activation_quantization(model, act_specs), kv, evaluation_precision(model, cpu):
        ppl, logp = evaluate_windows(model, windows, kl_windows, cpu)
    return {"ppl": ppl.perplexity, "kl": kl_stats(source_logp, logp) if source_logp is not None
            else None, "logp": logp}


def cache_variants(head: dict) -> dict:
    """cache name -> scales (None: uncalibrated, "bf16": no FP8 cache) from the per-head checkpoint's scales."""
    tensor = {n: (k.amax().reshape(1), v.amax().reshape(1)) for n, (k, v) in head.items()}
    return dict(zip(CACHES, ("bf16", tensor, head, None)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "qwen3-mini"))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--name", default="kv_cache")
    p.add_argument("--work", default=None, help="keep the checkpoints here (reused when present) instead of a temp dir")
    p.add_argument("--resume", action="store_true", help="keep the rows of results/<name>.json, run the missing ones")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sys.path.insert(0, str(REPO))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenquant.eval.perplexity import eval_windows, load_eval_text
    from qwenquant.eval.verify import read_kv_scales
    from qwenquant.kv_simulation import attention_names
    from qwenquant.state import ActivationSpec

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    text, text_desc = load_eval_text("wikitext2")
    windows = eval_windows(tok, text, 2048, 4)
    kl_windows = windows[:2]
    source = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    names = attention_names(source, "model.layers", "self_attn")
    ref = evaluate(source, windows, kl_windows, None, "bf16", names, {})
    source_logp = ref.pop("logp")
    out_json = BENCH / "results" / f"{args.name}.json"
    old = json.loads(out_json.read_text()) if args.resume and out_json.exists() else {}
    rows: list[dict] = old.get("rows", [])
    done = {(r["scheme"], r["cache"], r["seed"]) for r in rows}
    result = {"model": args.model, "seeds": seeds, "eval": {"text": text_desc, "ppl_windows": 4, "window": 2048,
              "kl_tokens": int(kl_windows.numel())}, "source_ppl": ref["ppl"], "rows": rows}
    if "per_tensor_derivation_exact" in old:
        result["per_tensor_derivation_exact"] = old["per_tensor_derivation_exact"]
    with tempfile.TemporaryDirectory(dir=REPO.parent) as scratch:
        tmp = args.work or scratch
        for seed in seeds:
            for scheme, cmd in {"bf16 source": None, **SCHEMES}.items():
                if all((scheme, c, seed) in done for c in CACHES[cmd is None:]):
                    continue
                head_dir = Path(tmp) / f"{cmd[0] if cmd else 'fp8'}-s{seed}"
                if not head_dir.exists():
                    secs = quantize(args.model, cmd or ["fp8"], seed, "head", head_dir)
                    print(f"quantized {head_dir.name} in {secs:.0f} s", flush=True)
                if cmd == ["fp8"] and seed == seeds[0] and "per_tensor_derivation_exact" not in result:
                    # the per-tensor derivation, checked against a real run
                    tensor_dir = Path(tmp) / f"fp8-tensor-s{seed}"
                    if not tensor_dir.exists():
                        quantize(args.model, cmd, seed, "tensor", tensor_dir)
                    derived = cache_variants(read_kv_scales(head_dir))[CACHES[1]]
                    written = read_kv_scales(tensor_dir)
                    result["per_tensor_derivation_exact"] = all(
                        torch.equal(derived[n][i], written[n][i]) for n in written for i in (0, 1))
                model = source if cmd is None else AutoModelForCausalLM.from_pretrained(head_dir, dtype=torch.bfloat16).eval()
                acts = {f"{n}.{lin}": ActivationSpec("token") for n in names for lin in
                        ("q_proj", "k_proj", "v_proj", "o_proj")} if cmd == ["fp8"] else {}
                if cmd == ["fp8"]:
                    acts |= {f"model.layers.{i}.mlp.{lin}": ActivationSpec("token") for i in range(len(names))
                             for lin in ("gate_proj", "up_proj", "down_proj")}
                for cache, scales in cache_variants(read_kv_scales(head_dir)).items():
                    if (cmd is None and cache == CACHES[0]) or (scheme, cache, seed) in done:
                        continue  # the source itself, or a row a previous run measured
                    r = evaluate(model, windows, kl_windows, source_logp, scales, names, acts)
                    rows.append({"scheme": scheme, "cache": cache, "seed": seed, "ppl": r["ppl"],
                                 "mean_kl": r["kl"]["mean_kl"], "top1_agreement": r["kl"]["top1_agreement"]})
                    print(f"{scheme:18s} | {cache:45s} | seed {seed} | ppl {r['ppl']:.4f} | KL {r['kl']['mean_kl']:.3e}",
                          flush=True)
                    out_json.write_text(json.dumps(result, indent=2) + "\n")  # partial results after each row
                if cmd is not None:
                    del model
    result["summary"] = summarize(rows)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(table(result)))


def table(result: dict) -> list[str]:
    """Markdown: per (scheme, cache) the mean KL and perplexity over the seeds with their spread (max - min)."""
    lines = [f"Source perplexity {result['source_ppl']:.4f}.", "",
             "| weights | KV cache | mean KL (nats) | KL spread | perplexity | ppl spread | seeds |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in result["summary"]:
        lines.append(f"| {r['scheme']} | {r['cache']} | {r['kl_mean']:.3e} | {r['kl_spread']:.1e} | "
                     f"{r['ppl_mean']:.3f} | {r['ppl_spread']:.3f} | {', '.join(map(str, r['seeds']))} |")
    return lines


def summarize(rows: list[dict]) -> list[dict]:
    """Per (scheme, cache): KL and perplexity per seed, their mean and spread (max - min over seeds)."""
    out = []
    for key in dict.fromkeys((r["scheme"], r["cache"]) for r in rows):
        rs = [r for r in rows if (r["scheme"], r["cache"]) == key]
        kls, ppls = [r["mean_kl"] for r in rs], [r["ppl"] for r in rs]
        out.append({"scheme": key[0], "cache": key[1], "seeds": [r["seed"] for r in rs], "kl": kls, "ppl": ppls,
                    "kl_mean": statistics.fmean(kls), "kl_spread": max(kls) - min(kls),
                    "ppl_mean": statistics.fmean(ppls), "ppl_spread": max(ppls) - min(ppls)})
    return out


if __name__ == "__main__":
    main()
