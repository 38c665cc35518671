"""GGUF files measured inside llama.cpp (issue 14's evidence), on qwen3-mini: for Q8_0 / Q4_0 / Q4_1 written from
RTN, GPTQ and AWQ codes (`qwenquant <method> --group-size 32 --format gguf`), and for the bf16 source written as a
BF16 GGUF, in the same runtime:

- file size;
- mean per-token KL(source in transformers, float32 || the file in llama.cpp) and top-1 agreement on the run's
  held-out windows (WikiText-2 test, the run's `--kl-tokens`), from each run's report (`verification.runtime`);
  beside it the same KL with the quantized weights in transformers (`evaluation.kl_vs_source`), so a runtime
  difference would show;
- greedy agreement of llama.cpp with the same weights in transformers on the report's chat prompts;
- decode tokens/s at batch 1 in llama.cpp (a 32-token chat prompt, 64 generated tokens, greedy; median of
  --repeats, the files alternating within each repeat; n_threads = --threads).
Optionally (--kquants) Q4_K_M / Q6_K made by llama.cpp's own quantizer (`llama_model_quantize`) from the BF16 file,
without and with an importance matrix computed from qwenquant's calibration activations (mean x^2 per input column
of every decoder Linear over 64 x 512 builtin calibration tokens, the statistic llama-imatrix collects).

    python benchmarks/runtimes.py                 # ~15-25 min on the shared 2-core box
    python benchmarks/runtimes.py --quick         # RTN only, one repeat

Writes benchmarks/results/runtimes.json and .md (--quick: runtimes_quick.*).
"""

from __future__ import annotations

import argparse
import json
import statistics
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


@torch.no_grad()
def importance_matrix(num_samples: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Per GGUF Linear tensor, the mean over calibration tokens of each input column's square (what llama-imatrix
    collects), from the source model in float32 on qwenquant's builtin calibration set (seed 0)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenquant.calibration import load_calibration

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, model.config.num_hidden_layers)
    sums, counts, hooks = {}, {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            target = names.get_name(name + ".weight", try_suffixes=(".weight",))

            def hook(_m, inputs, _out, target=target):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                sums[target] = sums.get(target, 0) + (x * x).sum(0)
                counts[target] = counts.get(target, 0) + x.shape[0]

            hooks.append(mod.register_forward_hook(hook))
    calib = load_calibration("builtin", tok, num_samples, seq_len, 0)
    for row in calib:
        model(input_ids=row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return {k: sums[k] / counts[k] for k in sums}


def kquant(src: Path, qtype: str, folder: Path, imatrix: dict[str, torch.Tensor] | None = None) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize), optionally fed an importance matrix: a NULL-terminated
    array of llama_model_imatrix_data {tensor name, float per input column, size}."""
    import ctypes

    import llama_cpp

    out = folder / f"llama-{qtype}{'-imatrix' if imatrix else ''}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = (ctypes.c_float * values.numel())(*values.tolist())
            keep.append(arr)
            entries[i].name, entries[i].data, entries[i].size = name.encode(), arr, values.numel()
        entries[len(imatrix)].name = None
        params.imatrix = entries
        keep.append(entries)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {qtype} failed: {rc}")
    return out


def decode_speed(path: Path, threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, n_threads=threads, n_batch=512)
    ids = llm.tokenize(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n".encode(), special=True)
    llm.eval(ids)  # prefill, not timed
    t, n = time.perf_counter(), 0
    for _ in range(DECODE_TOKENS):
        tok = llm.sample(temp=0.0, top_k=1)
        llm.eval([tok])
        n += 1
    seconds = time.perf_counter() - t
    llm.close()
    return n / seconds


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# GGUF in llama.cpp (qwen3-mini)", "", meta["setup"], "",
             "| variant | file MiB | KL llama.cpp | top-1 llama.cpp | KL transformers (same weights) | greedy agree | "
             "decode tok/s (median, min-max) | verified |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        kl, klt = r.get("kl_llama_cpp") or {}, r.get("kl_transformers") or {}
        s = r.get("decode_tok_s") or []
        speed = f"{statistics.median(s):.1f} ({min(s):.1f}-{max(s):.1f})" if s else "-"
        lines.append(f"| {r['variant']} | {r['file_bytes'] / 2**20:.2f} | {kl.get('mean_kl', float('nan')):.3e} | "
                     f"{100 * kl.get('top1_agreement', float('nan')):.2f}% | "
                     f"{klt['mean_kl']:.3e} | " if klt else
                     f"| {r['variant']} | {r['file_bytes'] / 2**20:.2f} | {kl.get('mean_kl', float('nan')):.3e} | "
                     f"{100 * kl.get('top1_agreement', float('nan')):.2f}% | - | ")
        lines[-1] += (f"{100 * r['greedy_agreement']:.1f}% | " if r.get("greedy_agreement") is not None else "- | ")
        lines[-1] += f"{speed} | {r.get('passed') if r.get('passed') is not None else '-'} |"
    lines += ["", *meta["notes"], ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kquants", action="store_true", help="also Q4_K_M / Q6_K from llama.cpp's quantizer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kl-tokens", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = ("rtn",) if args.quick else METHODS
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(prefix="runtimes-") as tmp:
        folder = Path(tmp)
        src = source_gguf(folder)
        rows = [source_row(src, args.kl_tokens)]
        for method in methods:
            for qtype in TYPES:
                print(f"[runtimes] {method} {qtype}", file=sys.stderr, flush=True)
                rows.append(quantize(method, qtype, folder / f"{method}-{qtype}", args.kl_tokens))
        if args.kquants:
            imatrix = importance_matrix(64, 512)
            for qtype in ("Q4_K_M", "Q6_K"):
                for imat in (None, imatrix):
                    path = kquant(src, qtype, folder, imat)
                    label = "imatrix: ours, 64x512 calibration tokens" if imat else "no imatrix"
                    rows.append(source_row(path, args.kl_tokens) | {"variant": f"llama.cpp {qtype} ({label})",
                                                                    "type": qtype})
        for r in rows:
            r["decode_tok_s"] = []
        for _ in range(repeats):  # the files alternate within each repeat
            for r in rows:
                r["decode_tok_s"].append(round(decode_speed(Path(r["file"]), args.threads), 2))
    import llama_cpp

    meta = {"setup": (f"qwen3-mini (6 layers, hidden 256, vocab 8192, tied embeddings; 13.0 MiB bf16). KL: mean "
                      f"per-token KL(source in transformers float32 || file in llama.cpp) over {args.kl_tokens} "
                      "WikiText-2 test tokens (2048-token windows), top-1 = argmax agreement. Decode: batch 1, "
                      f"{DECODE_TOKENS} greedy tokens after a chat prompt, {args.threads} threads, median of "
                      f"{repeats} (files alternating). llama-cpp-python {llama_cpp.__version__}, CPU."),
            "notes": ["Every quantized Linear of the Q8_0/Q4_0/Q4_1 files carries the method's codes as they are "
                      "(qwenquant/export/gguf_blocks.py); embeddings stay BF16, norms F32.",
                      "On a 2-core machine shared with other jobs single speed runs swing by tens of percent; the "
                      "embedding table (4 MiB BF16) dominates this small model's file size."],
            "code": code_state(), "environment": environment_meta()}
    name = "runtimes_quick" if args.quick else "runtimes"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(render(rows, meta))
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
