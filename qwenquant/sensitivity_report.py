"""The sensitivity report: `sensitivity.json` (schema 1), `SENSITIVITY.md` and `sensitivity.png`, combining the
measurements of one or more calibration seeds (qwenquant.sensitivity.SensitivityResult).

JSON keys: schema_version, qwenquant_version, created, command, model {reference, path, num_layers}, scheme
{label, ...}, calibration {dataset, num_samples, seq_len, seeds, tokens_per_seed}, levels, units [{unit, level,
layer, type, linears, rank, kl, proxy, delta_nll, kl_per_seed, proxy_per_seed}] (per level, most sensitive
first; kl/proxy/delta_nll are means over seeds), rank_correlation {level: {proxy_vs_kl, seeds_kl, seeds_proxy}},
source_nll_per_seed, timings_s, files.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from qwenquant.errors import BadInputError
from qwenquant.quant.sensitivity import rank_by_sensitivity, spearman
from qwenquant.reporting import json_text, report_header, staged_files
from qwenquant.sensitivity import LEVELS, SensitivityResult

SCHEMA_VERSION = 1
FILES = {"json": "sensitivity.json", "markdown": "SENSITIVITY.md", "plot": "sensitivity.png"}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def build_sensitivity_report(results: dict[int, SensitivityResult], *, model: dict, calibration: dict, command: str,
                             version: str, started: float) -> dict:
    """Combine per-seed results (same units, same order) into the report dict."""
    seeds = list(results)
    first = results[seeds[0]]
    units = []
    for j, row in enumerate(first.rows):
        per = {s: results[s].rows[j] for s in seeds}
        units.append({k: row[k] for k in ("unit", "level", "layer", "type", "linears")} | {
            "kl": _mean([r["kl"] for r in per.values()]),
            "proxy": _mean([r["proxy"] for r in per.values()]),
            "delta_nll": _mean([r["delta_nll"] for r in per.values()]),
            "kl_per_seed": {str(s): r["kl"] for s, r in per.items()},
            "proxy_per_seed": {str(s): r["proxy"] for s, r in per.items()},
        })
    levels = [lv for lv in LEVELS if any(u["level"] == lv for u in units)]
    ordered, correlation = [], {}
    for level in levels:
        rows = [u for u in units if u["level"] == level]
        ranked = rank_by_sensitivity({u["unit"]: u["kl"] for u in rows})
        by_name = {u["unit"]: u for u in rows}
        for i, name in enumerate(ranked, 1):
            ordered.append(by_name[name] | {"rank": i})
        corr = {"proxy_vs_kl": spearman([u["proxy"] for u in rows], [u["kl"] for u in rows]),
                "proxy_vs_kl_per_seed": {str(s): results[s].proxy_correlation(level) for s in seeds},
                "seeds_kl": {}, "seeds_proxy": {}}
        for s in seeds[1:]:
            key = f"{seeds[0]}_vs_{s}"
            corr["seeds_kl"][key] = spearman([u["kl_per_seed"][str(seeds[0])] for u in rows],
                                             [u["kl_per_seed"][str(s)] for u in rows])
            corr["seeds_proxy"][key] = spearman([u["proxy_per_seed"][str(seeds[0])] for u in rows],
                                                [u["proxy_per_seed"][str(s)] for u in rows])
        correlation[level] = corr
    return report_header(SCHEMA_VERSION, command=command, started=started, version=version) | {
        "model": model,
        "scheme": {"label": first.scheme.label} | dataclasses.asdict(first.scheme),
        "calibration": calibration | {"seeds": seeds, "tokens_per_seed": first.tokens},
        "levels": levels,
        "units": ordered,
        "rank_correlation": correlation,
        "source_nll_per_seed": {str(s): r.source_nll for s, r in results.items()},
        "timings_s": {f"seed_{s}": r.seconds for s, r in results.items()} | {"total": time.time() - started},
        "files": dict(FILES),
    }


def _rho(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.3f}"


def render_markdown(r: dict, top: int | None = None) -> str:
    cal = r["calibration"]
    seeds = cal["seeds"]
    lines = [
        f"# Layer sensitivity: {r['model']['reference']}",
        "",
        f"Created {r['created']} by qwenquant {r['qwenquant_version']}. Scheme: **{r['scheme']['label']}**, one unit "
        "quantized at a time, everything else in the source dtype.",
        "",
        f"- end to end: mean next-token KL(source || model with the unit quantized), nats per token, over "
        f"{cal['tokens_per_seed']} calibration tokens (`{cal['dataset']}`, {cal['num_samples']} x {cal['seq_len']}, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; values are means over seeds)",
        "- proxy: relative output error ||XW^T - Q(X)Q(W)^T|| / ||XW^T|| of the unit's Linears on their source "
        "inputs (same tokens)",
        "- dNLL: change in mean next-token NLL on the same tokens",
        f"- command: `{r['command']}`",
        "",
        "## Rank correlation (Spearman)",
        "",
        "| level | units | proxy vs KL | " + " | ".join(f"KL seed {k.replace('_vs_', ' vs ')}" for k in
                                                      r["rank_correlation"][r["levels"][0]]["seeds_kl"]) + " |",
        "|---|---:|---:|" + "---:|" * len(r["rank_correlation"][r["levels"][0]]["seeds_kl"]),
    ]
    for level in r["levels"]:
        c = r["rank_correlation"][level]
        n = sum(1 for u in r["units"] if u["level"] == level)
        lines.append(f"| {level} | {n} | {_rho(c['proxy_vs_kl'])} | " + " | ".join(_rho(v) for v in c["seeds_kl"].values())
                     + (" |" if c["seeds_kl"] else ""))
    if len(seeds) == 1:
        lines += ["", "One calibration seed: pass `--seeds 0,1` to measure how stable the ranking is."]
    for level in r["levels"]:
        rows = [u for u in r["units"] if u["level"] == level]
        shown = rows[:top] if top else rows
        per_seed = len(seeds) > 1
        lines += ["", f"## {level} units, most sensitive first", "",
                  "| rank | unit | layer | type | mean KL | " + ("KL per seed | " if per_seed else "") + "proxy | dNLL |",
                  "|---:|---|---:|---|---:|" + ("---|" if per_seed else "") + "---:|---:|"]
        for u in shown:
            seeds_txt = " / ".join(f"{v:.3e}" for v in u["kl_per_seed"].values()) + " | " if per_seed else ""
            lines.append(f"| {u['rank']} | `{u['unit']}` | {u['layer']} | {u['type']} | {u['kl']:.3e} | {seeds_txt}"
                         f"{u['proxy']:.4f} | {u['delta_nll']:+.4f} |")
        if len(shown) < len(rows):
            lines.append(f"\n({len(rows) - len(shown)} more in {FILES['json']})")
    lines += ["", f"![sensitivity by layer]({FILES['plot']})", ""]
    return "\n".join(lines)


def plot_sensitivity(r: dict, path: Path) -> None:
    """Layer index x mean KL (log scale), one line per projection type; Linears left, groups and blocks right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("linear", ("linear",)), ("fused group / block", ("group", "block"))]
    panels = [(title, lv) for title, lv in panels if any(level in r["levels"] for level in lv)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (title, levels) in zip(axes[0], panels):
        types: dict[str, list[tuple[int, float]]] = {}
        for u in r["units"]:
            if u["level"] in levels:
                types.setdefault(u["type"], []).append((u["layer"], u["kl"]))
        for name, points in types.items():
            points.sort()
            ax.plot([p[0] for p in points], [max(p[1], 1e-12) for p in points], marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("mean KL vs source (nats/token)")
        ax.set_title(f"{title}: quantized alone")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.suptitle(f"{r['model']['reference']}: {r['scheme']['label']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sensitivity_report(folder: Path, report: dict) -> list[Path]:
    """Write the three files into `folder` (created if missing): each is staged under a temporary name and renamed
    into place, so a file is either the complete new one or absent/the previous one."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"--out {folder}: is a file; choose a folder path")
    paths = [folder / FILES[key] for key in ("json", "markdown", "plot")]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with staged_files(*paths) as (json_tmp, md_tmp, plot_tmp):
            json_tmp.write_text(json_text(report), encoding="utf-8")
            md_tmp.write_text(render_markdown(report), encoding="utf-8")
            plot_sensitivity(report, plot_tmp)
    except OSError as err:
        raise BadInputError(f"--out {folder}: cannot write the report ({err.strerror or err})") from err
    return paths


def render_mixed_precision(mp: dict) -> list[str]:
    """REPORT.md lines for a run's `mixed_precision` section (qwenquant/runner/mixed.py)."""
    groups = mp.get("kept_groups") or []
    lines = ["", "## Mixed precision", "",
             f"Kept in the source dtype (listed in `ignore`): {', '.join(f'`{g}`' for g in groups) if groups else 'none'} "
             f"({len(mp.get('keep') or [])} Linears; keep_sensitive: {mp['keep_sensitive']})."]
    if not mp.get("measured"):
        lines.append("The keep list came from the recipe; nothing was measured.")
        return lines
    lines.append(f"Fused groups ranked by mean next-token KL with the group alone quantized ({mp['scheme']}, "
                 f"{mp['sensitivity_tokens']} calibration tokens, {mp['sensitivity_seconds']:.1f}s); Spearman "
                 f"proxy vs KL {_rho(mp['proxy_rank_correlation'])}. Most sensitive:")
    lines += ["", "| rank | group | mean KL | proxy |", "|---:|---|---:|---:|"]
    lines += [f"| {i} | `{u['unit']}` | {u['kl']:.3e} | {u['proxy']:.4f} |" for i, u in enumerate(mp["ranking"][:8], 1)]
    search = mp.get("search")
    if search:
        tried = ", ".join(f"{a['kept_groups']} kept: {a['delta_ppl_pct']:+.3f}%" for a in search["attempts"])
        verdict = "met" if search["met"] else f"NOT met even with max_keep {search['max_keep']}; the best is written"
        lines += ["", f"auto: perplexity limit {search['limit_pct']}% {verdict} (tried {tried})."]
    return lines
