#!/usr/bin/env python
"""Speed and memory of bf16 vs FP8 dynamic, FP8 static and W4A16 on shape-true Qwen3-4B and Qwen3-8B (issue 5).

    python benchmarks/gpu_bench.py --tiny                  # CPU smoke test of the whole flow (tiny shapes)
    python benchmarks/gpu_bench.py --quick                 # GPU: batch 1, context 1024 (the decode targets)
    python benchmarks/gpu_bench.py                         # GPU: batch 1,8 x context 1024,8192

For each model: build a Qwen3 with the real config (../shared/docs/formats.md: hidden, layers, heads, kv heads,
intermediate, max positions, tied embeddings; head_dim 128, vocab 151936; built by benchmarks/random_models.py) and
RANDOM WEIGHTS (hub weights are not reachable: speed and memory depend on shapes only, accuracy does not
transfer), save it in bf16, quantize it with
the qwenquant CLI (`fp8`, `fp8 --activations static`, `rtn` W4A16 g128), run `qwenquant.bench` on each folder and
print a table against bf16: batch-1 decode tokens/s, speedup, the memory-bandwidth bound and the fraction of it
reached, prefill tokens/s, weight memory and the kernels used. Targets (issue 5): FP8 >= 1.6x and W4A16 >= 2.5x
bf16 decode tokens/s at batch 1.

Results: benchmarks/results/gpu_bench_<device>_<date>.{json,md} (device name, torch version, date) on a GPU only.
CPU and --tiny runs write to --out-dir (default: a temporary folder) and never into benchmarks/results: their
numbers say nothing about a GPU. Each model's folders live in --work-dir and are deleted after its bench unless
--keep (Qwen3-8B: ~16 GB bf16 + ~9 GB per FP8 variant + ~6 GB W4A16).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from qwenquant.bench.output import write_bench  # noqa: E402
from qwenquant.bench.runner import BenchSettings, run_bench  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MODELS = {"qwen3-4b": "4b", "qwen3-8b": "8b"}  # -> benchmarks/random_models.py presets (formats.md shapes)
TINY = (":layers=2,hidden_size=128,intermediate_size=384,num_attention_heads=4,num_key_value_heads=2,head_dim=32,"
        "vocab=8192,max_position_embeddings=512")  # --tiny: the same flow on a model that runs in seconds
# variant -> qwenquant CLI arguments (None: the bf16 source itself)
VARIANTS = {
    "bf16": None,
    "fp8-dynamic": ["fp8"],
    "fp8-static": ["fp8", "--activations", "static", "--num-samples", "16", "--seq-len", "256"],
    "w4a16": ["rtn", "--bits", "4", "--group-size", "128"],
}
DATA_FREE = {"fp8-dynamic", "w4a16"}  # streamed from the source files, no calibration
TARGETS = {"fp8-dynamic": 1.6, "fp8-static": 1.6, "w4a16": 2.5}  # batch-1 decode speedup over bf16


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def calibration_texts() -> list[str]:
    lines = (REPO / "qwenquant" / "data" / "calibration" / "en.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def make_tokenizer(folder: Path, source: Path | None) -> None:
    """Copy a tokenizer (qwen3-mini's by default), or train a small byte-level BPE on the shipped calibration text
    when none is available (the GPU machine may lack ../shared). Token ids stay far below the vocab size."""
    files = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    if source is not None and (source / "tokenizer.json").is_file():
        for f in files:
            if (source / f).is_file():
                shutil.copy(source / f, folder / f)
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(calibration_texts(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(folder)


def build_source(name: str, root: Path, tiny: bool, tokenizer: Path | None, fill_device: str) -> Path:
    """Random-weight bf16 Qwen3 with the model's real shapes (benchmarks/random_models.py, reused when built),
    with a tokenizer."""
    from random_models import MINI, build_random_qwen3

    spec = MODELS[name] + (TINY if tiny else "")
    t = time.time()
    folder = build_random_qwen3(spec, root, tokenizer_src=tokenizer or MINI, fill_device=fill_device)
    if not (folder / "tokenizer.json").is_file():
        make_tokenizer(folder, None)
    (folder / "RANDOM_WEIGHTS.txt").write_text(f"{name} ({spec}): shape-true config, random weights (seed 0, "
                                               f"filled on {fill_device})\n")
    log(f"{name}: random-weight source {folder} ready in {time.time() - t:.0f}s")
    return folder


def quantize(source: Path, variant: str, folder: Path, device: str, eval_text: Path) -> Path:
    """Run the qwenquant CLI for `variant` (reused when its report exists)."""
    from qwenquant.cli import main

    if (folder / "qwenquant_report.json").is_file():
        log(f"{variant}: reusing {folder}")
        return folder
    args = [*VARIANTS[variant], "--model", str(source), "--out", str(folder), "--device", device, "--no-ppl",
            "--no-verify", "--eval-text", str(eval_text), "--eval-window", "256", "--eval-windows", "1", "--quiet",
            "--overwrite"]
    if VARIANTS[variant][0] != "rtn":
        args += ["--calib", "builtin"]
    if variant in DATA_FREE:
        args += ["--kl-tokens", "0"]  # with --no-ppl --no-verify: no evaluation pass (this script measures speed)
    t = time.time()
    code = main(args)
    if code != 0:
        raise SystemExit(f"qwenquant {' '.join(args)} exited {code}")
    log(f"{variant}: quantized in {time.time() - t:.0f}s")
    return folder


def row_for(model: str, variant: str, result: dict) -> dict:
    """Batch-1 (first context) figures of one variant, plus every point for the JSON."""
    ok = [p for p in result["points"] if p["status"] == "ok"]
    b1 = next((p for p in ok if p["batch"] == 1), None) or {}
    kernels = sorted({label for labels in result["kernels"].values() for label in labels})
    return {"model": model, "variant": variant, "weights_gib": result["weights"]["tensor_bytes"] / 2**30,
            "context": b1.get("context"), "decode_tokens_per_s": b1.get("decode_tokens_per_s"),
            "bound_tokens_per_s": b1.get("bound_tokens_per_s"), "fraction_of_bound": b1.get("fraction_of_bound"),
            "prefill_tokens_per_s": b1.get("prefill_tokens_per_s"), "itl_ms_p50": b1.get("itl_ms_p50"),
            "kernels": kernels, "points": result["points"], "bandwidth_bytes_per_s": result["bandwidth"]["bytes_per_s"]}


def failed_row(model: str, variant: str, error: Exception) -> dict:
    """A variant whose quantization or bench raised: recorded with the error, measured as nothing."""
    keys = ("weights_gib", "context", "decode_tokens_per_s", "bound_tokens_per_s", "fraction_of_bound",
            "prefill_tokens_per_s", "itl_ms_p50", "bandwidth_bytes_per_s")
    return {"model": model, "variant": variant, **dict.fromkeys(keys), "kernels": [], "points": [],
            "error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}


def add_speedups(rows: list[dict], on_gpu: bool) -> None:
    """Speedup vs the same model's bf16 row; targets are judged on GPU runs only."""
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["variant"] == "bf16"), None)
        ok = base and base["decode_tokens_per_s"] and r["decode_tokens_per_s"]
        r["speedup_vs_bf16"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"] if ok else None
        target = TARGETS.get(r["variant"])
        r["target"] = target
        judged = on_gpu and target is not None and r["speedup_vs_bf16"] is not None
        r["meets_target"] = r["speedup_vs_bf16"] >= target if judged else None


def _f(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def render(rows: list[dict], meta: dict) -> str:
    dev = meta["device"]
    ok = [r for r in rows if not r.get("error")]
    where = f"{dev['type']} {dev['name']}" + (f" (SM {dev['capability']}, CUDA {dev['cuda']})" if dev.get("capability") else "")
    lines = [f"# GPU bench: Qwen3 shapes with random weights ({dev['name']})", "", f"{meta['note']}", "",
             f"- device: {where}; torch {meta['torch']}; {meta['date']}; settings {meta['settings']}",
             f"- measured copy bandwidth: {ok[0]['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s" if ok else "", "",
             "| model | variant | weights GiB | ctx | decode tok/s (batch 1) | speedup vs bf16 | target | bound tok/s | "
             "% of bound | ITL ms p50 | prefill tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = {True: "PASS", False: "FAIL", None: "not judged (not a GPU run)"}[r["meets_target"]]
        target = "" if r["target"] is None else f">= {r['target']}x: {verdict}"
        frac = None if r["fraction_of_bound"] is None else 100 * r["fraction_of_bound"]
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} |  |  |  |  |  |  |  |  |")
            continue
        lines.append(f"| {r['model']} | {r['variant']} | {r['weights_gib']:.2f} | {r['context']} | "
                     f"{_f(r['decode_tokens_per_s'], '.1f')} | {_f(r['speedup_vs_bf16'], '.2f')} | {target} | "
                     f"{_f(r['bound_tokens_per_s'], '.1f')} | {_f(frac, '.0f')} | {_f(r['itl_ms_p50'], '.2f')} | "
                     f"{_f(r['prefill_tokens_per_s'], '.0f')} |")
    lines += ["", "Kernels per variant:"] + [f"- {r['model']} {r['variant']}: {'; '.join(r['kernels'])}" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], meta: dict, on_gpu: bool, out_dir: Path, started: str) -> str:
    """Speed-ups, then <name>.json and .md in out_dir (after every variant, so a run cut short keeps what it
    measured). Returns the file stem."""
    add_speedups(rows, on_gpu)
    slug = "".join(ch if ch.isalnum() else "-" for ch in meta["device"]["name"]).strip("-").lower()
    name = f"gpu_bench_{slug}_{started[:10]}" if on_gpu else "gpu_bench_smoke"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(render(rows, meta))
    return name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-4b,qwen3-8b", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--context", default="1024,8192")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--kv-cache", default="bf16", choices=["bf16", "fp8"])
    ap.add_argument("--no-compile", action="store_true", help="decode eager (no CUDA graphs)")
    ap.add_argument("--quick", action="store_true", help="batch 1, context 1024 only")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on any device (a smoke test; no results file)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokenizer", type=Path, default=REPO.parent / "shared" / "models" / "qwen3-mini")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwenquant-gpu-bench")
    ap.add_argument("--out-dir", type=Path, default=None, help="where results go (GPU default: benchmarks/results)")
    ap.add_argument("--keep", action="store_true", help="keep the model folders in --work-dir")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    on_gpu = device.type == "cuda" and not args.tiny
    out_dir = args.out_dir or (RESULTS if on_gpu else Path(tempfile.mkdtemp(prefix="gpu_bench_smoke_")))
    if not on_gpu and out_dir.resolve() == RESULTS.resolve():
        raise SystemExit("CPU / --tiny runs do not write into benchmarks/results (their numbers are not GPU numbers)")
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    bad = [m for m in models if m not in MODELS] + [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown model/variant {bad}; models: {list(MODELS)}, variants: {list(VARIANTS)}")
    settings = BenchSettings(batch_sizes=[1] if args.quick else [int(b) for b in args.batch_sizes.split(",")],
                             contexts=[16 if args.tiny else 1024] if args.quick or args.tiny else
                             [int(c) for c in args.context.split(",")],
                             decode_tokens=4 if args.tiny else args.decode_tokens, kv_cache=args.kv_cache,
                             compile=not args.no_compile)
    eval_text = args.work_dir / "eval.txt"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    eval_text.write_text("\n\n".join(calibration_texts()[:40]) + "\n", encoding="utf-8")
    tokenizer = args.tokenizer if args.tokenizer.is_dir() else None
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    from qwenquant.bench.document import CPU_NOTE, device_info

    note = ("Random weights: shape-true Qwen3 configs (../shared/docs/formats.md) with random bf16 weights; speed and "
            "memory depend on shapes, accuracy does not transfer.")
    if not on_gpu:
        note += " " + CPU_NOTE + (" Tiny shapes (--tiny)." if args.tiny else "")
    meta = {"date": started, "device": device_info(device), "torch": torch.__version__, "note": note,
            "settings": {"batch_sizes": settings.batch_sizes, "contexts": settings.contexts,
                         "decode_tokens": settings.decode_tokens, "kv_cache": settings.kv_cache,
                         "compile": settings.compile}, "models": models, "variants": variants, "random_weights": True}
    rows = []
    for model in models:
        work = args.work_dir / model
        source = build_source(model, work, args.tiny, tokenizer, device.type)
        for variant in variants:
            t = time.time()
            try:
                folder = source if variant == "bf16" else quantize(source, variant, work / variant, device.type,
                                                                   eval_text)
                result = run_bench(folder, settings, device, command=f"benchmarks/gpu_bench.py {model} {variant}")
            except Exception as e:  # noqa: BLE001 -- a benchmark records a failed variant and measures the others
                log(f"{model} {variant}: FAILED\n{traceback.format_exc()}")
                rows.append(failed_row(model, variant, e))
                write_results(rows, meta, on_gpu, out_dir, started)
                continue
            result.pop("_generated", None)
            result["model"]["random_weights"] = True
            write_bench(result, out_dir / "gpu_bench_runs" / model / variant)
            rows.append(row_for(model, variant, result))
            write_results(rows, meta, on_gpu, out_dir, started)
            r = rows[-1]
            log(f"{model} {variant}: decode {_f(r['decode_tokens_per_s'], '.1f')} tok/s at batch 1 "
                f"(bound {_f(r['bound_tokens_per_s'], '.1f')}), bench {time.time() - t:.0f}s")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    name = write_results(rows, meta, on_gpu, out_dir, started)
    print(render(rows, meta))
    log(f"wrote {out_dir / name}.json and .md")
    return 0

if __name__ == "__main__":
    sys.exit(main())
