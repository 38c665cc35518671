"""Which recipes take the data-free streaming path (qwenquant/stream/), and why the others do not."""

from __future__ import annotations

from qwenquant.export.registry import FORMATS
from qwenquant.stages.registry import spec_of


def streaming_blockers(recipe) -> list[str]:
    """Why `recipe` cannot stream, one reason per item; empty when it streams: its only stage is a quantizer whose
    config is data-free (`StageSpec.data_free`), and nothing needs the whole model in memory."""
    reasons = []
    others = [spec_of(cfg).name for cfg in recipe.stages if spec_of(cfg).role != "quantizer"]
    if others:
        reasons.append(f"stage{'s' if len(others) > 1 else ''} {', '.join(others)} need{'' if len(others) > 1 else 's'} "
                       "calibration forwards")
    cfg = recipe.quantizer_config
    spec = spec_of(cfg)
    if not spec.data_free(cfg):
        reasons.append(f"{spec.name} with these settings needs calibration data")
    if recipe.eval.tasks:
        reasons.append("--tasks (lm-eval) needs the whole model in memory")
    if recipe.kv_cache.enabled:
        reasons.append("--kv-cache fp8 calibrates K/V scales on calibration forwards")
    if FORMATS[recipe.export.format].write_folder is not None:
        reasons.append(f"--format {recipe.export.format} is written by its own writer, not as streamed safetensors shards")
    return reasons


def streams(recipe) -> bool:
    return not streaming_blockers(recipe)
