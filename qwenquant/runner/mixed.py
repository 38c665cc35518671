"""The mixed-precision driver: a run whose recipe has a `mixed_precision` stage quantizes through here, which resolves
the stage into an explicit list of Linears kept in the source dtype (measuring fused-group sensitivity with
qwenquant.sensitivity when asked to choose) and quantizes once per candidate with the run's `quantize` phase.

- `keep: [...]` given: nothing is measured; one quantization run.
- `keep_sensitive: N`: rank the fused groups (q/k/v, o, gate/up, down of each layer: vLLM needs one scheme per fused
  group, so groups are kept whole) by end-to-end KL when quantized alone, keep the N most sensitive.
- `keep_sensitive: auto`: greedy by that ranking, the fewest groups (0, 1, ..., max_keep) whose quantized model
  meets eval.max_ppl_increase_pct on the run's own perplexity windows. Each candidate is a full quantization run
  (exactly what would be exported: GPTQ/AWQ calibrate on the kept groups' bf16 outputs), stopping at the first that
  passes; if none does, the candidate with the lowest perplexity is kept and the run's quality gate fails.

The resolved recipe (with `keep` filled in) is what gets saved as recipe.yaml, so `qwenquant run recipe.yaml`
reproduces the run without measuring again.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Protocol

import torch

from qwenquant.model.qwen3 import ArchAdapter
from qwenquant.preflight import all_groups
from qwenquant.progress import Reporter
from qwenquant.quant.sensitivity import fewest_within
from qwenquant.recipe import Recipe
from qwenquant.runner.outcome import Quantized
from qwenquant.sensitivity import group_label, rank_groups, scheme_for_stage


class Run(Protocol):
    """What the driver uses of a run (qwenquant/runner/run.py): its settings and its `quantize` phase."""

    recipe: Recipe
    resolved: object
    placement: object  # .model (the loaded source), .load_source() (a fresh copy)
    calib: torch.Tensor
    device: torch.device
    reporter: Reporter

    def quantize(self, recipe: Recipe, model: torch.nn.Module) -> Quantized: ...


def with_keep(recipe: Recipe, keep: list[str]) -> Recipe:
    """A copy of the recipe whose mixed_precision stage lists `keep` explicitly."""
    stages = [dataclasses.replace(s, keep=list(keep)) if s is recipe.stage("mixed_precision") else s
              for s in recipe.stages]
    return dataclasses.replace(recipe, stages=stages)


def _delta_pct(q_ppl, src_ppl) -> float:
    return 100.0 * (q_ppl.perplexity / src_ppl.perplexity - 1.0)


def run_mixed_precision(run: Run, src_ppl) -> tuple[Quantized, dict]:
    """Resolve the keep list (measuring if needed), quantize with `run.quantize`, and return the quantization to
    export (its recipe has the keep list filled in) with the report's `mixed_precision` section."""
    recipe, adapter, model = run.recipe, run.resolved.adapter, run.placement.model
    stage = recipe.stage("mixed_precision")
    report: dict = {"keep_sensitive": stage.keep_sensitive, "measured": stage.keep is None}
    if stage.keep is None and stage.keep_sensitive == 0:  # nothing to rank
        recipe, report["measured"] = with_keep(recipe, []), False
        stage = recipe.stage("mixed_precision")
    if stage.keep is not None:
        report |= {"keep": list(stage.keep), "kept_groups": _groups_of(stage.keep, adapter, model.config)}
        return run.quantize(recipe, model), report

    ranking, report_rows = _rank(run, recipe, stage)
    report |= report_rows
    if stage.keep_sensitive != "auto":
        keep = [name for g in ranking[: stage.keep_sensitive] for name in g]
        report |= {"keep": keep, "kept_groups": _groups_of(keep, adapter, model.config)}
        return run.quantize(with_keep(recipe, keep), model), report
    best, search = _fewest_groups(run, recipe, stage, ranking, src_ppl)
    kept = [n for g in best["groups"] for n in g]
    report |= {"keep": kept, "kept_groups": _groups_of(kept, adapter, model.config), "search": search}
    return best["result"], report


