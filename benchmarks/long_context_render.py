"""Markdown of `benchmarks/long_context.py`'s results: the "Accuracy at length" and "Chat calibration" sections of
results/long_context.md, written from results/long_context.json, long_context_yarn.json and chat_calibration.json
(every number read from them; the verdicts are comparisons computed here). `render_file` replaces only those two
sections (from their "## " heading to the next one) and leaves the others (KV cache, capacity) as they are.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

ACCURACY = "## Accuracy at length"
CHAT = "## Chat calibration"
CACHE = {"bf16": "bf16", "fp8": "FP8, prefill absmax", "fp8_calibrated": "FP8, calibrated"}
GPTQ = "W4A16 GPTQ s"


def replace_section(text: str, heading: str, body: str) -> str:
    """`text` with the section starting at the line `heading` replaced by `body` (appended when absent)."""
    lines = text.rstrip("\n").split("\n")
    if heading not in lines:
        return "\n".join(lines) + "\n\n" + body.rstrip("\n") + "\n"
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = [""] + lines[end:] if end < len(lines) else []
    return "\n".join(lines[:start] + body.rstrip("\n").split("\n") + tail) + "\n"


def render_file(results: Path) -> None:
    md = results / "long_context.md"
    native = json.loads((results / "long_context.json").read_text())
    yarn_path = results / "long_context_yarn.json"
    yarn = json.loads(yarn_path.read_text()) if yarn_path.exists() else None
    if yarn and not all("kl_by_kv_cache" in r for r in yarn["rows"].get("yarn", {}).values()):
        print(f"warning: {yarn_path.name} is from an older version of the script (no per-cache KL): YaRN part left "
              "out; rerun with --only-yarn")
        yarn = None
    text = replace_section(md.read_text(), ACCURACY, accuracy_section(native, yarn))
    chat = results / "chat_calibration.json"
    if chat.exists():
        text = replace_section(text, CHAT, chat_section(json.loads(chat.read_text())))
    md.write_text(text)
    print(f"wrote {md}")


def _ppl(row: dict, kv: str, w) -> float:
    return row["by_kv_cache"][kv]["perplexity"][str(w)]["perplexity"]


def _kl(row: dict, kv: str) -> float:
    return row["kl_by_kv_cache"][kv]["mean_kl"]


def _labels(rows: dict) -> list[str]:
    return [n.removeprefix("W4A16 GPTQ ") for n in rows if n.startswith(GPTQ)]


def _spread(values: list[float], labels: list[str], fmt: str = ".3f") -> str:
    """"s0 a, s1 b (spread max - min)" for the GPTQ seeds, in order."""
    seeds = ", ".join(f"{s} {v:{fmt}}" for s, v in zip(labels, values))
    return f"{seeds} (spread {max(values) - min(values):{fmt.lstrip('+')}})"


def _loads(report: dict) -> list[float]:
    rows = [r for setting in report["rows"].values() for r in setting.values()]
    return [x for r in rows for x in (r["loadavg_before"][0], r["loadavg_after"][0])]


def setup(native: dict, yarn: dict | None) -> list[str]:
    s = native["settings"]["native"]
    first = next(iter(native["rows"]["native"].values()))
    loads = _loads(native) + (_loads(yarn) if yarn else [])
    q = native["quantize"]
    return [
        ACCURACY, "",
        "Issue 15 part B. Script `benchmarks/long_context.py`; results `results/long_context.json` (native positions) "
        "and `results/long_context_yarn.json` (YaRN); this section is written from them by "
        "`python benchmarks/long_context.py --render`. "
        f"Run {native['date']} at {native['commit']}, float32 on the CPU with {native['torch_threads']} torch threads "
        f"on a shared {native['machine']['cpus']}-core machine (1-minute load average {min(loads):.1f} to "
        f"{max(loads):.1f} while the models ran: the times in the JSON are indicative only).", "",
        f"- Models: the bf16 source ({Path(native['model']).name}, max positions {first['max_position_embeddings']}); "
        "FP8 dynamic (`qwenquant fp8 --kv-cache fp8`: channel FP8 weights, per-token FP8 activations, which "
        "compressed-tensors applies when transformers loads the folder); W4A16 GPTQ g128 seeds "
        f"{', '.join(map(str, native['seeds']))} (`qwenquant gptq --seed S --kv-cache fp8`, builtin calibration "
        "128 x 512). Quantization took " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in q.items()) + ".",
        f"- Text: {first['documents']} WikiText-2 test documents of {first['document_tokens']} tokens (consecutive "
        f"articles joined), each cut into windows of {', '.join(map(str, s['lengths']))} tokens: every window length "
        "predicts (almost) the same tokens and differs only in how much context precedes them. KL: mean next-token "
        "KL(source with a bf16 cache || model with the cache) in nats over the full-length windows.",
        f"- Passkey: a 5-digit key hidden at depths {', '.join(f'{100 * d:.0f}%' for d in s['depths'])} of a "
        f"WikiText haystack, {s['trials']} keys per length, each hidden at every depth "
        f"({len(s['lengths']) * len(s['depths']) * s['trials']} prompts per model and cache; the same prompts for "
        "every model). "
        "`exact`: greedy decoding reproduces the key; `rank-1`: the key's log-likelihood is the highest among "
        f"itself and {s['candidates'] - 1} distractor keys of the same token length (chance "
        f"{1 / s['candidates']:.1f}); `log p`: the key's mean log-likelihood in nats.",
        "- KV cache (`qwenquant/kernels/kv_cache.py`'s static cache, every K/V attention reads, the window's own "
        "included, stored as float8_e4m3 and upcast): bf16; FP8 with one scale per layer for K and for V from each "
        "window's (or prompt's) prefill absmax / 448, later tokens saturating beyond it (`prefill absmax`); FP8 with "
        "the checkpoint's calibrated per-tensor k_scale / v_scale from `--kv-cache fp8` (`calibrated`; the source "
        "has none and uses the FP8 dynamic checkpoint's, calibrated on the same samples).", ""]


def ppl_table(rows: dict, windows: list, caches: list) -> list[str]:
    out = ["| model | KV cache | " + " | ".join(f"ppl @{w}" for w in windows) + " | KL @" + str(windows[-1])
           + " (1e-3 nats) | top-1 agreement |", "|---|---|" + "---:|" * (len(windows) + 2)]
    for name, r in rows.items():
        for kv in caches:
            if kv not in r["by_kv_cache"]:
                continue
            kl = r["kl_by_kv_cache"][kv]
            out.append(f"| {name} | {CACHE[kv]} | " + " | ".join(f"{_ppl(r, kv, w):.2f}" for w in windows)
                       + f" | {1e3 * kl['mean_kl']:.3f} | {kl['top1_agreement']:.4f} |")
    return out


def by_depth(summary: dict) -> dict:
    """depth -> {n, exact, top1} over every length, from passkey.summarize's cells."""
    out: dict = {}
    for c in summary["cells"]:
        d = out.setdefault(c["depth"], {"n": 0, "exact": 0.0, "top1": 0.0})
        d["n"] += c["n"]
        d["exact"] += c["exact"] * c["n"]
        d["top1"] += c["top1"] * c["n"]
    return {k: {"n": v["n"], "exact": v["exact"] / v["n"], "top1": v["top1"] / v["n"]} for k, v in out.items()}


