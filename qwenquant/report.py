"""The run report: `qwenquant_report.json` (schema-versioned, for machines) and `REPORT.md` (for people).

Schema 1, top-level keys: schema_version, qwenquant_version, created, command, model, recipe, calibration,
evaluation {text, window, windows, ppl_tokens, text_windows, whole_text, kl_tokens, compute_dtype, source, quantized,
delta_ppl_pct, kl_vs_source}, verification,
sizes {source_bytes, output_bytes, ratio}, memory {peak_host_bytes, peak_device_bytes, device}, timings_s,
layers [{layer, <stage>: {...}, moe_routing (MoE layers with calibration): {experts path: {tokens,
routed_tokens [per expert], experts_without_tokens}}}], environment {torch, transformers, compressed_tensors, python, platform},
gates [{gate, limit, measured, passed, description}], model.files_sha256 {file: sha256}.
"""

from __future__ import annotations

from pathlib import Path

from qwenquant.reporting import environment_versions, report_header, write_atomic, write_json

REPORT_SCHEMA_VERSION = 1
REPORT_JSON, REPORT_MD = "qwenquant_report.json", "REPORT.md"  # what every command writing a folder names its report


def evaluation_section(eval_desc: dict, src_ppl, q_ppl, kl: dict, tasks: dict | None) -> dict:
    """`evaluation`: the setting, source and quantized perplexity and their change, KL vs source, tasks."""
    evaluation = dict(eval_desc)
    if src_ppl is not None and q_ppl is not None:
        evaluation["source"] = src_ppl.to_dict()
        evaluation["quantized"] = q_ppl.to_dict()
        evaluation["delta_ppl_pct"] = 100.0 * (q_ppl.perplexity / src_ppl.perplexity - 1.0)
    evaluation["kl_vs_source"] = kl
    if tasks is not None:
        evaluation["tasks"] = tasks
    return evaluation


def perplexity_setting(ev: dict) -> str:
    """What a perplexity measured, in words: windows, window length, predicted tokens, whole text or which prefix,
    compute dtype (for the reports of runs and the model card). Reports written before these keys existed say
    less."""
    if "text_windows" not in ev:
        return f"{ev['text']}, non-overlapping windows of {ev['window']} tokens ({ev['windows']} windows)"
    part = ("the whole text" if ev["whole_text"] else
            f"the first {ev['windows']} of its {ev['text_windows']} windows, not the whole text (`--eval-windows all`)")
    return (f"{ev['text']}: {ev['windows']} non-overlapping window{'s' if ev['windows'] != 1 else ''} of "
            f"{ev['window']} tokens "
            f"({ev['ppl_tokens']:,} predicted tokens), {part}; computed in {ev['compute_dtype']}")


