"""Side-by-side comparison of runs: one table (JSON + Markdown) and plots from their reports."""

from __future__ import annotations

import json
from pathlib import Path

from qwenquant.bench.output import find_bench, summary as bench_summary
from qwenquant.errors import BadInputError
from qwenquant.reporting import read_json, write_atomic, write_json

COMPARE_SCHEMA_VERSION = 1


def load_report(folder: Path) -> dict:
    path = Path(folder) / "qwenquant_report.json"
    if not path.is_file():
        raise BadInputError(f"{folder}: no qwenquant_report.json; pass qwenquant output folders")
    return read_json(path)


def row_for(name: str, report: dict) -> dict:
    """The comparison columns of one run."""
    ev = report["evaluation"]
    stages = [next(iter(s)) for s in report["recipe"]["stages"]]
    v = report.get("verification")
    return {
        "name": name,
        "stages": " -> ".join(stages),
        "format": report["recipe"]["export"]["format"],
        "source_ppl": ev.get("source", {}).get("perplexity"),
        "ppl": ev.get("quantized", {}).get("perplexity"),
        "delta_ppl_pct": ev.get("delta_ppl_pct"),
        "mean_kl": (ev["kl_vs_source"] or {}).get("mean_kl"),
        "top1_agreement": (ev["kl_vs_source"] or {}).get("top1_agreement"),
        "output_mib": report["sizes"]["output_bytes"] / 2**20,
        "size_ratio": report["sizes"]["ratio"],
        "quantize_s": report["timings_s"].get("quantize"),
        "peak_host_mib": report["memory"]["peak_host_bytes"] / 2**20,
        "peak_device_mib": report["memory"]["peak_device_bytes"] / 2**20,
        "device": report["memory"]["device"],
        "verified": None if v is None else v["passed"],
        "eval": {"text": ev["text"], "window": ev["window"], "windows": ev["windows"]},
    }


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def bench_columns(folder: Path) -> dict:
    """{"bench": summary} when `folder` (or its bench/ subfolder) holds a qwenquant_bench.json, else {}."""
    data = find_bench(folder)
    return {} if data is None else {"bench": bench_summary(data)}


def _bench_values(b: dict | None) -> tuple[str, str, str]:
    """(decode tok/s, prefill tok/s, peak MiB) of a bench summary; peak on CPU = weight + KV tensor bytes."""
    if not b:
        return "n/a", "n/a", "n/a"
    peak = b["peak_bytes"] if b["peak_bytes"] is not None else b["weights_bytes"] + (b["kv_cache_bytes"] or 0)
    return _fmt(b["decode_tokens_per_s"], ".1f"), _fmt(b["prefill_tokens_per_s"], ".0f"), f"{peak / 2**20:.0f}"


def _bench_cells(b: dict | None) -> str:
    return "".join(f" {v} |" for v in _bench_values(b))


def render_table(rows: list[dict]) -> str:
    head = "| run | stages | format | ppl | Δppl % | mean KL | top-1 % | size MiB | quantize s | peak RSS MiB | verified |"
    bench = any(r.get("bench") for r in rows)  # qwenquant bench columns (batch 1; see each run's bench/BENCH.md)
    if bench:
        head += " decode tok/s | prefill tok/s | bench peak MiB |"
    lines = [head, "|" + "---|" * (14 if bench else 11)]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['stages']} | {r['format']} | {_fmt(r['ppl'], '.3f')} | {_fmt(r['delta_ppl_pct'], '+.3f')} | "
            f"{r['mean_kl']:.5f} | {100 * r['top1_agreement']:.2f} | {r['output_mib']:.1f} | {_fmt(r['quantize_s'], '.1f')} | "
            f"{r['peak_host_mib']:.0f} | {r['verified']} |" + (_bench_cells(r.get("bench")) if bench else "")
        )
    return "\n".join(lines)


def _plots(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["output_mib"], r["mean_kl"])
        ax.annotate(r["name"], (r["output_mib"], r["mean_kl"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("weights on disk (MiB)")
    ax.set_ylabel("mean next-token KL vs source (nats)")
    ax.set_title("accuracy vs size")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_size.png", dpi=120)
    plt.close(fig)
    return ["accuracy_vs_size.png"]


def _bench_notes(rows: list[dict], meta: dict) -> list[str]:
    """How the bench columns were measured, and the source's own bench figures (compare --bench)."""
    benches = [r["bench"] for r in rows if r.get("bench")]
    if not benches:
        return []
    b = benches[0]
    lines = [f"Bench columns: `qwenquant bench`, batch {b['batch']}, context {b['context']}, on {b['device']}"
             f"{' (CPU numbers are not GPU numbers)' if b.get('cpu_note') else ''}; peak is "
             f"{'allocated VRAM' if b['memory_kind'] == 'cuda-allocator' else 'weights + KV cache tensor bytes'}."]
    src = meta.get("source_bench")
    if src:
        decode, prefill, peak = _bench_values(src)
        lines.append(f"Source model: decode {decode} tok/s, prefill {prefill} tok/s, peak {peak} MiB.")
    return lines + [""]


def write_comparison(rows: list[dict], out: Path, meta: dict) -> dict:
    """compare.json + COMPARE.md + plots in `out`."""
    evals = {json.dumps(r["eval"], sort_keys=True) for r in rows}
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(rows, out)
    data = {"schema_version": COMPARE_SCHEMA_VERSION, "meta": meta, "rows": rows, "plots": plots,
            "same_evaluation": len(evals) == 1}
    write_json(out / "compare.json", data)
    note = "" if len(evals) == 1 else "\n**Warning: these runs were not evaluated with the same settings.**\n"
    ev = rows[0]["eval"] if rows else {}
    md = ["# qwenquant comparison", "", f"Perplexity on {ev.get('text')}, windows of {ev.get('window')} tokens "
          f"({ev.get('windows')} windows); mean KL is per token vs the source model.", note, render_table(rows), "",
          *_bench_notes(rows, meta), *[f"![{p}]({p})" for p in plots], ""]
    write_atomic(out / "COMPARE.md", "\n".join(md))
    return data
