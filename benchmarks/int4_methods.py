#!/usr/bin/env python
"""INT weight-only methods side by side: qwenquant RTN / GPTQ / AWQ vs llm-compressor GPTQ / AWQ (see README.md).

    python benchmarks/int4_methods.py --plan                 # list the rows that would run and exit
    python benchmarks/int4_methods.py --smoke                # tiny settings, ~10 min: int4_methods_smoke.{json,md}
    nohup python benchmarks/int4_methods.py > /tmp/int4_methods.log 2>&1 &   # full run: int4_methods.{json,md}
    python benchmarks/int4_methods.py --resume               # continue an interrupted run (partial file)
    python benchmarks/int4_methods.py --report-only          # rewrite the tables from the partial file

Every row is quantized from the same bf16 source with the SAME calibration token ids (one [num_samples, seq_len]
tensor per seed, built by `qwenquant.calibration.load_calibration(calib, tok, N, seq_len, seed)`; llm-compressor
gets the identical tensor through a .pt file and its JSON's calib_sha256 is checked against ours), and evaluated by
the same code (`harness.Harness`): perplexity on the WikiText-2 test, mean KL(source || variant) and top-1 agreement
on the first --kl-windows windows.

Rows:
* ours: RTN (sym; calibration-free: once; asym too, as the like-for-like baseline of asym AWQ), GPTQ (sym,
  act-order static, damp 0.01), AWQ (asym, clip on) at each of --bits with group size 128, seeds --seeds;
* ablation: AWQ without the input_layernorm -> q/k/v scaling (`AWQStage(norm_mappings=False)`), same bits / seeds;
* llm-compressor 0.14 (its own venv, benchmarks/setup_llmcompressor.sh) through benchmarks/llmcompressor_baseline.py:
  GPTQModifier W4A16 (sym, actorder static) and AWQModifier (asym) at 4 bits, GPTQ at 3 bits, seeds
  --llmc-gptq-seeds / --llmc-awq-seeds; the saved compressed-tensors folder is evaluated with
  `Harness.evaluate_external` (AWQ's asymmetric packing needs `patch_ct_asym_meta_loading()` to load).

Wall time: ours = `run_sequential` (calibration capture + stages + propagation), theirs = `oneshot()` (from its
JSON); both single-threaded (--threads, passed on to llm-compressor), run one after the other, never concurrently.
Memory: `quant_rss_delta` = peak RSS during the quantization call minus the RSS just before it (same definition for
both tools, sampled every 20 ms); absolute process peaks are in the JSON (not comparable: our process also holds
the source model and the stored source log-probs, theirs the llm-compressor imports).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import harness as H  # noqa: E402
from harness import (  # noqa: E402
    _log,
    add_harness_args,
    harness_from_args,
    load_partial,
    save_partial,
    write_results,
)
from qwenquant.calibration import samples_hash  # noqa: E402
from qwenquant.stages.awq import AWQStage  # noqa: E402
from qwenquant.stages.gptq import GPTQStage  # noqa: E402
from qwenquant.stages.rtn import RTNStage  # noqa: E402

LLMC_PY = BENCH / ".venv-llmcompressor" / "bin" / "python"
LLMC_SCRIPT = BENCH / "llmcompressor_baseline.py"
GROUP = 128
# Rows whose perplexity runs on the whole ppl window set (the others: ppl on the KL tokens only, `ppl_kl`).
FULL_PPL = {
    "all": ".*",
    "none": "a^",
    "main": r"^(ours (RTN sym|RTN asym|GPTQ|AWQ)|llmc \w+) w\d",  # everything but the AWQ ablation
}

# -- peak RSS of the quantization call itself ------------------------------------------------------------------------


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


_QUANT_MEM: dict = {}
_orig_run_sequential = H.run_sequential


def _measured_run_sequential(*args, **kwargs):
    """`run_sequential` as `Harness.evaluate_variant` calls it, with the RSS before and the peak during it."""
    before = _current_rss()
    cpu = time.process_time()
    with H.RSSSampler() as s:
        out = _orig_run_sequential(*args, **kwargs)
    _QUANT_MEM.update(before=before, peak=s.peak, cpu_s=time.process_time() - cpu)
    return out


H.run_sequential = _measured_run_sequential  # evaluate_variant looks it up in the harness module

# Runs llmcompressor_baseline.main() in the llm-compressor venv with oneshot() wrapped to sample the RSS the same way.
LLMC_WRAPPER = r'''
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
out_path = sys.argv[2]
argv = sys.argv[3:]
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
import llmcompressor
orig = llmcompressor.oneshot
info = {}
def oneshot(*a, **k):
    info["rss_before_oneshot"] = rss()
    cpu = time.process_time()
    peak = [info["rss_before_oneshot"]]
    stop = threading.Event()
    def run():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            stop.wait(0.02)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        return orig(*a, **k)
    finally:
        stop.set(); t.join()
        info["cpu_s_oneshot"] = time.process_time() - cpu
        info["peak_rss_during_oneshot"] = max(peak[0], rss())
llmcompressor.oneshot = oneshot
import llmcompressor_baseline as lb
rc = lb.main(argv)
with open(out_path, "w") as f:
    json.dump(info, f)
sys.exit(rc)
'''

# -- plan ----------------------------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip() != ""]


def variant_name(tool: str, method: str, bits: int) -> str:
    return f"{tool} {method} w{bits}g{GROUP}"


def plan(args) -> list[dict]:
    """Rows in priority order (an interrupted run keeps the most decision-relevant rows)."""
    seeds, bits_list = _ints(args.seeds), _ints(args.bits)
    full_re = re.compile(FULL_PPL.get(args.full_ppl, args.full_ppl))
    rows: list[dict] = []

    def ours(method: str, bits: int, stages, seed: int, **tags):
        name = variant_name("ours", method, bits)
        rows.append({"kind": "ours", "name": name, "stages": stages, "seed": seed,
                     "tags": {"tool": "qwenquant", "method": method, "bits": bits, "group_size": GROUP,
                              "full_ppl": bool(full_re.search(name)), **tags}})

    def llmc(scheme: str, bits: int, seed: int):
        name = variant_name("llmc", scheme.upper(), bits)
        rows.append({"kind": "llmc", "name": name, "scheme": scheme, "bits": bits, "seed": seed,
                     "tags": {"tool": "llm-compressor", "method": scheme.upper(), "bits": bits, "group_size": GROUP,
                              "symmetric": scheme == "gptq", "full_ppl": bool(full_re.search(name))}})

    def gptq(b):
        return [GPTQStage(bits=b, group_size=GROUP, symmetric=True, actorder="static", dampening_frac=0.01)]

    def awq(b, norm=True):
        return [AWQStage(bits=b, group_size=GROUP, symmetric=False, clip=True, norm_mappings=norm)]

    first, rest = seeds[:1], seeds[1:]
    for b in bits_list:  # calibration-free baseline: once (seed 0 only propagates activations)
        ours("RTN sym", b, [RTNStage(bits=b, group_size=GROUP, symmetric=True)], seeds[0], symmetric=True)
    for b in bits_list:  # like-for-like baseline of asymmetric AWQ
        ours("RTN asym", b, [RTNStage(bits=b, group_size=GROUP, symmetric=False)], seeds[0], symmetric=False)
    for b in bits_list:
        for s in first:
            ours("GPTQ", b, gptq(b), s, symmetric=True)
            ours("AWQ", b, awq(b), s, symmetric=False, norm_mappings=True)
    if not args.no_llmc:
        for b in bits_list:
            for s in _ints(args.llmc_gptq_seeds)[:1] if b == 4 else _ints(args.llmc_gptq3_seeds)[:1]:
                llmc("gptq", b, s)
            if b == 4 or args.llmc_awq3:
                for s in _ints(args.llmc_awq_seeds)[:1]:
                    llmc("awq", b, s)
    for b in bits_list:  # the ablation the issue asks for: AWQ without input_layernorm -> q/k/v scaling
        for s in seeds:
            ours("AWQ no-qkv-scale", b, awq(b, norm=False), s, symmetric=False, norm_mappings=False)
    for b in bits_list:
        for s in rest:
            ours("GPTQ", b, gptq(b), s, symmetric=True)
            ours("AWQ", b, awq(b), s, symmetric=False, norm_mappings=True)
    if not args.no_llmc:
        for b in bits_list:
            for s in (_ints(args.llmc_gptq_seeds) if b == 4 else _ints(args.llmc_gptq3_seeds))[1:]:
                llmc("gptq", b, s)
        for b in bits_list:
            if b == 4 or args.llmc_awq3:
                for s in _ints(args.llmc_awq_seeds)[1:]:
                    llmc("awq", b, s)
    for b in bits_list:  # more calibration seeds for the ablation only (KL tokens only, paired with/without)
        for s in _ints(args.ablation_extra_seeds):
            for norm, method in ((True, "AWQ"), (False, "AWQ no-qkv-scale")):
                name = variant_name("ours", method, b) + " (extra seeds)"
                rows.append({"kind": "ours", "name": name, "stages": awq(b, norm=norm), "seed": s,
                             "tags": {"tool": "qwenquant", "method": method, "bits": b, "group_size": GROUP,
                                      "symmetric": False, "norm_mappings": norm, "extra_seed": True,
                                      "full_ppl": False}})
    if args.only:
        rows = [r for r in rows if re.search(args.only, r["name"])]
    return rows


def row_key(name: str, seed) -> str:
    return f"{name}|{seed}"


# -- llm-compressor rows -------------------------------------------------------------------------------------------


def llmc_quantize(model_path, calib: torch.Tensor, seed: int, scheme: str, bits: int, threads, work: Path,
                  tag_suffix: str = "") -> tuple[dict, dict, Path, float]:
    """Run benchmarks/llmcompressor_baseline.py in its venv on exactly `calib`; returns (its JSON, the RSS / CPU
    of its oneshot() call, the output folder, the whole subprocess' wall seconds)."""
    calib_path = work / f"calib_n{calib.shape[0]}_l{calib.shape[1]}_s{seed}.pt"
    if not calib_path.is_file():
        torch.save(calib.clone(), calib_path)
    tag = f"llmc-{scheme}-w{bits}g{GROUP}-n{calib.shape[0]}-s{seed}{tag_suffix}"
    out_dir, json_path, rss_path = work / tag, work / f"{tag}.json", work / f"{tag}.rss.json"
    wrapper = work / "_llmc_wrapper.py"
    wrapper.write_text(LLMC_WRAPPER)
    cmd = [str(LLMC_PY), str(wrapper), str(BENCH), str(rss_path),
           "--model", str(model_path), "--calib-ids", str(calib_path), "--scheme", scheme, "--bits", str(bits),
           "--group-size", str(GROUP), "--out", str(out_dir), "--json", str(json_path)]
    if threads:
        cmd += ["--threads", str(threads)]
    _log(f"llm-compressor {scheme} w{bits} seed={seed}: " + " ".join(cmd[3:]))
    t = time.perf_counter()
    with open(work / f"{tag}.log", "w") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(BENCH.parent))
    process_s = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"llm-compressor {tag} failed (rc {proc.returncode}); see {work / (tag + '.log')}")
    res = json.loads(json_path.read_text())
    if res["calib_sha256"] != samples_hash(calib):
        raise RuntimeError(f"{tag}: llm-compressor was calibrated on different tokens than qwenquant")
    return res, json.loads(rss_path.read_text()), out_dir, process_s


