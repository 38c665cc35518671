"""Mixed precision (glue): resolve a recipe's `mixed_precision` stage into an explicit list of Linears kept in the
source dtype, measuring fused-group sensitivity (qwenquant.sensitivity) when asked to choose.

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
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from qwenquant.errors import BadInputError
from qwenquant.model.qwen3 import ArchAdapter
from qwenquant.quant.sensitivity import fewest_within
from qwenquant.recipe import Recipe
from qwenquant.sensitivity import fused_units, group_label, rank_groups, scheme_for_stage

# (recipe, source model) -> (QuantState, quantized perplexity or None, quantized log-probs); mutates the model
QuantizeAndEvaluate = Callable[[Recipe, nn.Module], tuple]


def all_groups(adapter: ArchAdapter, num_layers: int, config=None) -> list[tuple[str, ...]]:
    """Every fused group of the model as full Linear names, layer by layer (`config` tells MoE layers apart)."""
    return [tuple(f"{adapter.layers_path}.{i}.{n}" for n in g)
            for i, layer in enumerate(adapter.layers(config, num_layers)) for g in fused_units(layer)]


def check_mixed_precision(recipe: Recipe, adapter: ArchAdapter, config: dict) -> None:
    """Refuse, before loading weights, a count beyond the model's groups and keep lists that split a fused group."""
    stage = recipe.stage("mixed_precision")
    if stage is None:
        return
    groups = all_groups(adapter, int(config["num_hidden_layers"]), config)
    n = len(groups)
    if isinstance(stage.keep_sensitive, int) and stage.keep_sensitive > n:
        raise BadInputError(f"--keep-sensitive {stage.keep_sensitive}: the model has only {n} fused groups "
                            f"in {config['num_hidden_layers']} layers; use at most {n}")
    if stage.keep is None:
        return
    group_of = {name: g for g in groups for name in g}
    unknown = [name for name in stage.keep if name not in group_of]
    if unknown:
        raise BadInputError(f"mixed_precision.keep: {unknown[0]} is not a quantizable Linear of this model "
                            f"(names look like {groups[0][0]})")
    kept = set(stage.keep)
    for name in stage.keep:
        missing = [m for m in group_of[name] if m not in kept]
        if missing:
            raise BadInputError(f"mixed_precision.keep: {name} is fused with {', '.join(missing)} in vLLM; "
                                "keep the whole group (one ignore status per fused group)")


def with_keep(recipe: Recipe, keep: list[str]) -> Recipe:
    """A copy of the recipe whose mixed_precision stage lists `keep` explicitly."""
    stages = [dataclasses.replace(s, keep=list(keep)) if s is recipe.stage("mixed_precision") else s
              for s in recipe.stages]
    return dataclasses.replace(recipe, stages=stages)


@dataclass
class MixedOutcome:
    recipe: Recipe  # resolved: mixed_precision.keep filled in
    model: nn.Module  # the quantized model to export
    result: tuple  # (state, q_ppl, q_logp) of that model
    report: dict  # `mixed_precision` section of the run report


def _delta_pct(q_ppl, src_ppl) -> float:
    return 100.0 * (q_ppl.perplexity / src_ppl.perplexity - 1.0)


def run_mixed_precision(recipe: Recipe, model: nn.Module, adapter: ArchAdapter, calib: torch.Tensor,
                        device: torch.device, reporter, src_ppl, quantize_and_evaluate: QuantizeAndEvaluate,
                        load_source: Callable[[], nn.Module]) -> MixedOutcome:
    """Resolve the keep list (measuring if needed), quantize, and return what to export (see module docstring)."""
    stage = recipe.stage("mixed_precision")
    report: dict = {"keep_sensitive": stage.keep_sensitive, "measured": stage.keep is None}
    if stage.keep is None and stage.keep_sensitive == 0:  # nothing to rank
        recipe, report["measured"] = with_keep(recipe, []), False
        stage = recipe.stage("mixed_precision")
    if stage.keep is not None:
        report |= {"keep": list(stage.keep), "kept_groups": _groups_of(stage.keep, adapter, model.config)}
        return MixedOutcome(recipe, model, quantize_and_evaluate(recipe, model), report)

    scheme = scheme_for_stage(recipe.stage(recipe.quantizer))
    windows = calib[: stage.sensitivity_samples]
    n_groups = len(all_groups(adapter, len(model.get_submodule(adapter.layers_path)), model.config))
    model.to(device)
    with reporter.step(f"sensitivity ({n_groups} fused groups, {scheme.label})", n_groups) as advance:
        ranking, measured = rank_groups(model, adapter, windows, scheme, device, on_unit=lambda i, n: advance())
    model.to("cpu")
    rows = {r["unit"]: r for r in measured.rows}
    report |= {
        "scheme": scheme.label,
        "sensitivity_tokens": measured.tokens,
        "sensitivity_seconds": measured.seconds,
        "proxy_rank_correlation": measured.proxy_correlation("group"),
        "ranking": [{k: rows[u][k] for k in ("unit", "layer", "type", "kl", "proxy", "delta_nll")}
                    for u in measured.ranking("group")],
    }

    if stage.keep_sensitive != "auto":
        keep = [name for g in ranking[: stage.keep_sensitive] for name in g]
        resolved = with_keep(recipe, keep)
        report |= {"keep": keep, "kept_groups": _groups_of(keep, adapter, model.config)}
        return MixedOutcome(resolved, model, quantize_and_evaluate(resolved, model), report)

    limit = recipe.eval.max_ppl_increase_pct
    best: dict = {}
    pristine = [model]  # the loaded source serves the first candidate; later ones reload it

    def measure(kept_groups: list) -> float:
        keep = [name for g in kept_groups for name in g]
        candidate = with_keep(recipe, keep)
        source = pristine.pop() if pristine else load_source()
        result = quantize_and_evaluate(candidate, source)
        delta = _delta_pct(result[1], src_ppl)
        reporter.log(f"mixed precision: keeping {len(kept_groups)} group(s) -> perplexity {delta:+.3f}% (limit {limit}%)")
        if not best or delta < best["delta"]:
            best.clear()
            gc.collect()
            best.update(recipe=candidate, model=source, result=result, delta=delta, groups=kept_groups)
        else:
            del source, result
            gc.collect()
        return delta

    budget = min(stage.max_keep, len(ranking))
    selection = fewest_within(ranking, measure, limit, budget)
    # the selection's prefix is the best candidate: the first that passed, or the lowest perplexity (fewest on ties)
    report |= {
        "keep": [name for g in selection.keep for name in g],
        "kept_groups": _groups_of([n for g in selection.keep for n in g], adapter, model.config),
        "search": {"limit_pct": limit, "max_keep": stage.max_keep, "met": selection.met,
                   "attempts": [{"kept_groups": k, "delta_ppl_pct": d} for k, d in selection.measured]},
    }
    if not selection.met:
        reporter.log(f"mixed precision: even keeping {budget} group(s) (max_keep) misses the limit; writing the best "
                     f"({len(selection.keep)} kept, {best['delta']:+.3f}%)")
    return MixedOutcome(best["recipe"], best["model"], best["result"], report)


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
