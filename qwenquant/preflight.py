"""Checks made before any weight is loaded, from the recipe, config.json and the paths alone, shared by a run and
its --dry-run estimate: each refuses with a one-line BadInputError naming the problem and the fix."""

from __future__ import annotations

from pathlib import Path

from qwenquant.errors import BadInputError
from qwenquant.export.registry import FORMATS
from qwenquant.model.qwen3 import ArchAdapter, linear_shapes
from qwenquant.sensitivity import fused_units
from qwenquant.stages.registry import STAGES, spec_of


def needs_calibration(recipe) -> bool:
    """Whether any stage of the recipe, or KV-cache calibration, uses calibration data (round-to-nearest alone uses
    none)."""
    return recipe.kv_cache.enabled or any(spec_of(cfg).uses_calibration(cfg) for cfg in recipe.stages)


def check_layout(recipe, config: dict) -> None:
    """Refuse shapes the recipe's quantizer (its scheme) or its export format (its storage) cannot handle; a Linear
    (`mlp.down_proj`, one shape in every layer) that a mixed_precision keep list leaves in the source dtype in every
    layer is not quantized and not checked."""
    spec, fmt = STAGES[recipe.quantizer], FORMATS[recipe.export.format]
    cfg = recipe.quantizer_config
    if fmt.check_config is not None and (problem := fmt.check_config(config)):
        raise BadInputError(problem)
    mixed = recipe.stage("mixed_precision")
    kept = set(mixed.keep or []) if mixed is not None else set()
    for name, (n, k) in linear_shapes(config).items():
        if sum(full.endswith("." + name) for full in kept) >= int(config["num_hidden_layers"]):
            continue
        problem = spec.check_linear(cfg, name, n, k) or fmt.check_linear(spec.record_kind, cfg, name, n, k)
        if problem:
            raise BadInputError(problem)


def check_not_source(out: Path, model_path: Path) -> None:
    """Never let --out (with --overwrite) replace or nest inside the source checkpoint."""
    o, m = Path(out).resolve(), Path(model_path).resolve()
    if o == m or m in o.parents or o in m.parents:
        raise BadInputError(f"--out {out} overlaps the source model folder {model_path}; choose another --out")


def check_offload(recipe) -> None:
    """Refuse what --offload-dir cannot do: anything that needs the whole model in memory."""
    if recipe.eval.tasks:
        raise BadInputError("--tasks needs the whole model in memory (lm-eval); with --offload-dir drop --tasks "
                            "(and --min-task-recovery), or run without --offload-dir")
    if recipe.stage("mixed_precision") is not None:
        raise BadInputError("mixed precision (--keep-sensitive) ranks and re-quantizes the whole model in memory; "
                            "with --offload-dir drop it, or run without --offload-dir")
    if FORMATS[recipe.export.format].write_folder is not None:
        raise BadInputError(f"--format {recipe.export.format} is written and verified from the whole model in memory; "
                            "drop --offload-dir")
    if recipe.kv_cache.enabled:
        raise BadInputError("--kv-cache fp8 is not available with --offload-dir yet (its layer-streamed evaluation "
                            "does not simulate the FP8 cache); drop one of them")


def all_groups(adapter: ArchAdapter, num_layers: int, config=None) -> list[tuple[str, ...]]:
    """Every fused group of the model as full Linear names, layer by layer (`config` tells MoE layers apart)."""
    return [tuple(f"{adapter.layers_path}.{i}.{n}" for n in g)
            for i, layer in enumerate(adapter.layers(config, num_layers)) for g in fused_units(layer)]


def check_mixed_precision(recipe, adapter: ArchAdapter, config: dict) -> None:
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
