"""Memory vs context and serving capacity: how many sequences of a given length fit each GPU, bf16 vs FP8 KV cache.

At long context the KV cache, not the weights, fills the GPU. For a context of L tokens:

    memory(L)     = weights + activations + kv_per_token x L                  (one sequence)
    sequences(L)  = floor((u x gpu_memory - weights - activations) / (kv_per_token x L))

with u = 0.9, vLLM's default `gpu_memory_utilization` (the rest is the CUDA context and allocator slack),
kv_per_token = 2 x layers x kv_heads x head_dim x element bytes (2 bf16, 1 fp8; per-tensor or per-head scales add
nothing per token), and `activations` the transient workspace of one prefill chunk. Every figure is computed from
bytes (the weights' exact tensor bytes, the cache's bytes per token measured by the bench where it ran); none is a
measured fit on that GPU unless the bench ran on it, and each row says which.
"""

from __future__ import annotations

GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of GPU memory for weights, activations and KV cache
FIRST_CONTEXT = 4096
CACHE_DTYPES = ("bf16", "fp8")
PROJECTION = "projection from bytes, not measured on this GPU"
MEASURED_DEVICE = "computed from bytes measured on this GPU (not a measured fit)"


def context_ladder(max_positions: int, first: int = FIRST_CONTEXT) -> list[int]:
    """first, 2 x first, ... below max_positions, then max_positions itself (4K, 8K, ..., 32K, 40960)."""
    out, c = [], first
    while c < max_positions:
        out.append(c)
        c *= 2
    return out + [max_positions]