def run_llmc(h, job: dict, args, work: Path) -> dict:
    seed, scheme, bits = job["seed"], job["scheme"], job["bits"]
    res, mem, out_dir, process_s = llmc_quantize(h.resolved.path, h.calibration(seed), seed, scheme, bits,
                                                 args.threads, work)
    row = h.evaluate_external(job["name"], out_dir, tags=job["tags"], full_ppl=job["tags"]["full_ppl"])
    row.update(
        seed=seed,
        calib_dependent=True,
        calib_sha256=res["calib_sha256"],
        quant_wall_s=res["wall_s"],
        quant_cpu_s=mem.get("cpu_s_oneshot"),
        llmc_process_wall_s=process_s,
        llmc_load_s=res.get("load_s"),
        llmc_save_s=res.get("save_s"),
        quant_rss_before_bytes=mem["rss_before_oneshot"],
        quant_peak_rss_bytes=mem["peak_rss_during_oneshot"],
        quant_rss_delta_bytes=mem["peak_rss_during_oneshot"] - mem["rss_before_oneshot"],
        llmc_ru_maxrss_bytes=res["peak_rss_bytes"],
        llmc=res,
    )
    return row


def run_ours(h, job: dict) -> dict:
    _QUANT_MEM.clear()
    row = h.evaluate_variant(job["name"], job["stages"], seed=job["seed"], tags=job["tags"],
                             full_ppl=job["tags"]["full_ppl"])
    row.update(
        quant_cpu_s=_QUANT_MEM.get("cpu_s"),
        quant_rss_before_bytes=_QUANT_MEM.get("before"),
        quant_peak_rss_bytes=_QUANT_MEM.get("peak"),
        quant_rss_delta_bytes=(_QUANT_MEM["peak"] - _QUANT_MEM["before"]) if _QUANT_MEM else None,
    )
    return row


