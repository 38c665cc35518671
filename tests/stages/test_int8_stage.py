"""The `int8` stage in the sequential pipeline on the tiny model with synthetic outlier channels (embedding dims
scaled up, so every layer's inputs carry them): records and activation specs it registers, smoothing with the alpha
searched per layer by the INT8 error cutting the layer's W8A8 output error clearly against no smoothing, GPTQ no
worse than RTN; recipe validation naming its keys."""

from __future__ import annotations

import copy

import pytest
import torch

from qwenquant.activations import activation_quantization, capture_layer0_inputs
from qwenquant.calibration import load_calibration
from qwenquant.model.loader import load_model, resolve_model
from qwenquant.pipeline import run_sequential
from qwenquant.recipe import Recipe
from qwenquant.stages.int8 import SPEC, Int8Stage
from qwenquant.stages.mixed_precision import MixedPrecisionStage
from qwenquant.stages.per_layer_search import SMOOTH_ALPHA_KEY
from qwenquant.stages.smooth import SmoothStage
from qwenquant.state import ActivationSpec, QuantState

CPU = torch.device("cpu")
OUTLIER_DIMS = [3, 17, 77, 100]
OUTLIER_FACTOR = 50.0


@pytest.fixture(scope="module")
def tiny(tiny_qwen3):
    """(source model with outlier embedding dims, adapter, calibration ids [16, 64], held-out ids [8, 64])."""
    resolved = resolve_model(str(tiny_qwen3))
    model, tokenizer = load_model(resolved)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, OUTLIER_DIMS] *= OUTLIER_FACTOR
    calib = load_calibration("builtin:en", tokenizer, 16, 64, 0)
    held_out = load_calibration("builtin:zh", tokenizer, 8, 64, 1)
    return model, resolved.adapter, calib, held_out


def quantize(tiny, stages):
    source, adapter, calib, _ = tiny
    model, state = copy.deepcopy(source), QuantState()
    run_sequential(model, adapter, calib, stages, CPU, state)
    return model, state


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def layer0_error(tiny, quantized, state) -> float:
    """Relative squared error of decoder layer 0's residual branches on held-out inputs, the quantized layer
    computing with INT8 activations as the engine does (the residual passes unchanged: left out)."""
    source, adapter, _, held_out = tiny
    cache = capture_layer0_inputs(source, adapter, held_out, 8, CPU)
    src, q = source.model.layers[0], quantized.model.layers[0]
    err = ref = 0.0
    with activation_quantization(q, state.activations, prefix="model.layers.0."):
        for h, kw in zip(cache.hidden, cache.kwargs):
            a = (_out(src(h, **kw)) - h).float()
            b = (_out(q(h, **kw)) - h).float()
            err += float((a - b).pow(2).sum())
            ref += float(a.pow(2).sum())
    return err / ref


def test_records_and_activation_specs(tiny) -> None:
    _, state = quantize(tiny, [Int8Stage(method="rtn")])
    assert len(state.records) == 14
    for name, record in state.records.items():
        assert record.kind == "int8" and record.bits == 8 and record.scale.shape == (record.q.shape[0], 1)
        assert state.activations[name] == ActivationSpec("token", dtype="int8")


def test_smoothing_with_searched_alpha_cuts_int8_layer_error(tiny) -> None:
    plain_model, plain = quantize(tiny, [Int8Stage(method="rtn")])
    smooth_model, smooth = quantize(tiny, [SmoothStage(alpha_search=True), Int8Stage(method="rtn")])
    gptq_model, gptq = quantize(tiny, [SmoothStage(alpha_search=True), Int8Stage(method="gptq")])
    e_plain = layer0_error(tiny, plain_model, plain)
    e_smooth = layer0_error(tiny, smooth_model, smooth)
    e_gptq = layer0_error(tiny, gptq_model, gptq)
    alphas = smooth.searched[SMOOTH_ALPHA_KEY]
    print(f"layer 0 INT8 W8A8 branch error: no smoothing {e_plain:.3e}, smoothing (alphas {alphas}) {e_smooth:.3e} "
          f"(ratio {e_smooth / e_plain:.3f}), + GPTQ {e_gptq:.3e}")
    assert sorted(alphas) == [0, 1]
    # measured: 1.19e-03 -> 3.56e-04 (ratio 0.30, alphas 0.6 / 0.6), GPTQ 2.92e-04
    assert e_smooth / e_plain < 0.5
    assert e_gptq <= e_smooth * 1.1


def test_alpha_search_reports_the_gain_over_the_configured_alpha(tiny) -> None:
    _, state = quantize(tiny, [SmoothStage(alpha_search=True), Int8Stage(method="rtn")])
    for report in state.layer_reports:
        record = report["smooth"]["alpha_search"]
        assert record["errors"][0.5] == record["error_at_default"]  # the configured alpha is measured first
        assert record["error"] == min(record["errors"].values()) <= record["error_at_default"]


def test_config_validation_and_spec() -> None:
    with pytest.raises(ValueError, match="int8.group_size: 128 is not allowed"):
        Int8Stage(group_size=128)
    with pytest.raises(ValueError, match="int8.method"):
        Int8Stage(method="awq")
    Recipe(stages=[SmoothStage(alpha_search=True), Int8Stage()])  # the alpha search measures INT8 error
    with pytest.raises(ValueError, match="mixed_precision.keep_sensitive"):
        Recipe(stages=[MixedPrecisionStage(keep_sensitive=2), Int8Stage()])
    Recipe(stages=[MixedPrecisionStage(keep=["model.layers.0.mlp.down_proj"]), Int8Stage()])
    assert SPEC.data_free(Int8Stage(method="rtn")) and not SPEC.data_free(Int8Stage())
    assert SPEC.uses_calibration(Int8Stage()) and not SPEC.uses_calibration(Int8Stage(method="rtn"))
    w = torch.randn(16, 32).to(torch.bfloat16)
    qw = SPEC.quantize_weight(Int8Stage(method="rtn"), "x", w, None)
    assert qw.kind == "int8" and qw.scale.dtype == torch.bfloat16