def passkey_table(rows: dict, caches: list) -> list[str]:
    first = next(iter(rows.values()))["by_kv_cache"]["bf16"]["passkey"]
    depths = sorted(by_depth(first))
    out = ["| model | KV cache | " + " | ".join(f"depth {100 * d:.0f}%: exact / rank-1" for d in depths)
           + " | all: exact / rank-1 | mean rank | log p |", "|---|---|" + "---:|" * (len(depths) + 3)]
    for name, r in rows.items():
        for kv in caches:
            pk = r["by_kv_cache"].get(kv, {}).get("passkey")
            if not pk:
                continue
            bd, o = by_depth(pk), pk["overall"]
            out.append(f"| {name} | {CACHE[kv]} | " + " | ".join(f"{bd[d]['exact']:.2f} / {bd[d]['top1']:.2f}"
                                                                 for d in depths)
                       + f" | {o['exact']:.2f} / {o['top1']:.2f} | {o['mean_rank']:.2f} | {o['mean_logp']:.2f} |")
    n = by_depth(first)[depths[0]]["n"]
    return out + ["", f"Each depth cell holds {n} prompts, the `all` column {first['overall']['n']}."]


def position_table(rows: dict) -> list[str]:
    first = next(iter(rows.values()))["by_kv_cache"]["bf16"]["perplexity"]["by_position"]
    out = ["| model | " + " | ".join(f"{p['from']}-{p['to']}" for p in first) + " |", "|---|" + "---:|" * len(first)]
    for name, r in rows.items():
        pos = r["by_kv_cache"]["bf16"]["perplexity"]["by_position"]
        out.append(f"| {name} | " + " | ".join(f"{p['mean_nll']:.3f}" for p in pos) + " |")
    return out