# -- aggregation and findings --------------------------------------------------------------------------------------


def _vals(rs, key):
    return [r[key] for r in rs if r.get(key) is not None]


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _half(xs):
    return (max(xs) - min(xs)) / 2 if len(xs) > 1 else None


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per variant: means over seeds and half-ranges (max - min) / 2."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["variant"], []).append(r)
    out = []
    for name, rs in groups.items():
        g = {"variant": name, "tool": rs[0].get("tool", "-"), "method": rs[0].get("method", "source"),
             "bits": rs[0].get("bits", 16), "seeds": ",".join(str(r["seed"]) for r in rs if r.get("seed") is not None)
             or "-", "n": len(rs), "full_ppl": all(r.get("ppl") is not None for r in rs), "rows": rs}
        for key in ("ppl", "delta_ppl_pct", "ppl_kl", "delta_ppl_kl_pct", "mean_kl", "top1", "quant_wall_s",
                    "quant_cpu_s", "quant_rss_delta_bytes", "quant_peak_rss_bytes", "eval_wall_s"):
            v = _vals(rs, key)
            g[key], g[key + "_half"] = _mean(v), _half(v)
            g[key + "_all"] = v
        out.append(g)
    return out


def _pm(v, half, spec, half_spec=None):
    if v is None:
        return "-"
    s = format(v, spec)
    if half is not None:
        s += " ± " + format(half, half_spec or spec.lstrip("+"))
    return s


