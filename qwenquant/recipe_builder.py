"""Recipes from the settings of the quantize commands (`qwenquant fp8 | gptq | awq | rtn`).

The commands' flags each set one field of a recipe section or stage config (qwenquant/cli/options.py binds
them); this module holds what they mean beyond that: the values typed as text (`--tasks a,b`, `--keep-sensitive
N|auto`, `--compensate-target`), the order of the stages (the stage registry's), and what a scale search covers
for FP8. Errors are the one-line BadInputErrors the CLI prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from qwenquant.errors import BadInputError
from qwenquant.recipe import (CalibrationConfig, EvalConfig, ExportConfig, KVCacheConfig, ModelConfig, Recipe, TargetConfig,
                              validate)
from qwenquant.stages.compensate import COMPENSATE_TARGETS
from qwenquant.stages.fp8 import FP8Stage
from qwenquant.stages.registry import STAGES, spec_of
from qwenquant.stages.smooth import SmoothStage

SECTIONS = {"model": ModelConfig, "calibration": CalibrationConfig, "export": ExportConfig, "eval": EvalConfig,
            "target": TargetConfig, "kv_cache": KVCacheConfig}
MIXED_GRANULARITY_FORMAT = "compressed-tensors"  # stores channel and block FP8 groups in one checkpoint


def parse_tasks(text: str | None) -> list[str]:
    """`--tasks hellaswag,piqa` -> ["hellaswag", "piqa"] (blanks dropped; None or "" -> [])."""
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def tasks_text(tasks: list[str]) -> str | None:
    """The inverse of `parse_tasks` ([] -> None: no flag)."""
    return ",".join(tasks) or None


def parse_keep_sensitive(text: str | None) -> int | str | None:
    """`--keep-sensitive N|auto` -> N, "auto" or None (not given); anything else is a one-line BadInputError."""
    if text is None:
        return None
    value = text.strip().lower()
    if value == "auto":
        return value
    if not value.isdigit():
        raise BadInputError(f"--keep-sensitive {text!r}: use a number of groups (0, 1, 2, ...) or auto")
    return int(value)


def parse_compensate_target(text: str) -> str:
    """`--compensate-target float|layer`; anything else is a one-line BadInputError."""
    if text not in COMPENSATE_TARGETS:
        raise BadInputError(f"--compensate-target {text!r}: use float or layer")
    return text


def quantize_recipe(settings: Mapping[str, Mapping], device: str = Recipe.device) -> Recipe:
    """A validated Recipe from settings per recipe section ("model", "calibration", "eval", "export") and per
    stage ("mixed_precision", "smooth", the quantizer fp8 | rtn | gptq | awq, "compensate"; a stage is in the
    recipe when its name is there), each a mapping of config fields to values; sections not given take their
    defaults. Stages go in the order of the stage registry (qwenquant/stages/registry.py), which is the order
    recipes list them: mixed precision first, smoothing before the quantizer, compensation after it.

    An fp8 stage with `clip_search` (the commands' --scale-search) searches all that FP8 can: each smoothed
    layer's alpha, and each fused group's channel or block granularity where one checkpoint stores both
    (channel weights, dynamic activations, compressed-tensors). Bad values: one-line BadInputError."""
    unknown = sorted(set(settings) - set(SECTIONS) - set(STAGES))
    if unknown:
        raise ValueError(f"quantize_recipe: unknown section {unknown[0]!r}")

    def build() -> Recipe:
        stages = [STAGES[name].config(**settings[name]) for name in STAGES if name in settings]
        sections = {key: cls(**settings.get(key, {})) for key, cls in SECTIONS.items()}
        return Recipe(stages=_fp8_scale_search(stages, sections["export"]), device=device, **sections)

    return validate(build)


def output_tag(recipe: Recipe, scheme: str) -> str:
    """The suffix of a quantize command's default output folder ./<model>-<suffix>: `scheme` (`FP8`, `W4A16-GPTQ`),
    each stage's `tag` (what differs from its command's defaults) and a format other than compressed-tensors, so
    different recipes run one after another write different folders (`qwen3-mini-FP8-BLOCK-hf-fp8`)."""
    parts = [scheme] + [spec_of(stage).tag(stage) for stage in recipe.stages]
    if recipe.kv_cache.enabled:  # qwen3-mini-W4A16-GPTQ-KV-FP8(-HEAD)
        parts.append("KV-FP8" + ("-HEAD" if recipe.kv_cache.strategy == "head" else ""))
    if recipe.export.format != ExportConfig.format:
        parts.append(recipe.export.format)
    return "-".join(p for p in parts if p)


def _fp8_scale_search(stages: list, export: ExportConfig) -> list:
    """The stages with every FP8 search on when the fp8 stage searches its clipping (see `quantize_recipe`)."""
    fp8 = next((s for s in stages if isinstance(s, FP8Stage)), None)
    if fp8 is None or not fp8.clip_search:
        return stages
    both = fp8.weights == "channel" and fp8.activations == "dynamic" and export.format == MIXED_GRANULARITY_FORMAT

    def searching(stage):
        if stage is fp8:
            return dataclasses.replace(fp8, granularity_search=fp8.granularity_search or both)
        if isinstance(stage, SmoothStage):
            return dataclasses.replace(stage, alpha_search=True)
        return stage

    return [searching(s) for s in stages]
