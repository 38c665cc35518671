"""The `mixed_precision` stage (plan, first): keep whole vLLM fused groups in the source dtype. The loop stage only
marks the kept Linears; choosing them (measuring sensitivity, trying candidates) is the mixed-precision driver's
job (qwenquant/runner/mixed.py), which hands this stage a resolved `keep` list."""

from __future__ import annotations

from dataclasses import dataclass

from qwenquant.stages.context import LayerContext
from qwenquant.stages.spec import StageSpec
from qwenquant.validation import positive


@dataclass
class MixedPrecisionStage:
    """Keep whole vLLM fused groups (q/k/v, o, gate/up, down of a layer) in the source dtype.

    `keep_sensitive`: N (the N most sensitive groups, measured with qwenquant.sensitivity on the first
    `sensitivity_samples` calibration windows), "auto" (the fewest, at most `max_keep`, meeting
    eval.max_ppl_increase_pct), or null. `keep`: the resolved full Linear names; when set nothing is measured.
    """

    keep_sensitive: int | str | None = None
    keep: list[str] | None = None
    max_keep: int = 8
    sensitivity_samples: int = 8

    def __post_init__(self) -> None:
        ks = self.keep_sensitive
        if ks is not None and ks != "auto" and (not isinstance(ks, int) or isinstance(ks, bool) or ks < 0):
            raise ValueError(f"mixed_precision.keep_sensitive: {ks!r} is not allowed; use a count >= 0, auto or null")
        if self.keep is not None:
            if not isinstance(self.keep, list) or not all(isinstance(n, str) and n for n in self.keep):
                raise ValueError("mixed_precision.keep: must be a list of module names")
            if len(set(self.keep)) != len(self.keep):
                raise ValueError("mixed_precision.keep: lists a module twice")
        if ks is None and self.keep is None:
            raise ValueError("mixed_precision: set keep_sensitive (N or auto) or keep (module names)")
        positive("mixed_precision.max_keep", self.max_keep)
        positive("mixed_precision.sensitivity_samples", self.sensitivity_samples)


def mixed_precision_layer(ctx: LayerContext, cfg: MixedPrecisionStage) -> dict:
    """Mark this layer's Linears listed in `cfg.keep` as kept: later stages leave them unquantized (no record, so
    the exporter writes them in the source dtype and lists them in `ignore`)."""
    if cfg.keep is None:
        raise ValueError("mixed_precision: the keep list is not resolved (a mixed-precision run resolves it first)")
    kept = [n for n in ctx.adapter.linears if ctx.full_name(n) in cfg.keep]
    ctx.state.keep.update(ctx.full_name(n) for n in kept)
    return {"kept": kept}


# -- the estimator's cost model (StageSpec cost fields; qwenquant/estimate/) ----------------------------------------


def _host_bytes(cfg: MixedPrecisionStage, need) -> tuple[int, str]:
    return 0, ""  # the loop stage only marks Linears


def _seconds(cfg: MixedPrecisionStage, need) -> tuple[float, str]:
    if cfg.keep is None:
        return 0.0, "mixed precision: measuring sensitivity (and each `auto` candidate run) is not in the time estimate"
    return 0.0, ""


def _kept_linears(cfg: MixedPrecisionStage, facts) -> tuple[set[str], str]:
    """The keep list; for a count, N groups in layer order (q/k/v, o, gate/up, down, next layer, ...): which groups
    are most sensitive is measured in the run, this is a typical mix of group sizes; `auto` may keep none."""
    if cfg.keep is not None:
        return set(cfg.keep), ""
    if cfg.keep_sensitive == "auto":
        return set(), f"--keep-sensitive auto keeps 0 to {cfg.max_keep} groups: sizes assume none"
    groups = facts.groups or [[l] for l in facts.linears]
    kept = {l.name for g in groups[: cfg.keep_sensitive] for l in g}
    return kept, (f"--keep-sensitive {cfg.keep_sensitive}: which groups stay bf16 is measured in the run; "
                  "sizes assume a typical mix")


def _check(cfg: MixedPrecisionStage, quantizer: str) -> None:
    """Ranking groups (qwenquant.sensitivity) knows FP8 and weight-only INT schemes, not INT8 W8A8."""
    if cfg.keep is None and quantizer == "int8":
        raise ValueError("mixed_precision.keep_sensitive: sensitivity ranking has no INT8 W8A8 scheme yet; list the "
                         "Linears to keep in mixed_precision.keep instead")
    if cfg.keep is None and quantizer == "nvfp4":
        raise ValueError("mixed_precision.keep_sensitive: sensitivity ranking has no NVFP4 scheme yet; list the "
                         "Linears to keep in mixed_precision.keep instead")


SPEC = StageSpec("mixed_precision", MixedPrecisionStage, "plan", mixed_precision_layer, check=_check,
                 uses_calibration=lambda cfg: cfg.keep is None,  # ranking groups needs data; a keep list does not
                 host_bytes=_host_bytes, seconds=_seconds, kept_linears=_kept_linears,
                 tag=lambda cfg: f"KEEP{cfg.keep_sensitive}".upper() if cfg.keep is None else "KEEP")
