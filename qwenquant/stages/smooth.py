"""The `smooth` stage: SmoothQuant-style activation scaling folded into the preceding norms/linears."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qwenquant.quant import smooth as sq
from qwenquant.stages.context import LayerContext
from qwenquant.stages.fold import fold_mapping
from qwenquant.stages.observe import collect_channel_absmax
from qwenquant.stages.per_layer_search import ALPHA_SEARCH_QUANTIZERS, SMOOTH_ALPHA_KEY, layer_alpha
from qwenquant.stages.spec import ROUGH_TIME_NOTE, StageSpec
from qwenquant.validation import choice, ratio_map


@dataclass
class SmoothStage:
    """SmoothQuant-style activation scaling folded into preceding norms/linears."""

    alpha: float = 0.5
    mappings: str = "all"  # all | norms (only input/post-attention layernorms)
    layer_alpha: dict[int, float] = field(default_factory=dict)  # decoder layer -> alpha (overrides alpha)
    alpha_search: bool = False  # choose each layer's alpha by its quantized (fp8 / int8) output error (scale search)

    def __post_init__(self) -> None:
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smooth.alpha: must be a number in [0, 1], got {self.alpha!r}")
        choice("smooth.mappings", self.mappings, ("all", "norms"))
        ratio_map("smooth.layer_alpha", self.layer_alpha, int, 0.0)
        if self.alpha_search and self.layer_alpha:
            raise ValueError("smooth.layer_alpha: set either alpha_search or per-layer alphas, not both")

    def alpha_for(self, layer: int) -> float:
        return float(self.layer_alpha.get(layer, self.alpha))


def smooth_layer(ctx: LayerContext, cfg: SmoothStage) -> dict:
    """Fold SmoothQuant factors into each mapping of the adapter; the layer's function is unchanged.
    With `cfg.alpha_search` the layer's alpha is chosen by the error of the recipe's fp8 or int8 quantizer
    (`ctx.quantizer`)."""
    mappings = [m for m in ctx.adapter.smooth_mappings if cfg.mappings == "all" or m.kind == "norm"]
    absmax = collect_channel_absmax(ctx, [m.balance[0] for m in mappings])
    report = {}
    alpha, alpha_report = layer_alpha(ctx, cfg, ctx.quantizer, mappings, absmax)
    if alpha_report:
        report["alpha_search"] = alpha_report
    for m in mappings:
        balance = [ctx.linear(b) for b in m.balance]
        s = sq.smoothing_factors(absmax[m.balance[0]], [b.weight for b in balance], alpha)
        s = fold_mapping(ctx, m, s)
        report[m.smooth] = {"factor_min": float(s.min()), "factor_max": float(s.max())}
    return report


def _check(cfg: SmoothStage, quantizer: str) -> None:
    if cfg.alpha_search and quantizer not in ALPHA_SEARCH_QUANTIZERS:
        raise ValueError("stages: smooth.alpha_search measures the quantizer's weight and activation error; it needs "
                         f"the {' or '.join(ALPHA_SEARCH_QUANTIZERS)} quantizer")


def _resolve(cfg: SmoothStage, searched: dict) -> SmoothStage:
    alpha = searched.get(SMOOTH_ALPHA_KEY)
    if cfg.alpha_search and alpha is not None:
        return dataclasses.replace(cfg, alpha_search=False, layer_alpha=dict(alpha))
    return cfg


# -- the estimator's cost model (StageSpec cost fields; qwenquant/estimate/) ----------------------------------------


def _host_bytes(cfg: SmoothStage, need) -> tuple[int, str]:
    return 0, ""  # per-channel absmax vectors and factors: nothing beside the loop's calibration batch


def _seconds(cfg: SmoothStage, need) -> tuple[float, str]:
    """A forward for the channel absmax, and folding the factors (a fraction of a quantizer pass)."""
    return need.calibration_forwards() + 0.2 * need.quant_pass, ROUGH_TIME_NOTE if cfg.alpha_search else ""


SPEC = StageSpec("smooth", SmoothStage, "transform", smooth_layer, check=_check, resolve=_resolve,
                 host_bytes=_host_bytes, seconds=_seconds, tag=lambda cfg: "SMOOTH",
                 data_parallel=lambda _cfg: True)