def build_report(*, recipe, resolved, files_sha256: dict, command: str, started: float, version: str,
                 calibration: dict, evaluation: dict, verification, sizes: dict, memory: dict, state, timings: dict,
                 sections: dict) -> dict:
    """The whole report, built once: `sections` adds the run's optional top-level sections (gates,
    mixed_precision, resumed_after_layers)."""
    return report_header(REPORT_SCHEMA_VERSION, command=command, started=started, version=version) | {
        "model": {
            "reference": resolved.reference,
            "repo_id": resolved.repo_id,
            "revision": recipe.model.revision,
            "architecture": resolved.config.get("architectures", [None])[0],
            "num_layers": resolved.config.get("num_hidden_layers"),
            "files_sha256": files_sha256,
        },
        "recipe": recipe.to_dict(),
        "calibration": {"dataset": recipe.calibration.dataset} | calibration,
        "evaluation": evaluation,
        "verification": verification,
        "sizes": sizes | {"ratio": sizes["output_bytes"] / sizes["source_bytes"] if sizes["source_bytes"] else None},
        "memory": memory | {"peak_device_bytes": state.peak_device_bytes},
        "timings_s": timings,
        "layers": state.layer_reports,
        "environment": environment_versions(),
    } | sections


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def render_markdown(r: dict) -> str:
    ev, v = r["evaluation"], r.get("verification")
    lines = [
        f"# qwenquant report: {r['model']['reference']}",
        "",
        f"Created {r['created']} by qwenquant {r['qwenquant_version']} on `{r['memory']['device']}`.",
        f"Quantizer: **{_stage_summary(r['recipe'])}**, export format `{r['recipe']['export']['format']}`.",
        "",
        "## Accuracy",
        "",
        f"Perplexity on {perplexity_setting(ev)}.",
        "",
        "| model | perplexity | tokens |",
        "|---|---|---|",
    ]
    if "source" in ev:
        lines += [
            f"| source | {ev['source']['perplexity']:.4f} | {ev['source']['tokens']} |",
            f"| quantized | {ev['quantized']['perplexity']:.4f} | {ev['quantized']['tokens']} |",
            "",
            f"Change: **{ev['delta_ppl_pct']:+.3f}%**.",
        ]
    kl = ev["kl_vs_source"]
    lines += ["", (f"Next-token KL(source || quantized) over {kl['tokens']} tokens: mean {kl['mean_kl']:.5f} nats, "
                   f"max {kl['max_kl']:.4f}; top-1 agreement {100 * kl['top1_agreement']:.2f}%.") if kl else
              "Next-token KL vs the source: not measured (--kl-tokens 0).", ""]
    lines += task_table(ev.get("tasks"))
    lines += [
        "## Verification",
        "",
    ]
    if v is None:
        lines.append("Skipped (--no-verify).")
    else:
        status = "PASSED" if v["passed"] else f"FAILED: {v['reason']}"
        lines.append(f"Reloaded with {v['loader']}: **{status}**.")
        if "vs_source" in v:
            lines += [
                f"- vs source: mean KL {v['vs_source']['mean_kl']:.5f} nats (threshold {v['threshold_mean_kl_vs_source']}), "
                f"top-1 agreement {100 * v['vs_source']['top1_agreement']:.2f}%",
                f"- weights: {v['weights_checked'] - len(v['weights_mismatched'])}/{v['weights_checked']} quantized Linears "
                "reload bit-identical to ours",
            ]
            if "vs_quantized_in_memory" in v:  # a streamed run has no in-memory model: its KL is the checkpoint's
                lines.append(f"- vs our in-memory simulation: mean KL {v['vs_quantized_in_memory']['mean_kl']:.2e} "
                             "nats (informational: loaders simulate FP8 activations with different rounding)")
        if "runtime" in v:  # GGUF: the check in llama.cpp itself, or why it did not run
            lines += [line.replace("In ", "- in ", 1) if line.startswith("In ") else "- " + line
                      for line in runtime_lines(v["runtime"]) if line]
    if r.get("gguf"):
        g, rounding = r["gguf"], r["gguf"]["fp16_rounding"]
        lines += ["", f"GGUF tensors: {', '.join(f'{n} {t}' for t, n in g['tensor_types'].items())}; block minima "
                  f"-z*s rounded by float16: {rounding['mins_rounded']} of {rounding['minima']} (max change "
                  f"{rounding['max_min_deviation']:.3g}); tokenizer: {g['tokenizer']['tokens']} tokens, "
                  f"{g['tokenizer']['merges']} merges, pre-tokenizer {g['tokenizer']['pre']}, chat template "
                  f"{'included' if g['tokenizer']['chat_template'] else 'absent'}."]
    if r.get("gates"):
        lines += ["", "## Quality gates", ""]
        lines += [f"- {g['gate']}: {'passed' if g['passed'] else 'FAILED'} ({g['description']})" for g in r["gates"]]
    if r.get("mixed_precision"):
        from qwenquant.sensitivity_report import render_mixed_precision

        lines += render_mixed_precision(r["mixed_precision"])
    s, m = r["sizes"], r["memory"]
    lines += [
        "",
        "## Size, memory, time",
        "",
        f"- weights: source {_mb(s['source_bytes'])} -> output {_mb(s['output_bytes'])} (x{s['ratio']:.3f})",
        f"- peak host memory (RSS) {_mb(m['peak_host_bytes'])}; peak device memory {_mb(m['peak_device_bytes'])}",
        "- time per stage: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["timings_s"].items() if isinstance(v, float)),
        "",
        "## Per-layer weight error (relative Frobenius norm)",
        "",
    ]
    lines += _layer_table(r["layers"])
    lines += _compensation_section(r) + _scale_search_section(r["layers"]) + _moe_routing_section(r["layers"])
    lines += _kv_cache_section(r["layers"])
    cal = r["calibration"]
    if cal["sha256_token_ids"] is None:
        lines += ["", "Calibration: none (round-to-nearest uses no data).", ""]
    else:
        lines += ["", f"Calibration: `{cal['dataset']}`, {cal['tokens']} tokens, "
                  f"sha256 of token ids `{cal['sha256_token_ids'][:16]}...`.", ""]
    return "\n".join(lines)


def task_table(tasks: dict | None) -> list[str]:
    """Markdown rows for zero-shot task accuracy (source vs quantized, with standard errors)."""
    if not tasks:
        return [""]
    limit = next(iter(tasks.values())).get("limit")
    out = ["", f"Zero-shot accuracy (lm-eval, {'first ' + str(limit) + ' documents per task' if limit else 'all documents'}):",
           "", "| task | source acc | quantized acc | recovery |", "|---|---|---|---|"]
    for task, r in tasks.items():
        s, q = r["source"], r["quantized"]
        rec = "n/a" if r["recovery_pct"] is None else f"{r['recovery_pct']:.1f}%"
        out.append(f"| {task} | {s['acc']:.4f} ± {s['acc_stderr']:.4f} | {q['acc']:.4f} ± {q['acc_stderr']:.4f} | {rec} |")
    return out + [""]