def weight_findings(rows: dict, windows: list) -> list[str]:
    """Quantized vs source with a bf16 cache: KL, the perplexity gap at the shortest and longest window, per seed."""
    lab = _labels(rows)
    src, lo, hi = rows["source"], windows[0], windows[-1]
    gptq = [r for n, r in rows.items() if n.startswith(GPTQ)]

    def gap(r, w):
        return 100 * (_ppl(r, "bf16", w) / _ppl(src, "bf16", w) - 1)

    fp8 = rows.get("FP8 dynamic")
    kls = [1e3 * _kl(r, "bf16") for r in gptq]
    out = [f"- Weights (bf16 cache). KL at {hi} tokens in 1e-3 nats: FP8 dynamic {1e3 * _kl(fp8, 'bf16'):.3f}, "
           f"GPTQ {_spread(kls, lab)}. Perplexity above the source, in %: FP8 dynamic {gap(fp8, lo):+.2f} at {lo} "
           f"tokens and {gap(fp8, hi):+.2f} at {hi}; GPTQ {_spread([gap(r, lo) for r in gptq], lab, '+.2f')} at {lo} "
           f"and {_spread([gap(r, hi) for r in gptq], lab, '+.2f')} at {hi}."]
    growth = [gap(r, hi) - gap(r, lo) for r in gptq]
    spread = max(max(gap(r, w) for r in gptq) - min(gap(r, w) for r in gptq) for w in (lo, hi))
    verdict = ("larger than" if min(abs(g) for g in growth) > spread and len({g > 0 for g in growth}) == 1
               else "within")
    out.append(f"  GPTQ's gap changes by {_spread(growth, lab, '+.2f')} percentage points from {lo} to {hi} tokens, "
               f"{verdict} the larger seed spread of the gap itself ({spread:.2f} points): "
               + ("a context-dependent cost on these documents." if verdict == "larger than" else
                  "no sign that 4-bit weights cost more at long context on this model."))
    return out


def cache_findings(rows: dict) -> list[str]:
    """The FP8 cache's KL on each model, prefill-absmax vs calibrated scales, with GPTQ's seed spread."""
    lab = _labels(rows)
    out, names = [], [n for n in rows if "fp8_calibrated" in rows[n]["kl_by_kv_cache"]]
    for name in names:
        r = rows[name]
        out.append(f"{name} {1e3 * (_kl(r, 'fp8') - _kl(r, 'bf16')):+.3f} / "
                   f"{1e3 * (_kl(r, 'fp8_calibrated') - _kl(r, 'bf16')):+.3f}")
    gptq = [rows[n] for n in names if n.startswith(GPTQ)]
    diff = [1e3 * (_kl(r, "fp8_calibrated") - _kl(r, "fp8")) for r in gptq]
    kl_spread = 1e3 * (max(_kl(r, "bf16") for r in gptq) - min(_kl(r, "bf16") for r in gptq))
    verdict = "beyond" if min(abs(d) for d in diff) > kl_spread and len({d > 0 for d in diff}) == 1 else "within"
    signs = {_kl(rows[n], "fp8_calibrated") > _kl(rows[n], "fp8") for n in names}
    return [f"- FP8 KV cache: KL added over the same model's bf16 cache (prefill absmax / calibrated scales, 1e-3 "
            f"nats): {'; '.join(out)}. Calibrated minus prefill absmax on GPTQ: {_spread(diff, lab)}, {verdict} GPTQ's "
            f"seed spread of its bf16-cache KL ({kl_spread:.3f}); calibrated is "
            + ("higher on every model" if signs == {True} else "lower on every model" if signs == {False}
               else "higher on some models and lower on others") + "."]


