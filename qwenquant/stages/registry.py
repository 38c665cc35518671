"""The stage registry: every stage a recipe may name, in the order recipes list them. A new scheme is one module
in this package with a `SPEC` (qwenquant/stages/spec.py), added to `STAGES` here."""

from __future__ import annotations

from types import MappingProxyType

from qwenquant.stages import awq, compensate, fp8, gptq, int8, mixed_precision, nvfp4, rtn, smooth
from qwenquant.stages.spec import StageSpec

STAGES: MappingProxyType[str, StageSpec] = MappingProxyType({
    spec.name: spec for spec in (mixed_precision.SPEC, smooth.SPEC, fp8.SPEC, int8.SPEC, nvfp4.SPEC, rtn.SPEC,
                                 gptq.SPEC, awq.SPEC, compensate.SPEC)
})
QUANTIZERS = tuple(name for name, spec in STAGES.items() if spec.role == "quantizer")


def spec_of(config) -> StageSpec:
    """The registry entry whose config class `config` is an instance of (exactly)."""
    for spec in STAGES.values():
        if type(config) is spec.config:
            return spec
    raise TypeError(f"not a stage config: {config!r}")


def stage_name(config) -> str:
    return spec_of(config).name