def _stage_summary(recipe: dict) -> str:
    parts = []
    for st in recipe["stages"]:
        (name, cfg), = st.items()
        parts.append(name + "(" + ", ".join(f"{k}={_short(v)}" for k, v in cfg.items()) + ")")
    return " -> ".join(parts)


def _short(value):
    """Long per-module mappings (scale search choices) are listed in recipe.yaml, not in the summary line."""
    return f"<{len(value)} entries, see recipe.yaml>" if isinstance(value, dict) and len(value) > 4 else value


def _layer_table(layers: list[dict]) -> list[str]:
    linears: list[str] = []
    rows = []
    averaged = False
    for rep in layers:
        errs = {}
        for stage_rep in rep.values():
            if isinstance(stage_rep, dict):
                for name, val in stage_rep.items():
                    if isinstance(val, dict) and "weight_rel_error" in val:
                        errs[name] = val["weight_rel_error"]
        by_short: dict[str, list[float]] = {}  # MoE: one column per projection, averaged over the experts
        for n, e in errs.items():
            by_short.setdefault(n.split(".")[-1], []).append(e)
        for n in by_short:
            if n not in linears:
                linears.append(n)
        rows.append((rep["layer"], {n: sum(v) / len(v) for n, v in by_short.items()}))
        averaged = averaged or any(len(v) > 1 for v in by_short.values())
    if not linears:
        return ["(no quantized layers)"]
    out = ["| layer | " + " | ".join(linears) + " |", "|---" * (len(linears) + 1) + "|"]
    for i, errs in rows:
        out.append(f"| {i} | " + " | ".join(f"{errs[n]:.4f}" if n in errs else "" for n in linears) + " |")
    if averaged:
        out += ["", "MoE layers: the mean over the layer's experts (each expert's error is in qwenquant_report.json)."]
    return out


def _compensation_section(r: dict) -> list[str]:
    """Per-layer output error before/after error compensation (layers[i]["compensate"], qwenquant/stages/compensate.py)."""
    rows = [(rep["layer"], rep["compensate"]) for rep in r["layers"] if isinstance(rep.get("compensate"), dict)]
    if not rows:
        return []
    added = r["timings_s"].get("stages", {}).get("compensate", sum(c["seconds"] for _, c in rows))
    out = ["", "## Error compensation", "",
           f"Output error of each decoder layer vs the unquantized layer (squared error of the residual branches / "
           f"their squared norm, on the {rows[0][1]['samples']} calibration samples it was tuned on), before and after "
           f"tuning; added wall time {added:.1f}s.", "",
           "| layer | before | after | change | codes changed | seconds | status |", "|---|---:|---:|---:|---:|---:|---|"]
    for i, c in rows:
        b, a = c["output_error_before"], c["output_error_after"]
        change = f"{100 * (a / b - 1):+.1f}%" if b else "-"
        codes = f"{100 * c['codes_changed_frac']:.2f}%" if "codes_changed_frac" in c else "-"
        out.append(f"| {i} | {b:.3e} | {a:.3e} | {change} | {codes} | {c['seconds']:.1f} | {c['status']} |")
    return out


def _scale_search_section(layers: list[dict]) -> list[str]:
    """Values the scale search chose (also written into recipe.yaml)."""
    alphas = [(rep["layer"], rep["smooth"]["alpha_search"]) for rep in layers
              if isinstance(rep.get("smooth"), dict) and "alpha_search" in rep["smooth"]]
    clips = [(rep["layer"], n, v["clip_search"]) for rep in layers if isinstance(rep.get("fp8"), dict)
             for n, v in rep["fp8"].items() if isinstance(v, dict) and "clip_search" in v]
    if not alphas and not clips:
        return []
    out = ["", "## Scale search", "", "Chosen by output error on calibration inputs (relative squared error); "
           "the values are in recipe.yaml, which replays them without searching.", ""]
    for i, a in alphas:
        out.append(f"- layer {i}: smooth alpha {a['alpha']:g} ({a['grid']} grid): error {a['error_at_default']:.3e} at "
                   f"the default alpha -> {a['error']:.3e}")
    clipped = [(i, n, c) for i, n, c in clips if c["clip"] < 1.0]
    if clips:
        out.append(f"- FP8 weight clipping: {len(clipped)} of {len(clips)} Linears clipped"
                   + (": " + ", ".join(f"{i}.{n} {c['clip']:g} ({c['error_at_1']:.2e} -> {c['error']:.2e})"
                                       for i, n, c in clipped) if clipped else " (ratio 1.0 was best everywhere)"))
    return out


