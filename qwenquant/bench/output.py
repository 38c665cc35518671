"""Bench output: `qwenquant_bench.json` (for machines), `BENCH.md` and PNG plots (for people), written atomically.

`qwenquant_bench.json`, schema 1. Top-level keys:
- schema_version (1), kind ("qwenquant_bench"), qwenquant_version, created (UTC), command (the header of
  `qwenquant.reporting`), environment {torch, transformers, compressed_tensors, python, platform}
- device {type: cpu|cuda, name, capability, memory_bytes, cuda | threads}; cpu_note: the sentence "CPU numbers are
  not GPU numbers ..." when measured on CPU, else null
- model {path, architecture, num_layers, hidden_size, max_position_embeddings, format (bf16 | compressed-tensors |
  hf-fp8 | gptq | awq), quant_method, quant_format, activations (token | tensor | group | null), scheme}
- settings {batch_sizes, contexts, decode_tokens, kv_cache, compile, memory_budget_gib, bandwidth_bytes, seed, device,
  prefill_chunk, warmup_steps, compile_effective}
- kernels {Linear type ("self_attn.q_proj", ..., "lm_head"): {kernel label: module count}}; notes [str]; load_s
- weights {tensor_bytes (exact bytes of every parameter/buffer), measured_bytes (CUDA allocator, or host RSS delta
  on CPU, over the load), measured_kind (cuda-allocator | host-rss), measured_note, decode_read_bytes_batch1}
- kv_cache {dtype: bf16|fp8, bytes_per_token, scales}; bandwidth {bytes_per_s, buffer_bytes, repeats, method}
- points [{batch, context, status: ok | oom | skipped | too_long (beyond max_position_embeddings), error (not ok), prefill_s, prefill_tokens_per_s, ttft_s,
  decode_s, decode_steps, decode_tokens_per_s, itl_ms_mean, itl_ms_p50, itl_ms_p90, compiled, max_cache_len, note,
  memory {kind, weights_bytes (exact), weights_measured_bytes, kv_cache_bytes (exact), peak_bytes, workspace_bytes
  (peak - weights measured at load - KV), peak_reserved_bytes (CUDA) |
  rss_delta_bytes, note (CPU)}, bytes_per_decode_step, bound_tokens_per_s, fraction_of_bound}]
- max_context: null, or {budget_gib, weights_bytes, reserve_bytes, kv_bytes_per_token, formula, computed: true,
  max_context {batch: tokens}}
- kv_saving (with --kv-cache fp8): {per_token_bf16_bytes, per_token_fp8_bytes, at [{context, batch, bf16_bytes,
  fp8_bytes, saved_bytes}]} (computed from bytes per token)
- projections {label: "projection, not measured", context, basis, gpus [{key, name, bandwidth_gb_s, memory_gib,
  compute_capability, serving_scheme, runs_scheme, runs_note (why not, qwenquant.targets), label, context, weights_fit, fits_at_context, decode_bound_tokens_per_s,
  decode_expected_tokens_per_s, max_context_batch1, reserve_bytes}]}
- capacity: null (no max_position_embeddings), or {formula, weights_bytes, activation_bytes, activation_source,
  kv_bytes_per_token {bf16, fp8}, kv_bytes_per_token_source {bf16, fp8}, memory_vs_context [{context, weights_bytes,
  activation_bytes, kv_bytes {bf16, fp8}, total_bytes {bf16, fp8}}], lengths [tokens], gpus [{key, name, memory_gib,
  label, weights_fit, sequences {length: {bf16, fp8}}}]} (qwenquant/bench/capacity.py; computed from bytes)
- plots [file names]
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qwenquant.bench.capacity import capacity_markdown
from qwenquant.errors import BadInputError
from qwenquant.export.writer import atomic_output_dir
from qwenquant.reporting import read_json, write_atomic, write_json

SCHEMA_VERSION = 1
KIND = "qwenquant_bench"
JSON_NAME = "qwenquant_bench.json"
MD_NAME = "BENCH.md"
PLOTS = ("tokens_per_s_vs_batch.png", "memory_vs_context.png")


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.{1 if n >= 10 * 2**20 else 3}f}"


def _num(v, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def _ok(result: dict) -> list[dict]:
    return [p for p in result["points"] if p["status"] == "ok"]


def render_markdown(r: dict) -> str:
    """BENCH.md: speed, memory, budget, KV saving and projections tables with their units and caveats."""
    m, dev, s = r["model"], r["device"], r["settings"]
    lines = [f"# qwenquant bench: {Path(m['path']).name} ({m['scheme']})", ""]
    if r.get("cpu_note"):
        lines += [f"> **{r['cpu_note']}**", ""]
    lines += [f"- device: {dev['type']} {dev['name']}" + (f" (SM {dev['capability']})" if dev.get("capability") else "")
              + f"; torch {r['environment']['torch']}; {r['created']}",
              f"- weights: {_mib(r['weights']['tensor_bytes'])} MiB of tensors ({r['weights']['measured_kind']} "
              f"measured {_mib(r['weights']['measured_bytes'])} MiB over the load: {r['weights']['measured_note']})",
              f"- KV cache: {r['kv_cache']['dtype']}, {r['kv_cache']['bytes_per_token']:,} bytes per token"
              + (f", scales: {r['kv_cache']['scales']}" if r['kv_cache']['scales'] else ""),
              f"- copy bandwidth: {r['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s ({r['bandwidth']['method']})",
              f"- decode: {s['decode_tokens']} timed steps after {s['warmup_steps']} warm-up step(s), "
              f"{'torch.compile reduce-overhead (CUDA graphs)' if s['compile_effective'] else 'eager'}, static KV cache; "
              f"prefill in chunks of {s['prefill_chunk']} tokens", "", "## Kernels", "", "| Linear | kernel (modules) |", "|---|---|"]
    for kind, labels in r["kernels"].items():
        lines.append(f"| {kind} | " + "; ".join(f"{k} ({n})" for k, n in labels.items()) + " |")
    lines += [""] + [f"- {n}" for n in r["notes"]] + ([""] if r["notes"] else [])
    lines += ["## Speed", "", "Bound = batch x copy bandwidth / bytes read per decode step (weights once + KV of the "
              "context): the memory-bandwidth limit of decoding.", "",
              "| batch | context | prefill tok/s | TTFT ms | decode tok/s | ITL ms p50 | bound tok/s | % of bound | status |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in r["points"]:
        if p["status"] != "ok":
            lines.append(f"| {p['batch']} | {p['context']} | | | | | | | {p['status']}: {p.get('error', '')} |")
            continue
        frac = p.get("fraction_of_bound")
        lines.append(f"| {p['batch']} | {p['context']} | {_num(p['prefill_tokens_per_s'])} | {_num(1000 * p['ttft_s'])} | "
                     f"{_num(p['decode_tokens_per_s'])} | {_num(p['itl_ms_p50'], '.2f')} | {_num(p['bound_tokens_per_s'])} | "
                     f"{_num(None if frac is None else 100 * frac)} | ok{' (' + p['note'] + ')' if p.get('note') else ''} |")
    kind = "CUDA allocator" if dev["type"] == "cuda" else "host RSS on CPU (not VRAM)"
    lines += ["", f"## Memory ({kind})", "", "| batch | context | weights MiB | KV cache MiB | workspace MiB | peak MiB |",
              "|---|---|---|---|---|---|"]
    for p in _ok(r):
        mem = p["memory"]
        lines.append(f"| {p['batch']} | {p['context']} | {_mib(mem['weights_bytes'])} | {_mib(mem['kv_cache_bytes'])} | "
                     f"{_mib(mem.get('workspace_bytes'))} | {_mib(mem.get('peak_bytes'))} |")
    if dev["type"] != "cuda":
        lines += ["", "Workspace and peak are not measured on CPU (no per-interval peak of host memory); KV cache "
                  "bytes are the cache tensors' exact size."]
    if r.get("max_context"):
        b = r["max_context"]
        lines += ["", f"## Largest context in {b['budget_gib']} GiB (computed, not measured)", "", f"{b['formula']}.", "",
                  "| batch | max context |", "|---|---|"] + [f"| {k} | {v:,} |" for k, v in b["max_context"].items()]
    if r.get("kv_saving"):
        k = r["kv_saving"]
        lines += ["", "## FP8 KV cache saving (computed from bytes per token)", "", "| context | bf16 KV MiB | fp8 KV MiB | saved MiB |",
                  "|---|---|---|---|"] + [f"| {a['context']:,} | {_mib(a['bf16_bytes'])} | {_mib(a['fp8_bytes'])} | "
                                          f"{_mib(a['saved_bytes'])} |" for a in k["at"]]
    if r.get("capacity"):
        lines += capacity_markdown(r["capacity"])
    pr = r["projections"]
    lines += ["", f"## Consumer GPUs ({pr['label']})", "", f"{pr['basis']}; context {pr['context']} tokens, batch 1; "
              "published bandwidth and memory.", "",
              "| GPU | GB/s | GiB | runs this scheme | decode bound tok/s | expected tok/s | weights fit | max context "
              "(batch 1) |",
              "|---|---|---|---|---|---|---|---|"]
    for g in pr["gpus"]:
        runs = f"yes ({g['serving_scheme']})" if g["runs_scheme"] else f"no: {g['runs_note']}"
        lines.append(f"| {g['name']} (projection) | {g['bandwidth_gb_s']:.0f} | {g['memory_gib']:.0f} | "
                     f"{runs} | {g['decode_bound_tokens_per_s']:.1f} | "
                     f"{_num(g['decode_expected_tokens_per_s'])} | {'yes' if g['weights_fit'] else 'no'} | {g['max_context_batch1']:,} |")
    lines += [""] + [f"![{p}]({p})" for p in r.get("plots", [])] + [""]
    return "\n".join(lines)


def write_plots(r: dict, folder: Path) -> list[str]:
    """Decode (and prefill) tokens/s vs batch per context; memory split vs context at the smallest batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(r)
    cpu = " (CPU: not GPU numbers)" if r["device"]["type"] == "cpu" else ""
    fig, ax = plt.subplots(figsize=(6, 4))
    for ctx in sorted({p["context"] for p in ok}):
        pts = sorted((p for p in ok if p["context"] == ctx), key=lambda p: p["batch"])
        xs = [p["batch"] for p in pts]
        line, = ax.plot(xs, [p["decode_tokens_per_s"] or 0 for p in pts], marker="o", label=f"decode, ctx {ctx}")
        ax.plot(xs, [p["bound_tokens_per_s"] for p in pts], ls="--", color=line.get_color(), alpha=0.6,
                label=f"bandwidth bound, ctx {ctx}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{r['model']['scheme']}: decode tokens/s vs batch{cpu}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / PLOTS[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    batch = min((p["batch"] for p in ok), default=1)
    pts = sorted((p for p in ok if p["batch"] == batch), key=lambda p: p["context"])
    xs = [str(p["context"]) for p in pts]
    weights = [p["memory"]["weights_bytes"] / 2**20 for p in pts]
    kv = [p["memory"]["kv_cache_bytes"] / 2**20 for p in pts]
    ws = [(p["memory"].get("workspace_bytes") or 0) / 2**20 for p in pts]
    ax.bar(xs, weights, label="weights")
    ax.bar(xs, kv, bottom=weights, label=f"KV cache ({r['kv_cache']['dtype']})")
    if any(ws):
        ax.bar(xs, ws, bottom=[a + b for a, b in zip(weights, kv)], label="workspace")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("MiB" + (" (VRAM)" if r["device"]["type"] == "cuda" else " (host; workspace not measured)"))
    ax.set_title(f"{r['model']['scheme']}: memory vs context, batch {batch}{cpu}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / PLOTS[1], dpi=110)
    plt.close(fig)
    return list(PLOTS)


def _write_files(r: dict, folder: Path) -> None:
    r["plots"] = write_plots(r, folder)
    public = {k: v for k, v in r.items() if not k.startswith("_")}  # "_generated": tokens, for tests only
    write_json(folder / JSON_NAME, public, default=str)
    write_atomic(folder / MD_NAME, render_markdown(r))


def write_bench(result: dict, out: Path) -> Path:
    """Write the bench files into `out` atomically; a previous bench folder there is replaced, any other
    non-empty folder is refused."""
    out = Path(out)
    if out.exists() and out.is_dir() and any(out.iterdir()):
        if not (out / JSON_NAME).is_file():
            raise BadInputError(f"--out {out}: exists and is not a qwenquant bench folder; choose another --out")
        fresh = out.with_name(f"{out.name}.new")
        shutil.rmtree(fresh, ignore_errors=True)
        with atomic_output_dir(fresh, overwrite=False) as tmp:
            _write_files(result, tmp)
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        fresh.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return out
    with atomic_output_dir(out, overwrite=True) as tmp:
        _write_files(result, tmp)
    return out


def summary(result: dict) -> dict:
    """The few numbers `--json`, compare and report show: the first ok point's speeds and peak memory."""
    ok = _ok(result)
    p = ok[0] if ok else {}
    mem = p.get("memory", {})
    return {"scheme": result["model"]["scheme"], "device": f"{result['device']['type']} {result['device']['name']}",
            "batch": p.get("batch"), "context": p.get("context"),
            "decode_tokens_per_s": p.get("decode_tokens_per_s"), "prefill_tokens_per_s": p.get("prefill_tokens_per_s"),
            "bound_tokens_per_s": p.get("bound_tokens_per_s"),
            "peak_bytes": mem.get("peak_bytes"), "weights_bytes": result["weights"]["tensor_bytes"],
            "kv_cache_bytes": mem.get("kv_cache_bytes"), "memory_kind": mem.get("kind"),
            "points_ok": len(ok), "points_failed": len(result["points"]) - len(ok), "cpu_note": result.get("cpu_note")}


def find_bench(folder: Path) -> dict | None:
    """The bench document in `folder` or `folder/bench`, or None."""
    for path in (Path(folder) / JSON_NAME, Path(folder) / "bench" / JSON_NAME):
        if path.is_file():
            data = read_json(path)
            if data.get("kind") == KIND:
                return data
    return None
