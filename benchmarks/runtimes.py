"""GGUF files measured inside llama.cpp (issue 14's evidence), on qwen3-mini: for Q8_0 / Q4_0 / Q4_1 written from
RTN, GPTQ and AWQ codes (`qwenquant <method> --group-size 32 --format gguf`), and for the bf16 source written as a
BF16 GGUF, in the same runtime:

- file size;
- mean per-token KL(source in transformers, float32 || the file in llama.cpp) and top-1 agreement on the run's
  held-out windows (WikiText-2 test, the run's `--kl-tokens`), from each run's report (`verification.runtime`);
  beside it the same KL with the quantized weights in transformers (`evaluation.kl_vs_source`), so a runtime
  difference would show;
- greedy agreement of llama.cpp with the same weights in transformers and with the source model (chat prompts);
- decode tokens/s at batch 1 in llama.cpp beside the BF16 source file in the same runtime and the same repeats.
Then (unless --no-kquants) Q4_K_M / Q5_K_M / Q6_K from the CLI (`qwenquant export gguf MODEL --type ...`: llama.cpp's
own quantizer), with --no-imatrix and with our importance matrix for each of --seeds calibration seeds (mean x^2 per
input column of every decoder Linear, qwenquant/export/gguf_imatrix.py), so the imatrix's effect stands beside the
seed spread.

    python benchmarks/runtimes.py                 # ~15-25 min on the shared 2-core box
    python benchmarks/runtimes.py --quick         # RTN and Q4_K_M only, two repeats

Writes benchmarks/results/runtimes.json and .md (--name, --quick: runtimes_quick.*). The K-quant and decode run
of issue 14 (benchmarks/results/runtimes_kquant_decode.*):

    python benchmarks/runtimes.py --methods --speed-only-types Q8_0 Q4_0 --kquant-types Q4_K_M --repeats 5 \
        --name runtimes_kquant_decode
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

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from harness import code_state, environment_meta  # noqa: E402

MODEL = REPO.parent / "shared" / "models" / "qwen3-mini"
RESULTS = REPO / "benchmarks" / "results"
TYPES = {"Q8_0": ("--bits", "8", "--sym"), "Q4_0": ("--bits", "4", "--sym"), "Q4_1": ("--bits", "4", "--asym")}
METHODS = ("rtn", "gptq", "awq")
PROMPT = "Write a short paragraph about the history of the printing press and why it mattered."
DECODE_TOKENS = 64
KQUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K")
IMATRIX_SAMPLES = 64


def quantize(method: str, qtype: str, out: Path, kl_tokens: int) -> dict:
    from qwenquant.cli import main

    args = [method, "--model", str(MODEL), "--group-size", "32", *TYPES[qtype], "--format", "gguf", "--out", str(out),
            "--kl-tokens", str(kl_tokens), "--eval-windows", "1", "--quiet"]
    t = time.perf_counter()
    code = main(args)
    report = json.loads((out / "qwenquant_report.json").read_text())
    v = report["verification"]
    return {"variant": f"{method.upper()} {qtype}", "method": method, "type": qtype, "exit_code": code,
            "seconds": round(time.perf_counter() - t, 1), "file": str(out / "model.gguf"),
            "file_bytes": (out / "model.gguf").stat().st_size,
            "kl_llama_cpp": v["runtime"].get("vs_source"), "kl_transformers": report["evaluation"]["kl_vs_source"],
            "greedy_agreement": (v["runtime"].get("greedy") or {}).get("token_agreement"),
            "greedy_vs_source": (v["runtime"].get("greedy_vs_source") or {}).get("token_agreement"),
            "runtime": v["runtime"].get("version"), "passed": v["passed"]}


def source_gguf(folder: Path) -> Path:
    """The bf16 source as a BF16 GGUF (norms F32), written by the same writer with no records."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from qwenquant.export.gguf import write_gguf

    config = AutoConfig.from_pretrained(MODEL).to_dict()
    tensors = load_file(str(MODEL / "model.safetensors"))
    path = folder / "source-bf16.gguf"
    write_gguf(path, config, AutoTokenizer.from_pretrained(MODEL), tensors.items(), {}, name="qwen3-mini")
    return path