def passkey_findings(rows: dict, chance: float) -> list[str]:
    lab = _labels(rows)
    src = rows["source"]["by_kv_cache"]["bf16"]["passkey"]["overall"]
    every = [(n, kv, r["by_kv_cache"][kv]["passkey"]["overall"]) for n, r in rows.items() for kv in r["by_kv_cache"]]
    top1 = [o["top1"] for _, _, o in every]
    exact = [o["exact"] for _, _, o in every]
    keys = src["n"] // len(by_depth(rows["source"]["by_kv_cache"]["bf16"]["passkey"]))  # a key serves every depth
    se = (chance * (1 - chance) / keys) ** 0.5
    above = ("above chance by more than two standard errors (the key read in context raises its likelihood "
             "somewhat)" if src["top1"] > chance + 2 * se else "not clearly above chance")
    gptq = [r["by_kv_cache"]["bf16"]["passkey"]["overall"] for n, r in rows.items() if n.startswith(GPTQ)]
    fp8 = rows["FP8 dynamic"]["by_kv_cache"]["bf16"]["passkey"]["overall"]
    return [f"- Passkey: the source retrieves {src['exact']:.2f} of its {src['n']} prompts exactly (greedy) and ranks "
            f"the key first in {src['top1']:.2f}, {above} (chance {chance:.1f}; {keys} distinct keys, each at every "
            f"depth, binomial standard error at chance {se:.2f}); over every model and cache, exact "
            f"{min(exact):.2f}-{max(exact):.2f} and rank-1 {min(top1):.2f}-{max(top1):.2f}. GPTQ rank-1 (bf16 cache): "
            f"{_spread([o['top1'] for o in gptq], lab, '.2f')}; "
            f"a difference of one prompt is {1 / src['n']:.2f}. The key's mean log p, bf16 cache: source "
            f"{src['mean_logp']:.3f}, FP8 dynamic {fp8['mean_logp'] - src['mean_logp']:+.3f}, GPTQ "
            f"{_spread([o['mean_logp'] - src['mean_logp'] for o in gptq], lab, '+.3f')} relative to it."]


def accuracy_section(native: dict, yarn: dict | None) -> str:
    rows = native["rows"]["native"]
    windows = native["settings"]["native"]["lengths"]
    caches = [c for c in CACHE if any(c in r["by_kv_cache"] for r in rows.values())]
    first_pk = rows["source"]["by_kv_cache"]["bf16"]["passkey"]
    lines = setup(native, yarn)
    lines += ["### Perplexity and KL by window", ""] + ppl_table(rows, windows, caches)
    lines += ["", "Mean NLL by position in the longest window (bf16 cache):", ""] + position_table(rows)
    lines += ["", "### Passkey by depth", ""] + passkey_table(rows, caches)
    lines += ["", "### Findings", ""] + weight_findings(rows, windows) + cache_findings(rows)
    lines += passkey_findings(rows, first_pk["chance_top1"])
    lines += can_show(rows, windows)
    if yarn:
        lines += ["", "### YaRN (factor {:g})".format(yarn["yarn_factor"]), ""] + yarn_part(yarn)
    return "\n".join(lines) + "\n"


def can_show(rows: dict, windows: list) -> list[str]:
    src = rows["source"]
    pos = src["by_kv_cache"]["bf16"]["perplexity"]["by_position"]
    lo, hi = _ppl(src, "bf16", windows[0]), _ppl(src, "bf16", windows[-1])
    pk = src["by_kv_cache"]["bf16"]["passkey"]["overall"]
    far = (f"rises with the window ({lo:.1f} at {windows[0]} tokens, {hi:.1f} at {windows[-1]}) and its NLL with the "
           f"position ({pos[0]['mean_nll']:.2f} in positions {pos[0]['from']}-{pos[0]['to']}, "
           f"{pos[-1]['mean_nll']:.2f} in {pos[-1]['from']}-{pos[-1]['to']}): more context makes it worse, so these "
           "numbers show whether quantization changes the model at length, not whether it keeps a skill at using "
           "far context, which this model does not have" if hi > lo else
           f"falls with the window ({lo:.1f} at {windows[0]} tokens, {hi:.1f} at {windows[-1]}): it uses far context")
    return ["", f"What this model can and cannot show: qwen3-mini is a tiny model (6 layers). Its perplexity {far}. "
            f"It retrieves {pk['exact']:.2f} of the passkeys exactly, so exact accuracy cannot separate the variants "
            "where it is near 0; the rank-1 accuracy and the key's log p can, coarsely, and only differences larger "
            "than the GPTQ seed spread and a few prompts count. Retrieval lost to quantization at 32K-128K needs a "
            "real Qwen3 on a GPU; this run does not claim it."]