def prefill_activation_bytes(cfg: dict, chunk: int, dtype_bytes: int = 2) -> int:
    """Workspace estimate of one prefill chunk of `chunk` tokens through one decoder layer (the largest transient; a
    formula, not measured): residual in and out (2 h), normed input (h), q/k/v ((n_q + 2 n_kv) d), attention output
    (n_q d), MLP gate, up and their product (3 I), all in the model dtype, plus the last token's float32 logits."""
    h, inter, d = cfg["hidden_size"], cfg["intermediate_size"], cfg.get("head_dim") or (
        cfg["hidden_size"] // cfg["num_attention_heads"])
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_token = 3 * h + (2 * nq + 2 * nkv) * d + 3 * inter
    return chunk * per_token * dtype_bytes + cfg["vocab_size"] * 4


def concurrent_sequences(memory_bytes: int, weight_bytes: int, activation_bytes: int, kv_per_token: int, length: int,
                         utilization: float = GPU_MEMORY_UTILIZATION) -> int:
    """floor((utilization x memory - weights - activations) / (kv_per_token x length)), 0 when nothing is left."""
    free = int(utilization * memory_bytes) - weight_bytes - activation_bytes
    return max(free // (kv_per_token * length), 0)


def memory_vs_context(weight_bytes: int, activation_bytes: int, kv_per_token: dict[str, int],
                      contexts: list[int]) -> list[dict]:
    """One sequence at each context: weights, activations and the KV cache per cache dtype, and their totals."""
    return [{"context": c, "weights_bytes": weight_bytes, "activation_bytes": activation_bytes,
             "kv_bytes": {k: v * c for k, v in kv_per_token.items()},
             "total_bytes": {k: weight_bytes + activation_bytes + v * c for k, v in kv_per_token.items()}}
            for c in contexts]


def capacity_rows(weight_bytes: int, activation_bytes: int, kv_per_token: dict[str, int], lengths: list[int],
                  measured_gpu: str | None = None) -> list[dict]:
    """Per GPU of `qwenquant.targets.GPUS`: concurrent sequences of each length per cache dtype. `measured_gpu`: the
    GPU name the bench ran on (its row is labelled as computed from bytes measured there)."""
    from qwenquant.targets import GPUS

    rows = []
    for gpu in (g for g in GPUS if g.memory_gib > 0):
        memory = int(gpu.memory_gib * 2**30)
        label = MEASURED_DEVICE if measured_gpu and gpu.name.split()[:2] == measured_gpu.split()[:2] else PROJECTION
        rows.append({"key": gpu.key, "name": gpu.name, "memory_gib": gpu.memory_gib, "label": label,
                     "weights_fit": weight_bytes + activation_bytes <= GPU_MEMORY_UTILIZATION * memory,
                     "sequences": {str(length): {k: concurrent_sequences(memory, weight_bytes, activation_bytes, v, length)
                                                 for k, v in kv_per_token.items()} for length in lengths}})
    return rows


def capacity_section(cfg: dict, weight_bytes: int, kv_per_token: dict[str, int], kv_sources: dict[str, str],
                     chunk: int, dtype_bytes: int, measured_workspace: int | None, measured_gpu: str | None) -> dict:
    """The bench document's `capacity`: memory vs context from 4K to the model's max and concurrent sequences per
    GPU; the workspace measured on a GPU when there is one, else the formula estimate."""
    max_positions = int(cfg["max_position_embeddings"])
    if measured_workspace:
        activations, act_source = measured_workspace, "measured: the largest workspace of this run's points (CUDA)"
    else:
        activations = prefill_activation_bytes(cfg, chunk, dtype_bytes)
        act_source = (f"estimate (formula, not measured): one prefill chunk of {chunk} tokens through one layer "
                      "(qwenquant/bench/capacity.py prefill_activation_bytes)")
    contexts = context_ladder(max_positions)
    return {"formula": "sequences = floor((0.9 x GPU memory - weights - activations) / (KV bytes per token x "
                       "length)); 0.9 = vLLM's default gpu_memory_utilization",
            "weights_bytes": weight_bytes, "activation_bytes": activations, "activation_source": act_source,
            "kv_bytes_per_token": kv_per_token, "kv_bytes_per_token_source": kv_sources,
            "memory_vs_context": memory_vs_context(weight_bytes, activations, kv_per_token, contexts),
            "lengths": contexts, "gpus": capacity_rows(weight_bytes, activations, kv_per_token, contexts, measured_gpu)}


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f}"


def capacity_markdown(c: dict) -> list[str]:
    """BENCH.md / long_context.md lines: memory vs context, then concurrent sequences per GPU (one table per cache
    dtype), each row labelled."""
    kv = c["kv_bytes_per_token"]
    src = c["kv_bytes_per_token_source"]
    lines = ["", "## Memory vs context (one sequence; computed from bytes)", "",
             f"Weights {_gib(c['weights_bytes'])} GiB; activations {_gib(c['activation_bytes'])} GiB "
             f"({c['activation_source']}); KV cache per token: " +
             ", ".join(f"{k} {v:,} bytes ({src[k]})" for k, v in kv.items()) + ".", "",
             "| context | weights GiB | activations GiB | " + " | ".join(f"KV {k} GiB | total {k} GiB" for k in kv) + " |",
             "|---:|---:|---:|" + "---:|---:|" * len(kv)]
    for row in c["memory_vs_context"]:
        lines.append(f"| {row['context']:,} | {_gib(row['weights_bytes'])} | {_gib(row['activation_bytes'])} | " +
                     " | ".join(f"{_gib(row['kv_bytes'][k])} | {_gib(row['total_bytes'][k])}" for k in kv) + " |")
    lines += ["", "## Concurrent sequences per GPU", "", f"{c['formula']}.", "",
              "| GPU | GiB | " + " | ".join(f"{length:,} tok bf16 / fp8" for length in c["lengths"]) + " | basis |",
              "|---|---:|" + "---:|" * len(c["lengths"]) + "---|"]
    for g in c["gpus"]:
        cells = " | ".join(f"{g['sequences'][str(n)].get('bf16', '-')} / {g['sequences'][str(n)].get('fp8', '-')}"
                           for n in c["lengths"])
        fit = "" if g["weights_fit"] else " (weights do not fit)"
        lines.append(f"| {g['name']} | {g['memory_gib']:.0f} | {cells} | {g['label']}{fit} |")
    return lines