def source_row(path: Path, kl_tokens: int) -> dict:
    """KL / top-1 of the BF16 file in llama.cpp against the source in transformers (float32): the runtime's own
    numerical distance, the floor under every quantized row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenquant.eval.gguf_verify import llama_cpp_module, runtime_logprobs
    from qwenquant.eval.perplexity import eval_windows, kl_stats, load_eval_text, next_token_logprobs
    from qwenquant.eval.precision import evaluation_precision

    tok = AutoTokenizer.from_pretrained(MODEL)
    text, _ = load_eval_text("wikitext2")
    windows = eval_windows(tok, text, 2048, max(1, kl_tokens // 2048))
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16).eval()
    with torch.no_grad(), evaluation_precision(model, torch.device("cpu")):
        src = next_token_logprobs(model, windows, torch.device("cpu"))
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, logits_all=True, verbose=False)
    theirs = runtime_logprobs(llm, windows)
    llm.close()
    return {"variant": "source BF16", "method": "-", "type": "BF16", "file": str(path),
            "file_bytes": path.stat().st_size, "kl_llama_cpp": kl_stats(src, theirs), "kl_transformers": None,
            "greedy_agreement": None, "runtime": llama_cpp.__version__, "passed": None}


def speed_only(qtype: str, out: Path) -> dict:
    """An RTN block file for the decode timing alone (KL not measured in this run)."""
    from qwenquant.cli import main

    code = main(["export", "gguf", str(MODEL), "--out", str(out), "--type", qtype.lower(), "--no-verify", "--quiet"])
    return {"variant": f"RTN {qtype} (speed only)", "method": "rtn", "type": qtype, "exit_code": code,
            "file": str(out / "model.gguf"), "file_bytes": (out / "model.gguf").stat().st_size}


def kquant(qtype: str, out: Path, kl_tokens: int, seed: int | None) -> dict:
    """A K-quant through the CLI (`qwenquant export gguf MODEL --type ...`): llama.cpp's quantizer, with our
    importance matrix from calibration seed `seed` (None: --no-imatrix), verified in llama.cpp."""
    from qwenquant.cli import main

    imat = ["--no-imatrix"] if seed is None else ["--seed", str(seed), "--num-samples", str(IMATRIX_SAMPLES)]
    args = ["export", "gguf", str(MODEL), "--out", str(out), "--type", qtype.lower(), *imat, "--eval-window", "2048",
            "--kl-tokens", str(kl_tokens), "--device", "cpu", "--quiet"]
    t = time.perf_counter()
    code = main(args)
    report = json.loads((out / "qwenquant_report.json").read_text())
    v = report["verification"]
    label = "no imatrix" if seed is None else f"our imatrix, seed {seed}"
    return {"variant": f"llama.cpp {qtype} ({label})", "method": "llama.cpp", "type": qtype, "imatrix_seed": seed,
            "exit_code": code, "seconds": round(time.perf_counter() - t, 1), "file": str(out / "model.gguf"),
            "file_bytes": (out / "model.gguf").stat().st_size, "kl_llama_cpp": v["runtime"].get("vs_source"),
            "kl_transformers": v["gguf_reader_vs_source"],
            "greedy_agreement": (v["runtime"].get("greedy") or {}).get("token_agreement"),
            "greedy_vs_source": (v["runtime"].get("greedy_vs_source") or {}).get("token_agreement"),
            "runtime": v["runtime"].get("version"), "passed": v["passed"]}


def load_average() -> str:
    """The 1/5/15-minute load averages as `uptime` prints them (the machine's load during the timing)."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def open_for_decode(path: Path, threads: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, n_threads=threads, n_batch=512)


def decode_once(llm) -> tuple[float, float]:
    """(tokens/s wall clock, CPU seconds of this process per token) for DECODE_TOKENS greedy tokens at batch 1
    after the chat prompt (prefill not timed)."""
    llm.reset()
    ids = llm.tokenize(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n".encode(), special=True)
    llm.eval(ids)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(DECODE_TOKENS):
        llm.eval([llm.sample(temp=0.0, top_k=1)])
    return DECODE_TOKENS / (time.perf_counter() - t), (time.process_time() - c) / DECODE_TOKENS


def time_decode(rows: list[dict], repeats: int, threads: int) -> dict:
    """Every file loaded once; each repeat times every file in turn (the order rotating), so load changes hit all
    rows alike; per repeat each row's speed is also divided by the BF16 source's in the same repeat."""
    llms = [open_for_decode(Path(r["file"]), threads) for r in rows]
    before = load_average()
    for r in rows:
        r["decode_tok_s"], r["decode_cpu_ms_per_token"], r["decode_vs_bf16"] = [], [], []
    for rep in range(repeats):
        order = list(range(len(rows)))[rep % len(rows):] + list(range(len(rows)))[: rep % len(rows)]
        speeds = {}
        for i in order:
            tok_s, cpu = decode_once(llms[i])
            speeds[i] = tok_s
            rows[i]["decode_tok_s"].append(round(tok_s, 2))
            rows[i]["decode_cpu_ms_per_token"].append(round(1000 * cpu, 3))
        for i in order:
            rows[i]["decode_vs_bf16"].append(round(speeds[i] / speeds[0], 3))
    for llm in llms:
        llm.close()
    return {"load_before": before, "load_after": load_average()}


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# GGUF in llama.cpp (qwen3-mini)", "", meta["setup"], "",
             "| variant | file MiB | KL llama.cpp | top-1 llama.cpp | KL transformers (same weights) | greedy agree "
             "(same weights) | greedy agree (source) | decode tok/s median (min-max) | x BF16 median (min-max) | "
             "CPU ms/token median | verified |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        kl, klt = r.get("kl_llama_cpp") or {}, r.get("kl_transformers") or {}
        cells = [r["variant"], f"{r['file_bytes'] / 2**20:.2f}", f"{kl['mean_kl']:.3e}" if kl else "-",
                 f"{100 * kl['top1_agreement']:.2f}%" if kl else "-",
                 f"{klt['mean_kl']:.3e}" if klt else "-"]
        cells += [f"{100 * r[k]:.1f}%" if r.get(k) is not None else "-" for k in ("greedy_agreement", "greedy_vs_source")]
        cpu = r.get("decode_cpu_ms_per_token") or []
        cells += [_spread(r.get("decode_tok_s") or [], ".0f"), _spread(r.get("decode_vs_bf16") or [], ".2f"),
                  f"{statistics.median(cpu):.2f}" if cpu else "-",
                  str(r["passed"]) if r.get("passed") is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *meta["notes"], ""]
    return "\n".join(lines)


def imatrix_effect(rows: list[dict]) -> list[str]:
    """Per K-quant type: KL without the importance matrix, with it per calibration seed, the difference beside
    the seed spread."""
    out = []
    for qtype in KQUANTS:
        mine = [r for r in rows if r["type"] == qtype]
        plain = next((r["kl_llama_cpp"]["mean_kl"] for r in mine if r.get("imatrix_seed") is None), None)
        seeded = [r["kl_llama_cpp"]["mean_kl"] for r in mine if r.get("imatrix_seed") is not None]
        if plain is None or not seeded:
            continue
        mean = statistics.mean(seeded)
        out.append(f"{qtype}: KL without imatrix {plain:.4e}, with ours {', '.join(f'{k:.4e}' for k in seeded)} "
                   f"(seeds {', '.join(str(r['imatrix_seed']) for r in mine if r.get('imatrix_seed') is not None)}); "
                   f"mean change {100 * (mean - plain) / plain:+.1f}%, seed spread {100 * (max(seeded) - min(seeded)) / plain:.1f}% "
                   "of the no-imatrix KL.")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-kquants", action="store_true", help="skip the K-quants from llama.cpp's quantizer")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS, help="INT methods of the block rows")
    ap.add_argument("--speed-only-types", nargs="*", default=[], choices=list(TYPES),
                    help="block files written with `export gguf --no-verify` (RTN) for the decode timing only")
    ap.add_argument("--kquant-types", nargs="+", default=list(KQUANTS), choices=KQUANTS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="calibration seeds of the importance matrix")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (quality rows)")
    ap.add_argument("--decode-threads", type=int, default=1,
                    help="llama.cpp threads when timing decode (1: no thread barriers spinning on a loaded machine)")
    ap.add_argument("--kl-tokens", type=int, default=4096)
    ap.add_argument("--name", default="runtimes", help="results file name under benchmarks/results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = ("rtn",) if args.quick else tuple(args.methods)
    repeats = 2 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(prefix="runtimes-") as tmp:
        folder = Path(tmp)
        src = source_gguf(folder)
        rows = [source_row(src, args.kl_tokens)]
        for method in methods:
            for qtype in TYPES:
                print(f"[runtimes] {method} {qtype}", file=sys.stderr, flush=True)
                rows.append(quantize(method, qtype, folder / f"{method}-{qtype}", args.kl_tokens))
        for qtype in args.speed_only_types:
            rows.append(speed_only(qtype, folder / f"speed-{qtype}"))
        if not args.no_kquants:
            for qtype in (KQUANTS[:1] if args.quick else args.kquant_types):
                for seed in (None, *args.seeds):
                    print(f"[runtimes] {qtype} imatrix seed {seed}", file=sys.stderr, flush=True)
                    rows.append(kquant(qtype, folder / f"{qtype}-{seed}", args.kl_tokens, seed))
        print("[runtimes] decode timing", file=sys.stderr, flush=True)
        load = time_decode(rows, repeats, args.decode_threads)
    import llama_cpp

    meta = {"setup": (f"qwen3-mini (6 layers, hidden 256, vocab 8192, tied embeddings; 13.0 MiB bf16). KL: mean "
                      f"per-token KL(source in transformers float32 || file in llama.cpp) over {args.kl_tokens} "
                      "WikiText-2 test tokens (2048-token windows), top-1 = argmax agreement. Greedy agreement: "
                      "tokens before the first difference over all generated tokens, 3 chat prompts x 24 tokens, "
                      "against the same weights in transformers and against the source model. Decode: batch 1, "
                      f"{DECODE_TOKENS} greedy tokens after a chat prompt, {args.decode_threads} llama.cpp thread(s), every file loaded "
                      f"once and timed in turn in each of {repeats} repeats (order rotating); x BF16 = the row's "
                      "speed over the BF16 source file's in the same repeat; CPU ms/token = this process's CPU time "
                      f"(less sensitive to other jobs than wall time). llama-cpp-python {llama_cpp.__version__}, CPU."),
            "load": load,
            "notes": [f"Machine load (uptime) before the decode timing: `{load['load_before']}`; after: "
                      f"`{load['load_after']}`. 2 cores shared with other jobs: wall-clock speeds are medians over "
                      "repeats with min-max beside them; compare rows through the x BF16 column.",
                      "Every quantized Linear of the Q8_0/Q4_0/Q4_1 files carries the method's codes as they are "
                      "(qwenquant/export/gguf_blocks.py); embeddings stay BF16, norms F32. K-quant rows come from "
                      "`qwenquant export gguf MODEL --type q4_k_m|q5_k_m|q6_k` (llama.cpp's quantizer; it also "
                      "quantizes token_embd, so its files are smaller), with `--no-imatrix` or our importance "
                      f"matrix ({IMATRIX_SAMPLES} x 512 builtin calibration tokens, the seed given); their 'KL "
                      "transformers' is gguf-py's dequantization of the file run in transformers.",
                      *imatrix_effect(rows)],
            "code": code_state(), "environment": environment_meta()}
    name = f"{args.name}_quick" if args.quick else args.name
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(render(rows, meta))
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