def yarn_part(yarn: dict) -> list[str]:
    rows = yarn["rows"]["yarn"]
    s = yarn["settings"]["yarn"]
    windows = s["lengths"]
    src, q = list(rows.values())[:2]
    qname = list(rows)[1]
    d = [100 * (_ppl(q, "bf16", w) / _ppl(src, "bf16", w) - 1) for w in windows]
    first = next(iter(rows.values()))
    pos = src["by_kv_cache"]["bf16"]["perplexity"]["by_position"]
    half = len(pos) // 2
    inside = statistics.fmean(p["mean_nll"] for p in pos[:half])
    beyond = statistics.fmean(p["mean_nll"] for p in pos[half:])
    return [f"The source config with rope_parameters yarn (factor {s['factor']:g}, original 4096, max positions "
            f"{first['max_position_embeddings']}; same weights), quantized with GPTQ seed 0 on that config (one seed: "
            "compare with the native seed spread above); "
            f"{first['documents']} document of {first['document_tokens']} tokens, {s['trials']} passkey keys per "
            "length and depth, bf16 cache.", ""] + ppl_table(rows, windows, ["bf16"]) + [""] + \
        passkey_table(rows, ["bf16"]) + ["", "Mean NLL by position (bf16 cache):", ""] + position_table(rows) + [
        "", f"- {qname} vs source: perplexity {d[0]:+.2f}% at {windows[0]} and {d[1]:+.2f}% at {windows[1]} tokens, "
        f"KL {1e3 * _kl(q, 'bf16'):.3f}e-3 nats at {windows[1]}. The source's mean NLL is {inside:.2f} in the first "
        f"half of the {windows[1]}-token window and {beyond:.2f} beyond the original 4096 positions: YaRN lets the "
        "model run past its original positions; it does not make it use that context here."]


def chat_section(chat: dict) -> str:
    groups: dict = {}
    for r in chat["rows"]:
        groups.setdefault((r["method"], r["calib"]), []).append(r)

    def cell(rs, key):
        v = [1e3 * r[key] for r in rs]
        return f"{statistics.fmean(v):.3f} ± {(max(v) - min(v)) / 2:.3f}"

    lines = [CHAT, "", "`--calib chat` (calibration text rendered through the model's chat template, thinking and "
             "non-thinking turns) is measured in `results/chat_calibration.md` (script "
             f"`benchmarks/chat_calibration.py`, JSON `results/chat_calibration.json`, seeds {chat['meta']['seeds']}). "
             "Headline, read from the JSON: "
             "mean per-token KL(source || quantized) in 1e-3 nats, mean ± half the seed spread, on held-out chat text "
             "and on WikiText-2:", "", "| method | calibration | chat text | WikiText-2 |", "|---|---|---:|---:|"]
    for (method, calib), rs in groups.items():
        lines.append(f"| {method} | {calib} | {cell(rs, 'chat_kl_all')} | {cell(rs, 'plain_kl')} |")
    lines.append("")
    for method in dict.fromkeys(m for m, _ in groups):
        plain, chat_rows = groups.get((method, "builtin")), groups.get((method, "chat"))
        if plain and chat_rows:
            lines.append(f"- {method}, chat vs builtin calibration: " + ", ".join(
                _change(plain, chat_rows, key, label) for key, label in
                (("chat_kl_all", "chat text"), ("plain_kl", "WikiText-2"))) + ".")
    return "\n".join(lines) + "\n"


def _change(before: list[dict], after: list[dict], key: str, label: str) -> str:
    """"label -x% (beyond / within the seeds' half-spreads)" for the mean KL from `before` to `after`."""
    a, b = ([r[key] for r in rs] for rs in (before, after))
    diff, noise = statistics.fmean(b) - statistics.fmean(a), (max(a) - min(a) + max(b) - min(b)) / 2
    verdict = "beyond" if abs(diff) > noise else "within"
    return f"{label} {100 * diff / statistics.fmean(a):+.1f}% ({verdict} the sum of the half-spreads)"
