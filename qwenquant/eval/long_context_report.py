"""The long-context part of `qwenquant eval`'s report: eval_report.json's `long_context` section {text, settings,
model, baseline (each `long_context.measure_long_context`'s result or None)}, its line in the --json summary, and
its EVAL.md tables (perplexity by window, NLL by position, passkey accuracy by length, model beside baseline)."""

from __future__ import annotations


def long_context_section(text_desc: str | None, measured: dict, base_measured: dict | None) -> dict | None:
    m = measured.get("long_context")
    if m is None:
        return None
    b = None if base_measured is None else base_measured.get("long_context")
    return {"text": text_desc, "settings": m["settings"], "model": m, "baseline": b}


def long_context_summary(section: dict | None) -> dict | None:
    """{kv: {perplexity: {window: ppl}, passkey_exact, passkey_top1, baseline_...}} for the --json line."""
    if section is None:
        return None
    out = {}
    for kv, e in section["model"]["by_kv_cache"].items():
        row = _brief(e)
        b = (section["baseline"] or {}).get("by_kv_cache", {}).get(kv)
        if b is not None:
            row |= {f"baseline_{k}": v for k, v in _brief(b).items()}
        out[kv] = row
    return out


def _brief(e: dict) -> dict:
    pk = (e.get("passkey") or {}).get("overall") or {}
    return {"perplexity": {w: v["perplexity"] for w, v in e["perplexity"].items() if w != "by_position"},
            "passkey_exact": pk.get("exact"), "passkey_top1": pk.get("top1")}


def _cell(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def _ppl_rows(kv: str, m: dict, b: dict | None) -> list[str]:
    rows = []
    for w, v in m["perplexity"].items():
        if w == "by_position":
            continue
        bv = None if b is None else b["perplexity"].get(w, {}).get("perplexity")
        delta = None if bv is None else 100.0 * (v["perplexity"] / bv - 1.0)
        rows.append(f"| {kv} | {w} | {v['windows']} | {_cell(bv, '{:.3f}')} | {v['perplexity']:.3f} | "
                    f"{_cell(delta, '{:+.3f}%')} |")
    return rows


def _position_rows(kv: str, m: dict, b: dict | None) -> list[str]:
    base = {} if b is None else {(p["from"], p["to"]): p["mean_nll"] for p in b["perplexity"].get("by_position", [])}
    return [f"| {kv} | {p['from']}-{p['to']} | {_cell(base.get((p['from'], p['to'])), '{:.4f}')} | "
            f"{p['mean_nll']:.4f} |" for p in m["perplexity"].get("by_position", [])]


def _passkey_rows(kv: str, m: dict, b: dict | None) -> list[str]:
    if not m.get("passkey"):
        return []
    base = {} if b is None or not b.get("passkey") else {(c["length"], c["depth"]): c for c in b["passkey"]["cells"]}
    rows = []
    for c in m["passkey"]["cells"]:
        bc = base.get((c["length"], c["depth"])) or {}
        rows.append(f"| {kv} | {c['length']} | {100 * c['depth']:.0f}% | {c['n']} | {_cell(bc.get('exact'), '{:.2f}')} | "
                    f"{c['exact']:.2f} | {_cell(bc.get('top1'), '{:.2f}')} | {c['top1']:.2f} | "
                    f"{_cell(bc.get('mean_rank'), '{:.2f}')} | {c['mean_rank']:.2f} |")
    return rows


def long_context_lines(section: dict) -> list[str]:
    """EVAL.md's "Long context" section."""
    m, b, s = section["model"], section["baseline"], section["settings"]
    rope = m.get("rope") or {}
    lines = ["", "## Long context", "",
             f"{m['documents']} documents of {m['document_tokens']} tokens from {section['text']} (consecutive articles "
             f"joined), cut into windows of {', '.join(map(str, s['lengths']))} tokens: every window length predicts "
             f"the same tokens with less context before them. Model rope: {rope.get('type')}"
             + (f" (factor {rope.get('factor')}, original {rope.get('original_max_position_embeddings')})"
                if rope.get("type") not in (None, "default") else "")
             + f", max positions {m.get('max_position_embeddings')}. FP8 KV cache scales: {s['kv_scales']}.", "",
             "| KV cache | window | windows | baseline ppl | ppl | change |", "|---|---|---|---|---|---|"]
    for kv, e in m["by_kv_cache"].items():
        lines += _ppl_rows(kv, e, None if b is None else b["by_kv_cache"].get(kv))
    lines += ["", f"Mean NLL by position in the {m['document_tokens']}-token window:", "",
              "| KV cache | positions | baseline | model |", "|---|---|---|---|"]
    for kv, e in m["by_kv_cache"].items():
        lines += _position_rows(kv, e, None if b is None else b["by_kv_cache"].get(kv))
    if s["trials"]:
        lines += ["", f"Passkey retrieval: {s['trials']} keys per length (seed {s['seed']}; the same prompts for both "
                  f"models), needle at each depth; exact = greedy decoding returns the key, top-1 = the key is the "
                  f"most likely of {s['candidates']} candidates (chance {1 / s['candidates']:.2f}), rank 0 is best.", "",
                  "| KV cache | length | depth | n | baseline exact | exact | baseline top-1 | top-1 | baseline rank "
                  "| rank |", "|---|---|---|---|---|---|---|---|---|---|"]
        for kv, e in m["by_kv_cache"].items():
            lines += _passkey_rows(kv, e, None if b is None else b["by_kv_cache"].get(kv))
    return lines
