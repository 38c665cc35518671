"""The `rtn` quantizer stage: INT round-to-nearest with the same group layout, the baseline every INT method is
measured against. Without clip search it needs no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenquant.quant import intq
from qwenquant.stages.context import LayerContext
from qwenquant.stages.int_weights import (ClippedIntStage, check_group_size, clip_key, int_label, int_probe_quantize,
                                          int_record_bytes, int_serving_scheme, int_tag, resolve_clip)
from qwenquant.stages.observe import clip_report, quantized_names, store_int
from qwenquant.stages.per_layer_search import layer_clips
from qwenquant.stages.spec import ROUGH_TIME_NOTE, StageSpec


@dataclass
class RTNStage(ClippedIntStage):
    name = "rtn"


def rtn_layer(ctx: LayerContext, cfg: RTNStage) -> dict:
    """Round-to-nearest with the same group layout: the baseline every INT benchmark reports."""
    report: dict = {}
    names = quantized_names(ctx, ctx.adapter.linears)
    clips, search = layer_clips(ctx, cfg, clip_key("rtn"), names)  # 1.0 unless clip ratios are given or searched
    for name in names:
        w = ctx.linear(name).weight.data
        qw = intq.quantize_rtn(w.float(), cfg.bits, cfg.group_size, cfg.symmetric, clips[name], scale_dtype=w.dtype)
        store_int(ctx, name, qw, report, clip_report(clips[name], search.get(name)))
    return report


def quantize_weight(cfg: RTNStage, name: str, w: torch.Tensor, group_absmax=None):
    """The data-free path's round-to-nearest for one Linear (full `name`): the values `rtn_layer` records."""
    del group_absmax  # INT groups are per Linear
    return intq.quantize_rtn(w.float(), cfg.bits, cfg.group_size, cfg.symmetric, float(cfg.clip.get(name, 1.0)),
                             scale_dtype=w.dtype)


# -- the estimator's cost model (StageSpec cost fields; qwenquant/estimate/) ----------------------------------------


def _host_bytes(cfg: RTNStage, need) -> tuple[int, str]:
    return need.weight_copies()


def _seconds(cfg: RTNStage, need) -> tuple[float, str]:
    """One quantizer pass (a clip search's forwards and candidates are not modelled)."""
    return need.quant_pass, ROUGH_TIME_NOTE if cfg.clip_search else ""


SPEC = StageSpec("rtn", RTNStage, "quantizer", rtn_layer, record_kind="int", check_linear=check_group_size,
                 uses_calibration=lambda cfg: cfg.clip_search, resolve=resolve_clip("rtn"),
                 host_bytes=_host_bytes, seconds=_seconds, record_bytes=int_record_bytes, label=int_label,
                 probe_quantize=int_probe_quantize, data_free=lambda cfg: not cfg.clip_search,
                 quantize_weight=quantize_weight, tag=int_tag(default_symmetric=True),
                 serving_scheme=int_serving_scheme, data_parallel=lambda _cfg: True)