TABLE_HEAD = ("| method | bits | seeds | WikiText-2 ppl | Δppl % (full test) | Δppl % (KL tokens) | mean KL (nats) "
              "| top-1 | quant wall s | quant CPU s | quant ΔRSS MiB |")


def table_md(aggs: list[dict]) -> str:
    lines = [TABLE_HEAD, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g in aggs:
        mib = None if g["quant_rss_delta_bytes"] is None else g["quant_rss_delta_bytes"] / 2**20
        lines.append("| " + " | ".join([
            g["variant"] if g["method"] != "source" else g["variant"],
            str(g["bits"]),
            g["seeds"],
            _pm(g["ppl"], g["ppl_half"], ".3f") if g["full_ppl"] else "-",
            _pm(g["delta_ppl_pct"], g["delta_ppl_pct_half"], "+.3f") if g["full_ppl"] else "-",
            _pm(g["delta_ppl_kl_pct"], g["delta_ppl_kl_pct_half"], "+.3f"),
            _pm(g["mean_kl"], g["mean_kl_half"], ".3e", ".1e"),
            _pm(g["top1"], g["top1_half"], ".4f"),
            _pm(g["quant_wall_s"], g["quant_wall_s_half"], ".1f"),
            _pm(g["quant_cpu_s"], g["quant_cpu_s_half"], ".1f"),
            "-" if mib is None else f"{mib:.0f}",
        ]) + " |")
    return "\n".join(lines)


def compare(a: dict | None, b: dict | None, key: str) -> dict | None:
    """a vs b on `key` (lower is better): difference of means and whether the seed values are separated."""
    if not a or not b or not a[key + "_all"] or not b[key + "_all"]:
        return None
    av, bv = a[key + "_all"], b[key + "_all"]
    diff = a[key] - b[key]
    noise = max(x for x in (a[key + "_half"], b[key + "_half"], 0.0) if x is not None)
    if max(av) < min(bv):
        verdict = "better"
    elif min(av) > max(bv):
        verdict = "worse"
    else:
        verdict = "within seed noise"
    return {"a": a["variant"], "b": b["variant"], "metric": key, "a_mean": a[key], "b_mean": b[key], "diff": diff,
            "rel_diff_pct": 100.0 * diff / b[key] if b[key] else None, "seed_half_range": noise, "verdict": verdict,
            "a_values": av, "b_values": bv}


def _fmt_cmp(c: dict | None, key_spec: str) -> str:
    if c is None:
        return "n/a"
    rel = f", {c['rel_diff_pct']:+.1f}%" if c["rel_diff_pct"] is not None and c["metric"] == "mean_kl" else ""
    return (f"{format(c['a_mean'], key_spec)} vs {format(c['b_mean'], key_spec)} "
            f"(Δ {format(c['diff'], '+' + key_spec.lstrip('+'))}{rel}; seed ±{format(c['seed_half_range'], key_spec.lstrip('+'))}) "
            f"-> **{c['verdict']}**")


def findings(aggs: list[dict], rows: list[dict], bits_list: list[int]) -> tuple[str, dict]:
    by = {g["variant"]: g for g in aggs}

    def get(tool, method, b):
        return by.get(variant_name(tool, method, b))

    ppl_key = "delta_ppl_pct"
    out, claims = ["## Findings (computed from the rows below)", ""], {}
    out.append("Lower is better for KL and Δppl. `better`/`worse` = every seed of one side beats every seed of the "
               "other; otherwise `within seed noise`. ± = half-range (max - min) / 2 over calibration seeds.")
    out.append("")
    for b in bits_list:
        rtn, rtn_a = get("ours", "RTN sym", b), get("ours", "RTN asym", b)
        for m, base in (("GPTQ", rtn), ("AWQ", rtn), ("AWQ", rtn_a)):
            x = get("ours", m, b)
            if not x or not base:
                continue
            ck, cp = compare(x, base, "mean_kl"), compare(x, base, ppl_key if x["full_ppl"] and base["full_ppl"]
                                                          else "delta_ppl_kl_pct")
            claims[f"ours {m} vs {base['variant']}"] = {"kl": ck, "ppl": cp}
            out.append(f"- {b}-bit g{GROUP}: ours {m} vs {base['method']}: KL {_fmt_cmp(ck, '.3e')}; "
                       f"{'Δppl (full test)' if cp and cp['metric'] == ppl_key else 'Δppl (KL tokens)'} "
                       f"{_fmt_cmp(cp, '+.3f')}")
    for b in bits_list:
        for m in ("GPTQ", "AWQ"):
            x, y = get("ours", m, b), get("llmc", m, b)
            if not x or not y:
                continue
            ck = compare(x, y, "mean_kl")
            both_full = x["full_ppl"] and y["full_ppl"]
            cp = compare(x, y, ppl_key if both_full else "delta_ppl_kl_pct")
            ct = compare(x, y, "quant_wall_s")
            claims[f"ours {m} w{b} vs llm-compressor"] = {"kl": ck, "ppl": cp, "wall": ct}
            mem, cpu = "", ""
            if x["quant_cpu_s"] is not None and y["quant_cpu_s"] is not None:
                claims[f"ours {m} w{b} vs llm-compressor"]["cpu"] = compare(x, y, "quant_cpu_s")
                cpu = (f"; CPU {x['quant_cpu_s']:.1f} s vs {y['quant_cpu_s']:.1f} s "
                       f"({y['quant_cpu_s'] / x['quant_cpu_s']:.2f}x)")
            if x["quant_rss_delta_bytes"] is not None and y["quant_rss_delta_bytes"] is not None:
                mem = (f"; quant ΔRSS {x['quant_rss_delta_bytes'] / 2**20:.0f} vs "
                       f"{y['quant_rss_delta_bytes'] / 2**20:.0f} MiB")
            out.append(f"- {b}-bit g{GROUP}: ours {m} vs llm-compressor {m}: KL {_fmt_cmp(ck, '.3e')}; "
                       f"{'Δppl (full test)' if both_full else 'Δppl (KL tokens)'} {_fmt_cmp(cp, '+.3f')}; wall "
                       f"{x['quant_wall_s']:.1f} s vs {y['quant_wall_s']:.1f} s "
                       f"(theirs/ours {y['quant_wall_s'] / x['quant_wall_s']:.2f}x){cpu}{mem}")
    abl = []
    for b in bits_list:  # paired by calibration seed, pooling the main rows and any '(extra seeds)' rows
        def pick(norm):
            return {r["seed"]: r for r in rows if r.get("tool") == "qwenquant" and r.get("bits") == b
                    and r.get("method") == ("AWQ" if norm else "AWQ no-qkv-scale")}
        on, off = pick(True), pick(False)
        seeds = sorted(set(on) & set(off))
        if not seeds:
            continue
        d_kl = [100.0 * (on[s]["mean_kl"] - off[s]["mean_kl"]) / off[s]["mean_kl"] for s in seeds]
        d_ppl = [on[s]["delta_ppl_kl_pct"] - off[s]["delta_ppl_kl_pct"] for s in seeds]
        d_top1 = [on[s]["top1"] - off[s]["top1"] for s in seeds]
        wins = sum(1 for d in d_kl if d < 0)
        kl_on, kl_off = _mean([on[s]["mean_kl"] for s in seeds]), _mean([off[s]["mean_kl"] for s in seeds])
        wall_on = _mean([on[s]["quant_wall_s"] for s in seeds])
        wall_off = _mean([off[s]["quant_wall_s"] for s in seeds])
        claims[f"AWQ qkv scaling w{b}"] = {
            "seeds": seeds, "kl_with": [on[s]["mean_kl"] for s in seeds], "kl_without": [off[s]["mean_kl"] for s in seeds],
            "kl_rel_diff_pct_per_seed": d_kl, "ppl_kl_diff_per_seed": d_ppl, "top1_diff_per_seed": d_top1,
            "with_lower_kl_in": f"{wins}/{len(seeds)}", "wall_with_s": wall_on, "wall_without_s": wall_off}
        abl.append((b, wins, len(seeds), _mean(d_kl)))
        out.append(
            f"- AWQ input_layernorm -> q/k/v scaling, {b}-bit, paired over seeds {','.join(map(str, seeds))}: mean KL "
            f"{kl_on:.3e} with vs {kl_off:.3e} without; per-seed KL change with it "
            f"{', '.join(f'{d:+.1f}%' for d in d_kl)} (mean {_mean(d_kl):+.1f}%; lower with it in {wins}/{len(seeds)}"
            f" seeds); Δppl (KL tokens) change {', '.join(f'{d:+.2f}' for d in d_ppl)} points; top-1 change "
            f"{', '.join(f'{d:+.4f}' for d in d_top1)}; quant wall {wall_on:.1f} vs {wall_off:.1f} s")
    if abl:
        all_with = all(w == n for _, w, n, _ in abl)
        none_with = all(w == 0 for _, w, n, _ in abl)
        rec = ("keep norm_mappings=True (lower KL with it at every seed and bit width)" if all_with else
               "norm_mappings=False (lower KL without it at every seed and bit width)" if none_with else
               "no consistent difference: the sign of the per-seed KL change varies")
        claims["AWQ qkv scaling recommendation"] = rec
        out.append(f"- AWQ qkv-scaling default: {rec}.")
    return "\n".join(out), claims


def report(h, rows: list[dict], args, name: str, smoke_note: str = "") -> None:
    src = h.source_row()
    src.update(tool="-", method="source", bits=16)
    all_rows = [src] + rows
    aggs = aggregate(all_rows)
    order = {"source": 0, "RTN sym": 1, "RTN asym": 2, "GPTQ": 3, "AWQ": 4, "AWQ no-qkv-scale": 5}
    aggs.sort(key=lambda g: (-(g["bits"]), order.get(g["method"], 9), g["tool"] != "qwenquant"))
    text, claims = findings(aggs, all_rows, _ints(args.bits))
    table = table_md(aggs)
    print(table)
    print(text)
    meta = h.meta() | {
        "benchmark": "int4_methods",
        "group_size": GROUP,
        "full_ppl_rows": args.full_ppl,
        "claims": claims,
        "llmc_python": str(LLMC_PY),
        "wall_time_definition": "ours: run_sequential (capture + stages + propagation); llm-compressor: oneshot()",
        "rss_definition": "quant_rss_delta = peak RSS during the quantization call - RSS just before it (20 ms)",
    }
    summary = "\n".join([
        smoke_note,
        "## Table (mean over calibration seeds ± half-range (max - min) / 2)",
        "",
        "`Δppl % (full test)`: on every WikiText-2 test window the harness evaluates (`-` = row run on the KL "
        "tokens only); `Δppl % (KL tokens)`: perplexity on the KL windows, vs the source on the same tokens. "
        "`quant wall s`: ours = qwenquant sequential pipeline, llmc = llm-compressor `oneshot()`. "
        "`quant ΔRSS`: peak RSS during quantization minus RSS before it.",
        "",
        table,
        "",
        text,
        "",
    ])
    for g in aggs:  # the harness' tables group by variant, too
        g.pop("rows", None)
    write_results(name, all_rows, meta, out_dir=args.out_dir, summary_md=summary, print_rows=False)


# -- timing only: both tools back to back, alternating, quantization only -------------------------------------------


TIMING_METHODS = {"gptq4": ("gptq", 4), "awq4": ("awq", 4), "gptq3": ("gptq", 3)}


def timing(args) -> int:
    """`--timing-reps N`: quantization wall / CPU time and ΔRSS of ours vs llm-compressor, run alternately
    (ours, theirs, ours, theirs, ...) on the same seed-0 calibration ids with nothing else of ours running, so that
    both see the same machine load. No evaluation. Writes results/<name>_timing.{json,md}."""
    import copy

    from qwenquant.calibration import load_calibration
    from qwenquant.model.loader import load_model, resolve_model
    from qwenquant.state import QuantState
    from qwenquant.recipe import CalibrationConfig, ExportConfig, ModelConfig, Recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model)
    source, tok = load_model(resolved, "bfloat16")
    source.to("cpu")
    calib = load_calibration(args.calib, tok, args.num_samples, args.seq_len, 0)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    stages_of = {
        "gptq": lambda b: [GPTQStage(bits=b, group_size=GROUP, symmetric=True, actorder="static",
                                     dampening_frac=0.01)],
        "awq": lambda b: [AWQStage(bits=b, group_size=GROUP, symmetric=False, clip=True)],
    }
    results = []
    for rep in range(args.timing_reps):
        for key in args.timing_methods.split(","):
            scheme, bits = TIMING_METHODS[key]
            stages = stages_of[scheme](bits)
            recipe = Recipe(model=ModelConfig(id=str(resolved.path)), device="cpu",
                            calibration=CalibrationConfig(args.calib, args.num_samples, args.seq_len, 0),
                            stages=stages, export=ExportConfig(format=H._export_format_for(stages)))
            order = ("ours", "llmc") if rep % 2 == 0 else ("llmc", "ours")
            for tool in order:
                load = os.getloadavg()[0]
                if tool == "ours":
                    model = copy.deepcopy(source)
                    before, cpu, t = _current_rss(), time.process_time(), time.perf_counter()
                    with H.RSSSampler() as rss:
                        H.run_sequential(model, resolved.adapter, calib, recipe.stages, torch.device("cpu"),
                                         QuantState())
                    r = {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - cpu,
                         "rss_delta_bytes": rss.peak - before}
                    del model
                else:
                    res, mem, _, process_s = llmc_quantize(resolved.path, calib, 0, scheme, bits, args.threads,
                                                           args.work_dir, f"-timing{rep}")
                    r = {"wall_s": res["wall_s"], "cpu_s": mem["cpu_s_oneshot"], "process_wall_s": process_s,
                         "rss_delta_bytes": mem["peak_rss_during_oneshot"] - mem["rss_before_oneshot"]}
                r |= {"rep": rep, "method": key, "tool": tool, "loadavg_1min_before": load}
                _log(f"timing rep {rep} {key} {tool}: wall {r['wall_s']:.1f}s cpu {r['cpu_s']:.1f}s "
                     f"ΔRSS {r['rss_delta_bytes'] / 2**20:.0f} MiB (load {load:.1f})")
                results.append(r)
    lines = ["| method | tool | wall s (each rep) | wall s median | CPU s (each rep) | CPU s median | ΔRSS MiB (max) |",
             "|---|---|---|---:|---|---:|---:|"]
    summary = {}
    for key in args.timing_methods.split(","):
        for tool in ("ours", "llmc"):
            rs = [r for r in results if r["method"] == key and r["tool"] == tool]
            walls, cpus = [r["wall_s"] for r in rs], [r["cpu_s"] for r in rs]
            med_w, med_c = sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]
            summary[f"{key} {tool}"] = {"wall_median_s": med_w, "cpu_median_s": med_c, "walls": walls, "cpus": cpus}
            lines.append(f"| {key} | {'qwenquant' if tool == 'ours' else 'llm-compressor'} | "
                         f"{', '.join(f'{w:.1f}' for w in walls)} | {med_w:.1f} | {', '.join(f'{c:.1f}' for c in cpus)}"
                         f" | {med_c:.1f} | {max(r['rss_delta_bytes'] for r in rs) / 2**20:.0f} |")
    table = "\n".join(lines)
    print(table)
    env = H.environment_meta()
    name = (args.name or "int4_methods") + "_timing"
    out = Path(args.out_dir)
    (out / f"{name}.json").write_text(json.dumps({"meta": env | {
        "num_samples": args.num_samples, "seq_len": args.seq_len, "calib_sha256": samples_hash(calib),
        "threads": args.threads, "reps": args.timing_reps}, "summary": summary, "runs": results}, indent=1) + "\n")
    (out / f"{name}.md").write_text("\n".join([
        f"# {name}", "",
        f"- date (UTC): {env['date_utc']}; {env['machine']['cpu_count']} CPUs, shared; torch threads {args.threads} "
        f"(llm-compressor too); calibration builtin {args.num_samples} x {args.seq_len}, seed 0 (same ids for both)",
        f"- command: `{env['command']}`",
        "- quantization only (no evaluation), the two tools alternating (ours first in even reps, theirs first in odd "
        "reps); wall = qwenquant `run_sequential` / llm-compressor `oneshot()`; CPU = process CPU seconds of that "
        "call; ΔRSS = peak RSS during the call minus RSS before it", "",
        table, ""]))
    _log(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")
    return 0


# -- main ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_harness_args(p)
    p.set_defaults(num_samples=64)
    p.add_argument("--bits", default="4,3")
    p.add_argument("--seeds", default="0,1", help="calibration seeds of our calibration-dependent rows")
    p.add_argument("--llmc-gptq-seeds", default="0,1", help="llm-compressor GPTQ 4-bit seeds")
    p.add_argument("--llmc-gptq3-seeds", default="0", help="llm-compressor GPTQ 3-bit seeds")
    p.add_argument("--llmc-awq-seeds", default="0", help="llm-compressor AWQ seeds (~10-20 min each on 2 shared "
                                                          "CPU cores at N=64; the second one runs last)")
    p.add_argument("--llmc-awq3", action="store_true", help="also llm-compressor AWQ at 3 bits")
    p.add_argument("--ablation-extra-seeds", default="",
                   help="extra calibration seeds for the AWQ qkv-scaling ablation only (e.g. 2,3): rows "
                        "'... (extra seeds)', KL tokens only, with and without the scaling")
    p.add_argument("--no-llmc", action="store_true")
    p.add_argument("--full-ppl", default="main",
                   help="which rows get the full-test perplexity: main (default: all but the AWQ ablation),"
                        " all, none, or a regex on the variant name")
    p.add_argument("--only", default=None, help="regex on the variant name")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/qwenquant-int4-methods"),
                   help="calibration .pt files, llm-compressor outputs and logs")
    p.add_argument("--name", default=None, help="results name (default int4_methods, int4_methods_smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny settings: 2 ppl windows, 1 KL window, 8 calibration samples of 256 tokens")
    p.add_argument("--timing-reps", type=int, default=0,
                   help="timing-only mode: N alternating reps of quantization only, ours vs llm-compressor "
                        "(writes <name>_timing.{json,md}; no evaluation)")
    p.add_argument("--timing-methods", default="gptq4,awq4,gptq3")
    p.add_argument("--plan", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--report-only", action="store_true", help="rewrite the results from the partial file")
    args = p.parse_args(argv)
    if args.smoke:
        args.ppl_windows, args.kl_windows, args.num_samples, args.seq_len = 2, 1, 8, 256
    name = args.name or ("int4_methods_smoke" if args.smoke else "int4_methods_quick" if args.quick
                         else "int4_methods")
    if args.timing_reps:
        return timing(args)
    jobs = plan(args)
    if args.plan:
        for j in jobs:
            print(f"{j['name']:32s} seed={j['seed']} full_ppl={j['tags']['full_ppl']}")
        print(f"{len(jobs)} rows")
        return 0
    if not args.no_llmc and not LLMC_PY.is_file():
        raise SystemExit(f"{LLMC_PY} missing: run benchmarks/setup_llmcompressor.sh (or pass --no-llmc)")
    # Asymmetric pack-quantized checkpoints (llm-compressor AWQ) need this to load in the system transformers.
    import llmcompressor_baseline

    llmcompressor_baseline.patch_ct_asym_meta_loading()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    partial_path = Path(args.out_dir) / f"{name}.partial.json"
    done = load_partial(partial_path) if (args.resume or args.report_only) else []
    h = harness_from_args(args)
    if not args.report_only:
        have = {row_key(r["variant"], r["seed"]) for r in done}
        t0 = time.perf_counter()
        for i, job in enumerate(jobs):
            if row_key(job["name"], job["seed"]) in have:
                continue
            _log(f"[{i + 1}/{len(jobs)}] {job['name']} seed={job['seed']} ({time.perf_counter() - t0:.0f}s so far)")
            row = run_llmc(h, job, args, args.work_dir) if job["kind"] == "llmc" else run_ours(h, job)
            done.append(row)
            save_partial(partial_path, done)
    note = ""
    if args.smoke:
        note = "**SMOKE RUN (tiny settings: not a measurement).**\n"
    report(h, done, args, name, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