def _rank(run: Run, recipe: Recipe, stage) -> tuple[list, dict]:
    """Fused groups, most sensitive first, and the report rows of that measurement."""
    adapter, model = run.resolved.adapter, run.placement.model
    scheme = scheme_for_stage(recipe.quantizer_config)
    windows = run.calib[: stage.sensitivity_samples]
    n_groups = len(all_groups(adapter, len(model.get_submodule(adapter.layers_path)), model.config))
    model.to(run.device)
    with run.reporter.step(f"sensitivity ({n_groups} fused groups, {scheme.label})", n_groups) as advance:
        ranking, measured = rank_groups(model, adapter, windows, scheme, run.device, on_unit=lambda i, n: advance())
    model.to("cpu")
    rows = {r["unit"]: r for r in measured.rows}
    return ranking, {
        "scheme": scheme.label,
        "sensitivity_tokens": measured.tokens,
        "sensitivity_seconds": measured.seconds,
        "proxy_rank_correlation": measured.proxy_correlation("group"),
        "ranking": [{k: rows[u][k] for k in ("unit", "layer", "type", "kl", "proxy", "delta_nll")}
                    for u in measured.ranking("group")],
    }


def _fewest_groups(run: Run, recipe: Recipe, stage, ranking: list, src_ppl) -> tuple[dict, dict]:
    """`keep_sensitive: auto`: quantize with 0, 1, ... of the most sensitive groups kept until the perplexity gate
    passes (each candidate a whole quantization of a fresh source copy); the best candidate and the search record."""
    limit = recipe.eval.max_ppl_increase_pct
    best: dict = {}
    pristine = [run.placement.model]  # the loaded source serves the first candidate; later ones reload it

    def measure(kept_groups: list) -> float:
        source = pristine.pop() if pristine else run.placement.load_source()
        result = run.quantize(with_keep(recipe, [name for g in kept_groups for name in g]), source)
        delta = _delta_pct(result.ppl, src_ppl)
        run.reporter.log(f"mixed precision: keeping {len(kept_groups)} group(s) -> perplexity {delta:+.3f}% (limit {limit}%)")
        if not best or delta < best["delta"]:
            best.clear()
            gc.collect()
            best.update(result=result, delta=delta, groups=kept_groups)
        else:
            del source, result
            gc.collect()
        return delta

    budget = min(stage.max_keep, len(ranking))
    selection = fewest_within(ranking, measure, limit, budget)
    # the selection's prefix is the best candidate: the first that passed, or the lowest perplexity (fewest on ties)
    if not selection.met:
        run.reporter.log(f"mixed precision: even keeping {budget} group(s) (max_keep) misses the limit; writing the best "
                         f"({len(selection.keep)} kept, {best['delta']:+.3f}%)")
    search = {"limit_pct": limit, "max_keep": stage.max_keep, "met": selection.met,
              "attempts": [{"kept_groups": k, "delta_ppl_pct": d} for k, d in selection.measured]}
    best["groups"] = selection.keep
    return best, search


def _split(name: str, adapter: ArchAdapter) -> tuple[str, str]:
    """`model.layers.3.mlp.up_proj` -> (`model.layers.3`, `mlp.up_proj`)."""
    head = adapter.layers_path + "."
    index, _, rel = name[len(head):].partition(".")
    return head + index, rel


def _groups_of(keep: list[str], adapter: ArchAdapter, config=None) -> list[str]:
    """Labels like `model.layers.3:gate+up` of the fused groups a keep list covers, in its order."""
    labels: list[str] = []
    for name in keep:
        prefix, rel = _split(name, adapter)
        layer = adapter.for_layer(config, int(prefix.rsplit(".", 1)[1]))
        label = f"{prefix}:{group_label(layer.fused_group_of(rel))}"
        if label not in labels:
            labels.append(label)
    return labels
