#!/usr/bin/env python
"""Mixed precision on qwen3-mini: does keeping the most sensitive fused groups in bf16 buy more than keeping
random ones? (see benchmarks/README.md)

    python benchmarks/mixed_precision.py --quick     # smoke run: mixed_precision_quick.{json,md}
    nohup python benchmarks/mixed_precision.py > /tmp/mixed_precision.log 2>&1 &   # full WikiText-2 test

For each INT width in --bits (RTN, group 128, symmetric; weight-only) and each calibration seed in --seeds:
1. rank the vLLM fused groups (q/k/v, o, gate/up, down of each layer) by `qwenquant.sensitivity` (end-to-end KL
   with the group quantized alone, on the first --sens-samples calibration windows of that seed);
2. evaluate: uniform RTN, keep the 1 and the 2 most sensitive groups in bf16, keep 2 RANDOM groups (the control;
   drawn with random.Random(1000 + seed)).
RTN does not depend on calibration, so the seed changes only which groups are kept (and the random draw); a variant
whose kept set equals one already evaluated is reused, not re-run (`reused_from`). Also reported: Spearman rank
correlation of the group ranking between the seeds, and between the proxy (output error) and the end-to-end KL.
`--resume` continues from benchmarks/results/<name>.partial.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import _log, add_harness_args, harness_from_args, load_partial, save_partial, write_results  # noqa: E402
from qwenquant.quant.sensitivity import spearman  # noqa: E402
from qwenquant.stages.mixed_precision import MixedPrecisionStage  # noqa: E402
from qwenquant.stages.rtn import RTNStage  # noqa: E402
from qwenquant.sensitivity import UnitScheme, rank_groups  # noqa: E402


def kept_fraction(model, keep: list[str], adapter) -> float:
    """Share of decoder-Linear weights kept in bf16."""
    layers = len(model.get_submodule(adapter.layers_path))
    total = sum(model.get_submodule(f"{adapter.layers_path}.{i}.{n}").weight.numel()
                for i in range(layers) for n in adapter.linears)
    kept = sum(model.get_submodule(n).weight.numel() for n in keep)
    return kept / total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_harness_args(ap)
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--sens-samples", type=int, default=8, help="calibration windows used to rank the groups")
    ap.add_argument("--name", default=None)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    name = args.name or ("mixed_precision_quick" if args.quick else "mixed_precision")
    seeds = [int(s) for s in args.seeds.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    partial = args.out_dir / f"{name}.partial.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)

    h = harness_from_args(args)
    adapter = h.resolved.adapter
    done = {(r["variant"], r["seed"]): r for r in (load_partial(partial) if args.resume else [])}
    rows = [h.source_row()]
    sensitivity: dict = {}
    for bits in bits_list:
        scheme = UnitScheme("int", bits=bits, group_size=args.group_size)
        rankings, results = {}, {}
        for seed in seeds:
            t = time.perf_counter()
            windows = h.calibration(seed)[: args.sens_samples]
            rankings[seed], results[seed] = rank_groups(h.source, adapter, windows, scheme, h.device)
            _log(f"INT{bits} seed {seed}: ranked {len(rankings[seed])} groups in {time.perf_counter() - t:.1f}s; "
                 f"top: {[r for r in results[seed].ranking('group')[:4]]}")
        units = [r["unit"] for r in results[seeds[0]].rows]
        kl = {s: [results[s].scores("group")[u] for u in units] for s in seeds}
        proxy = {s: [results[s].scores("group", "proxy")[u] for u in units] for s in seeds}
        sensitivity[f"int{bits}"] = {
            "scheme": scheme.label,
            "tokens_per_seed": results[seeds[0]].tokens,
            "seconds_per_seed": {str(s): results[s].seconds for s in seeds},
            "ranking": {str(s): results[s].ranking("group") for s in seeds},
            "kl": {str(s): results[s].scores("group") for s in seeds},
            "proxy": {str(s): results[s].scores("group", "proxy") for s in seeds},
            "spearman_seeds_kl": {f"{a}_vs_{b}": spearman(kl[a], kl[b]) for a in seeds for b in seeds if a < b},
            "spearman_seeds_proxy": {f"{a}_vs_{b}": spearman(proxy[a], proxy[b]) for a in seeds for b in seeds if a < b},
            "spearman_proxy_vs_kl": {str(s): spearman(proxy[s], kl[s]) for s in seeds},
        }
        _log(f"INT{bits}: rank correlation across seeds {sensitivity[f'int{bits}']['spearman_seeds_kl']}, "
             f"proxy vs KL {sensitivity[f'int{bits}']['spearman_proxy_vs_kl']}")

        all_groups = rankings[seeds[0]]
        plan = [(f"int{bits} uniform", seeds[0], [])]
        for seed in seeds:
            rng = random.Random(1000 + seed)
            plan += [(f"int{bits} keep top-1", seed, rankings[seed][:1]),
                     (f"int{bits} keep top-2", seed, rankings[seed][:2]),
                     (f"int{bits} keep random-2", seed, rng.sample(sorted(all_groups), 2))]
        evaluated: dict[frozenset, dict] = {}
        for variant, seed, groups in plan:
            keep = [n for g in groups for n in g]
            tags = {"bits": bits, "kept_groups": [_label(g) for g in groups], "kept_weight_fraction":
                    kept_fraction(h.source, keep, adapter), "control": "random" in variant}
            key = frozenset(keep)
            if key in evaluated:
                prev = evaluated[key]
                row = dict(prev) | {"variant": variant, "seed": seed, "reused_from": f"{prev['variant']} seed {prev['seed']}"}
                _log(f"{variant} seed {seed}: same kept set as {row['reused_from']}, reused")
            elif (variant, seed) in done:
                row = done[(variant, seed)]
            else:
                stages = ([MixedPrecisionStage(keep=keep)] if keep else []) + [RTNStage(bits=bits, group_size=args.group_size)]
                row = h.evaluate_variant(variant, stages, seed=seed, tags=tags)
            evaluated.setdefault(key, row)
            rows.append(row)
            save_partial(partial, rows[1:])

    summary = findings(rows, sensitivity, bits_list, seeds)
    meta = h.meta() | {"sensitivity": sensitivity, "sens_samples": args.sens_samples, "bits": bits_list,
                       "group_size": args.group_size, "seeds": seeds}
    write_results(name, rows, meta, out_dir=args.out_dir, summary_md=summary)
    print(summary)
    partial.unlink(missing_ok=True)
    return 0


def _label(group) -> str:
    layer = group[0].rsplit(".", 2)[0]
    return layer.rsplit(".", 1)[-1] + ":" + "+".join(n.rsplit(".", 1)[-1].removesuffix("_proj") for n in group)


def findings(rows: list[dict], sensitivity: dict, bits_list: list[int], seeds: list[int]) -> str:
    lines = ["## Findings (computed from the rows below)", ""]
    for bits in bits_list:
        s = sensitivity[f"int{bits}"]
        lines.append(f"- INT{bits}: group ranking rank correlation across calibration seeds (Spearman, KL): "
                     + ", ".join(f"{k.replace('_vs_', ' vs ')}: {v:+.3f}" for k, v in s["spearman_seeds_kl"].items())
                     + "; proxy (output error) vs end-to-end KL: "
                     + ", ".join(f"seed {k}: {v:+.3f}" for k, v in s["spearman_proxy_vs_kl"].items())
                     + "; top groups: " + ", ".join(f"seed {k}: {v[:3]}" for k, v in s["ranking"].items()))
    lines += ["", "| bits | variant | seed | kept groups | bf16 weight share | ppl | Δppl % | mean KL | top-1 |",
              "|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "bits" not in r:
            continue
        lines.append(f"| {r['bits']} | {r['variant']} | {r['seed']} | {', '.join(r['kept_groups']) or '-'} | "
                     f"{100 * r['kept_weight_fraction']:.1f}% | {_f(r.get('ppl'), '.3f')} | "
                     f"{_f(r.get('delta_ppl_pct'), '+.2f')} | {r['mean_kl']:.4e} | {r['top1']:.4f} |")
    lines.append("")
    for bits in bits_list:
        sub = [r for r in rows if r.get("bits") == bits]
        uni = next((r for r in sub if r["variant"].endswith("uniform")), None)
        for k in ("top-2", "random-2"):
            vals = [r["mean_kl"] for r in sub if r["variant"].endswith(k)]
            ppls = [r["delta_ppl_pct"] for r in sub if r["variant"].endswith(k) and r.get("delta_ppl_pct") is not None]
            if vals and uni:
                lines.append(f"- INT{bits} keep {k}: mean KL {sum(vals) / len(vals):.4e} vs uniform {uni['mean_kl']:.4e} "
                             f"({100 * (sum(vals) / len(vals) / uni['mean_kl'] - 1):+.1f}%)"
                             + (f", Δppl {sum(ppls) / len(ppls):+.2f}% vs {uni['delta_ppl_pct']:+.2f}%" if ppls and uni.get('delta_ppl_pct') is not None else "")
                             + f" (mean over seeds {seeds})")
    return "\n".join(lines) + "\n"


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


if __name__ == "__main__":
    sys.exit(main())