def _moe_routing_section(layers: list[dict]) -> list[str]:
    """Per MoE layer: calibration tokens the router sent to each expert (layers[i]["moe_routing"], model/moe.py)."""
    rows = [(rep["layer"], path, r) for rep in layers for path, r in rep.get("moe_routing", {}).items()]
    if not rows:
        return []
    out = ["", "## MoE experts", "",
           "Every expert was calibrated on all of its layer's calibration tokens (an observed expert runs on every "
           "token; the layer's output keeps only the routed ones), so no expert lacks statistics. Tokens the router "
           "sent to each expert (top-k, counted while propagating the calibration set through the quantized layer):",
           "", "| layer | tokens | min | max | experts without tokens | routed tokens per expert (0, 1, ...) |",
           "|---|---:|---:|---:|---|---|"]
    for i, path, r in rows:
        counts = r["routed_tokens"]
        empty = ", ".join(map(str, r["experts_without_tokens"])) or "none"
        out.append(f"| {i} `{path}` | {r['tokens']} | {min(counts)} | {max(counts)} | {empty} | "
                   f"{' '.join(map(str, counts))} |")
    return out


def _kv_cache_section(layers: list[dict]) -> list[str]:
    """--kv-cache fp8: each layer's calibrated K/V scales (layers[i]["kv_cache"], qwenquant/kv_simulation.py)."""
    rows = [(rep["layer"], rep["kv_cache"]) for rep in layers if rep.get("kv_cache")]
    if not rows:
        return []
    out = ["", "## FP8 KV cache", "",
           f"Static E4M3 scales per {rows[0][1]['strategy']} (s = max|x| / 448 over {rows[0][1]['tokens']:,} "
           "calibration tokens, K after k_norm and RoPE), observed while propagating the calibration set through "
           "each quantized layer; perplexity and KL above include the FP8 cache.", "",
           "| layer | k_scale min | k_scale max | v_scale min | v_scale max | max abs K | max abs V |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for i, kv in rows:
        out.append(f"| {i} | {min(kv['k_scale']):.4g} | {max(kv['k_scale']):.4g} | {min(kv['v_scale']):.4g} | "
                   f"{max(kv['v_scale']):.4g} | {max(kv['k_absmax']):.4g} | {max(kv['v_absmax']):.4g} |")
    return out


def write_report(folder: Path, report: dict) -> None:
    write_json(Path(folder) / REPORT_JSON, report)
    write_atomic(Path(folder) / REPORT_MD, render_markdown(report))


def runtime_lines(runtime: dict | None) -> list[str]:
    """The GGUF check in llama.cpp itself (qwenquant/eval/gguf_verify.py), or why it did not run (REPORT.md and the
    model card)."""
    if runtime is None:
        return []
    if not runtime["available"]:
        return ["", f"Not run in llama.cpp: {runtime['reason']}."]
    kl, greedy = runtime["vs_source"], runtime["greedy"]
    return ["", f"In {runtime['runtime']} {runtime['version']} (the file alone): mean next-token KL from the source "
            f"{kl['mean_kl']:.5f} nats over {kl['tokens']} tokens, top-1 agreement {100 * kl['top1_agreement']:.2f}%; "
            f"greedy decoding of {len(greedy['prompts'])} chat prompts: {greedy['prompts_identical']} identical to "
            f"{greedy['reference']}, {100 * greedy['token_agreement']:.1f}% of generated tokens before the first "
            "difference."] + _greedy_vs_source(runtime.get("greedy_vs_source"))


def _greedy_vs_source(g: dict | None) -> list[str]:
    if g is None:
        return []
    counts = ", ".join(f"{r['tokens_before_first_difference']}/{r['tokens']}" for r in g["prompts"])
    return ["", f"Against the source model (greedy in transformers, float32, same prompts): {g['prompts_identical']} "
            f"of {len(g['prompts'])} answers identical; tokens before the first difference {counts} "
            f"({100 * g['token_agreement']:.1f}% of generated tokens)."]


def summary(report: dict) -> dict:
    """The short JSON printed on stdout with --json."""
    ev = report["evaluation"]
    return {
        "ok": bool((report.get("verification") is None or report["verification"]["passed"])
                   and all(g["passed"] for g in report.get("gates", []))),
        "model": report["model"]["reference"],
        "source_ppl": ev.get("source", {}).get("perplexity"),
        "quantized_ppl": ev.get("quantized", {}).get("perplexity"),
        "delta_ppl_pct": ev.get("delta_ppl_pct"),
        "mean_kl": (ev["kl_vs_source"] or {}).get("mean_kl"),
        "output_bytes": report["sizes"]["output_bytes"],
        "verification": None if report["verification"] is None else report["verification"]["passed"],
        "gates": report.get("gates", []),
    }
