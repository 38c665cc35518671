#!/usr/bin/env python
"""Serving capacity of Qwen3-8B and Qwen3-32B shapes (issue 15 part A): concurrent sequences per GPU at 4K, 32K and
the longest context, bf16 vs FP8 KV cache, FP8 vs W4A16 weights (and bf16 for reference).

    python benchmarks/kv_capacity.py [--name kv_capacity]

Nothing here is measured on a GPU: every figure is computed from bytes with qwenquant/bench/capacity.py (the formula
`qwenquant bench` uses). Weight bytes are the checkpoint's tensor bytes from `qwenquant <scheme> --dry-run --json` on
a folder holding only the model's config.json (shapes from ../shared/docs/formats.md; --dry-run sizes within 0.01% of
real outputs, results/dry_run_accuracy.md); KV bytes per token are 2 x layers x kv_heads x head_dim x element bytes,
the formula the bench's measured cache bytes match (tests/bench/test_capacity.py); activations are the one-chunk
prefill estimate. Qwen3-32B's longest context is 131072 with YaRN factor 4 (its model card), 40960 without.
Writes benchmarks/results/<name>.json and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from qwenquant.bench.capacity import capacity_rows, prefill_activation_bytes  # noqa: E402
from qwenquant.bench.timing import PREFILL_CHUNK  # noqa: E402
from qwenquant.targets import target_runs  # noqa: E402

COMMON = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", torch_dtype="bfloat16", head_dim=128,
              vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, attention_bias=False)
MODELS = {  # ../shared/docs/formats.md; longest context served
    "Qwen3-8B": (dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=12288, max_position_embeddings=40960), 40960),
    "Qwen3-32B": (dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8,
                       intermediate_size=25600, max_position_embeddings=40960), 131072),
}
WEIGHTS = {"FP8 (W8A8)": ["fp8"], "W4A16 GPTQ": ["gptq"]}
SERVING = {"bf16 (source)": None, "FP8 (W8A8)": "fp8-w8a8", "W4A16 GPTQ": "w4a16"}  # qwenquant.targets schemes
LENGTHS = (4096, 32768)


def weight_bytes(folder: Path, cmd: list[str]) -> tuple[int, int]:
    """(tensor bytes of the checkpoint `cmd` writes, of the bf16 source) from --dry-run on a config-only folder."""
    out = subprocess.run([sys.executable, "-m", "qwenquant", *cmd, "--model", str(folder), "--dry-run", "--json"],
                         capture_output=True, text=True, cwd=REPO)
    sizes = json.loads(out.stdout.strip().splitlines()[-1])["sizes"]
    return sizes["quantized_tensor_bytes"] + sizes["other_tensor_bytes"], sizes["source_bytes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--name", default="kv_capacity")
    args = p.parse_args()
    result = {"basis": __doc__.split("\n\n")[2].replace("\n", " "), "models": {}}
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, (shape, longest) in MODELS.items():
            cfg = COMMON | shape
            folder = Path(tmp) / model
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(cfg))
            kv = {"bf16": 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2}
            kv["fp8"] = kv["bf16"] // 2
            acts = prefill_activation_bytes(cfg, PREFILL_CHUNK)
            lengths = [*LENGTHS, longest]
            weights = {}
            for name, cmd in WEIGHTS.items():
                weights[name], source = weight_bytes(folder, cmd)
            weights = {"bf16 (source)": source} | weights
            entry = {"config": cfg, "longest_context": longest, "kv_bytes_per_token": kv, "activation_bytes": acts,
                     "weights_bytes": weights, "lengths": lengths, "rows": {}}
            for name, w in weights.items():
                entry["rows"][name] = capacity_rows(w, acts, kv, lengths)
            result["models"][model] = entry
            lines += markdown(model, entry)
    (BENCH / "results" / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


def markdown(model: str, e: dict) -> list[str]:
    gib = 2**30
    out = ["", f"#### {model} (KV cache {e['kv_bytes_per_token']['bf16']:,} bytes per token in bf16, "
           f"{e['kv_bytes_per_token']['fp8']:,} in FP8; activations {e['activation_bytes'] / gib:.2f} GiB)", "",
           "| GPU | weights | weights GiB | " + " | ".join(f"{n // 1024}K bf16 / FP8 cache" for n in e["lengths"]) +
           " | runs the weights' scheme |",
           "|---|---|---:|" + "---:|" * len(e["lengths"]) + "---|"]
    for name, rows in e["rows"].items():
        for g in rows:
            if g["key"] in ("h100", "a100", "l40s", "rtx4090", "rtx5090", "b200"):
                cells = " | ".join(f"{g['sequences'][str(n)]['bf16']} / {g['sequences'][str(n)]['fp8']}"
                                   for n in e["lengths"])
                why = target_runs(g["key"], SERVING[name]) if SERVING[name] else None
                out.append(f"| {g['name']} | {name} | {e['weights_bytes'][name] / gib:.1f} | {cells} | "
                           f"{'yes' if why is None else 'no: ' + why} |")
    return out


if __name__ == "__main__":
    main()
