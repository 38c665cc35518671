"""Serving capacity from bytes (qwenquant/bench/capacity.py): the formula on Qwen3-8B's shapes checked by hand, and
`qwenquant bench --kv-cache fp8` on a per-head calibrated checkpoint of the tiny model (its scales drive the cache,
its capacity section uses the measured bytes per token)."""

from __future__ import annotations

import json

import pytest
from transformers import Qwen3Config

from qwenquant.bench.capacity import (
    capacity_rows,
    concurrent_sequences,
    context_ladder,
    memory_vs_context,
    prefill_activation_bytes,
)
from qwenquant.kernels.kv_cache import kv_bytes_per_token

# Qwen3-8B (../shared/docs/formats.md): 36 layers, 8 KV heads of 128
QWEN3_8B = dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288, vocab_size=151936, max_position_embeddings=40960)


def test_context_ladder() -> None:
    assert context_ladder(40960) == [4096, 8192, 16384, 32768, 40960]
    assert context_ladder(262144) == [4096 * 2**i for i in range(7)]  # 4K .. 256K, the max itself last
    assert context_ladder(4096) == [4096] and context_ladder(2048) == [2048]


def test_qwen3_8b_sequences_by_hand() -> None:
    config = Qwen3Config(**QWEN3_8B)
    bf16, fp8 = kv_bytes_per_token(config, "bf16"), kv_bytes_per_token(config, "fp8")
    assert bf16 == 2 * 36 * 8 * 128 * 2 == 147456 and fp8 == bf16 // 2
    weights, acts = 8_190_000_000, 1_000_000_000  # ~FP8 8B checkpoint, a 1 GB workspace
    h100 = 80 * 2**30
    free = int(0.9 * h100) - weights - acts  # 68,119,411,328 bytes for the cache
    assert concurrent_sequences(h100, weights, acts, bf16, 32768) == free // (bf16 * 32768) == 14
    assert concurrent_sequences(h100, weights, acts, fp8, 32768) == free // (fp8 * 32768) == 28
    assert concurrent_sequences(24 * 2**30, 17_000_000_000, acts, bf16, 4096) == 8  # bf16 8B on a 24 GB card
    assert concurrent_sequences(16 * 2**30, 17_000_000_000, acts, bf16, 4096) == 0  # weights do not fit: none
    rows = capacity_rows(weights, acts, {"bf16": bf16, "fp8": fp8}, [4096, 32768])
    h = next(r for r in rows if r["key"] == "h100")
    assert h["sequences"]["32768"] == {"bf16": 14, "fp8": 28} and "projection" in h["label"]
    assert all(r["sequences"]["4096"]["fp8"] >= r["sequences"]["32768"]["fp8"] for r in rows)
    assert not any(r["key"] == "cpu" for r in rows)
    mem = memory_vs_context(weights, acts, {"bf16": bf16}, [4096, 40960])
    assert mem[1]["total_bytes"]["bf16"] == weights + acts + bf16 * 40960
    # the workspace estimate: one 2048-token chunk, (3h + (2 nq + 2 nkv) d + 3 I) x 2 bytes, + fp32 logits
    assert prefill_activation_bytes(QWEN3_8B, 2048) == 2048 * (3 * 4096 + (64 + 16) * 128 + 3 * 12288) * 2 + 151936 * 4


@pytest.mark.parametrize("strategy", ["head"])
def test_bench_uses_per_head_scales_and_reports_capacity(cli, tiny_args, tmp_path, strategy) -> None:
    out = tmp_path / "ckpt"
    res = cli(["fp8", *tiny_args, "--kv-cache", "fp8", "--kv-cache-strategy", strategy, "--no-ppl", "--no-verify",
               "--out", str(out), "--quiet"])
    assert res.code == 0, res.err[-2000:]
    bench = tmp_path / "bench"
    res = cli(["bench", str(out), "--device", "cpu", "--batch-sizes", "1", "--context", "16", "--decode-tokens", "2",
               "--kv-cache", "fp8", "--out", str(bench), "--quiet"])
    assert res.code == 0, res.err[-2000:]
    r = json.loads((bench / "qwenquant_bench.json").read_text())
    assert r["kv_cache"]["scales"].startswith("calibrated per KV head")
    c = r["capacity"]
    cfg = json.loads((out / "config.json").read_text())
    per_token_fp8 = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"]
    assert c["kv_bytes_per_token"] == {"bf16": 2 * per_token_fp8, "fp8": per_token_fp8}
    assert c["kv_bytes_per_token_source"]["fp8"].startswith("measured")
    assert c["lengths"] == context_ladder(cfg["max_position_embeddings"])
    assert all("projection" in g["label"] for g in c["gpus"])  # measured on CPU: every GPU is a projection
    assert "## Concurrent sequences per GPU" in (bench / "BENCH.md").read_text()
