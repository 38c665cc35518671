"""ONNX models measured inside onnxruntime (issue 14's evidence, the sibling of benchmarks/runtimes.py for GGUF), on
qwen3-mini, every row built by `qwenquant export onnx` (onnxruntime-genai's model builder) and verified by it:

- fp32: the source itself in onnxruntime (the runtime's baseline);
- int8 / int4 from the bf16 source: onnxruntime's own round-to-nearest (MatMulNBitsQuantizer, block 32 / 128);
- int4 from our GPTQ and AWQ outputs (`qwenquant gptq|awq --format gptq|awq`, group 128), one row per calibration
  seed (--seeds), so the seed spread stands beside every difference; GPTQ also as QDQ (the NPU form);
per row: model size (model.onnx + data), mean per-token KL(source in transformers, float32 || onnxruntime) and top-1
agreement on the held-out windows (WikiText-2 test, --kl-tokens), the same KL of the read-back weights in transformers
(so a runtime difference shows), greedy agreement of onnxruntime-genai with the same weights in transformers, and
decode tokens/s at batch 1 through onnxruntime-genai's generator (--repeats runs of 64 tokens after a chat prompt,
median and range; the fp32 source in the same runtime and the same repeats).

    python benchmarks/runtimes_onnx.py                # ~20-30 min on the shared 2-core box
    python benchmarks/runtimes_onnx.py --seeds 0 --repeats 3

Writes benchmarks/results/runtimes_onnx.json and .md (after each row, as .partial.json until the end).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from harness import code_state, environment_meta  # noqa: E402

MODEL = REPO.parent / "shared" / "models" / "qwen3-mini"
RESULTS = REPO / "benchmarks" / "results"
PROMPT = "Write a short paragraph about the history of the printing press and why it mattered."
DECODE_TOKENS = 64


def qwenquant(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "qwenquant", *map(str, args)], cwd=REPO, check=True)


def quantized(work: Path, method: str, seed: int) -> Path:
    out = work / f"{method}-s{seed}"
    if not (out / "qwenquant_report.json").is_file():
        qwenquant(method, "--model", MODEL, "--format", method, "--seed", seed, "--no-ppl", "--kl-tokens", "512",
                  "--out", out, "--quiet")
    return out


def decode_speed(folder: Path, repeats: int) -> dict:
    """Tokens/s of onnxruntime-genai's greedy generator after a chat prompt (first token excluded: prefill)."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    from qwenquant.eval.chat_prompts import chat_ids
    from qwenquant.eval.onnx_verify import genai_model

    ids = chat_ids(AutoTokenizer.from_pretrained(folder), PROMPT)
    model, rates = genai_model(folder), []
    for _ in range(repeats):
        params = og.GeneratorParams(model)
        n = len(ids) + DECODE_TOKENS + 1
        params.set_search_options(max_length=n, min_length=n, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()
        t = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            gen.generate_next_token()
        rates.append(DECODE_TOKENS / (time.perf_counter() - t))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": rates}


def row(label: str, folder: Path, out: Path, flags: list[str], kl_tokens: int, repeats: int, seed=None) -> dict:
    if not (out / "qwenquant_report.json").is_file():
        cmd = ["export", "onnx", folder, "--out", out, "--kl-tokens", kl_tokens, "--quiet", *flags]
        if folder != MODEL:
            cmd += ["--source", MODEL]
        t = time.perf_counter()
        try:
            qwenquant(*cmd)
        except subprocess.CalledProcessError as err:
            return {"label": label, "seed": seed, "failed": f"exit {err.returncode}"}
        print(f"{label}: export {time.perf_counter() - t:.0f} s", file=sys.stderr)
    report = json.loads((out / "qwenquant_report.json").read_text())
    v = report["verification"]
    return {"label": label, "seed": seed, "size_mib": report["sizes"]["output_bytes"] / 2**20,
            "kl_onnxruntime": v["runtime"]["vs_source"]["mean_kl"],
            "top1_onnxruntime": v["runtime"]["vs_source"]["top1_agreement"],
            "kl_weights_in_transformers": v["readback_in_transformers_vs_source"]["mean_kl"],
            "kl_runtime_vs_weights": v["runtime"]["vs_readback_in_transformers"]["mean_kl"],
            "weights_exact": v["weights"]["mismatched"] == [] if report["onnx"]["precision"] != "fp32" else None,
            "greedy_token_agreement": v["runtime"]["greedy"]["token_agreement"], "passed": v["passed"],
            "decode_tok_s": decode_speed(out, repeats), "codes": report["codes"],
            "onnx": report["onnx"], "tokens": v["runtime"]["vs_source"]["tokens"]}


def render(result: dict) -> str:
    lines = ["# ONNX in onnxruntime on qwen3-mini", "", result["note"], "",
             "| model | seed | size MiB | KL in onnxruntime | top-1 | KL same weights in transformers | "
             "onnxruntime vs those weights | greedy agreement | decode tok/s median (min-max) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "failed" in r:
            lines.append(f"| {r['label']} | {r['seed'] if r['seed'] is not None else ''} | failed: {r['failed']} "
                         "| | | | | | |")
            continue
        d = r["decode_tok_s"]
        lines.append(f"| {r['label']} | {r['seed'] if r['seed'] is not None else ''} | {r['size_mib']:.1f} | "
                     f"{r['kl_onnxruntime']:.2e} | {100 * r['top1_onnxruntime']:.1f}% | "
                     f"{r['kl_weights_in_transformers']:.2e} | {r['kl_runtime_vs_weights']:.1e} | "
                     f"{100 * r['greedy_token_agreement']:.0f}% | {d['median']:.0f} ({d['min']:.0f}-{d['max']:.0f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kl-tokens", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qwenquant-runtimes-onnx"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    specs = [("fp32 (source)", MODEL, ["--precision", "fp32"], None),
             ("int8 RTN g32 (onnxruntime's)", MODEL, ["--precision", "int8"], None),
             ("int4 RTN g32 (onnxruntime's)", MODEL, ["--precision", "int4"], None),
             ("int4 RTN g128 (onnxruntime's)", MODEL, ["--precision", "int4", "--group-size", "128"], None)]
    for seed in seeds:
        specs += [("int4 GPTQ g128 (ours)", ("gptq", seed), [], seed),
                  ("int4 AWQ g128 (ours)", ("awq", seed), [], seed)]
    specs.append(("int4 GPTQ g128 QDQ (ours)", ("gptq", seeds[0]), ["--qdq"], seeds[0]))
    result = {"note": ("qwen3-mini (6.8M parameters), WikiText-2 test windows of 512 tokens, KL from the source in "
                       "transformers float32; onnxruntime CPU execution provider, MatMulNBits at the builder's "
                       "default accuracy level 4 (int8 activations); lm_head and embeddings stay float in every "
                       "row. Decode speed on the shared 2-core machine while other jobs ran (check the load: "
                       "decode medians are only comparable within a quiet run)."),
              "environment": environment_meta(), "code": code_state(), "rows": []}
    partial = RESULTS / "runtimes_onnx.partial.json"
    for i, (label, src, flags, seed) in enumerate(specs):
        folder = quantized(work, *src) if isinstance(src, tuple) else src
        result["rows"].append(row(label, folder, work / f"onnx-{i}", flags, args.kl_tokens, args.repeats, seed))
        partial.write_text(json.dumps(result, indent=1))
        print(render(result).splitlines()[-1], file=sys.stderr)
    (RESULTS / "runtimes_onnx.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "runtimes_onnx.md").write_text(render(result))
    partial.unlink()
    print(render(result))


if __name__ == "__main__":
    main()
