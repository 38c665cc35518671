"""The `compensate` stage (refine, after the quantizer): fit the quantized decoder layer to the unquantized one.

The pipeline keeps a copy of the layer's state as it enters the quantizer stage (`ctx.float_state`: after any
function-preserving smoothing, before quantization). Here, on the first `cfg.samples` captured calibration inputs:
1. target = that unquantized layer's output (float32);
2. the quantized layer's continuous parameters (scales, INT rounding offsets, norm weights) are tuned for
   `cfg.steps` signed-gradient steps on the output MSE (`qwenquant.quant.compensate`), with the engine's activation
   quantization simulated straight-through;
3. the new codes and scales replace the records (scales stay in the model dtype), the live weights become their
   dequantization, the norm weights take their tuned values (rounded to the model dtype).
The layer keeps the quantizer's result, with a warning for a non-finite loss, when the loss turns non-finite or when
tuning does not lower the output error on those inputs. All forwards here run in float32 (`functional_call` with
float32 parameters), so the reported errors measure quantization, not bf16 arithmetic.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass

import torch
from torch.func import functional_call

from qwenquant.activations import activation_quantization, to_device
from qwenquant.quant import compensate as cq
from qwenquant.quant.records import QuantizedWeight
from qwenquant.stages.context import LayerContext
from qwenquant.stages.spec import ROUGH_TIME_NOTE, StageSpec
from qwenquant.validation import boolean, positive

COMPENSATE_TARGETS = ("layer", "float")


@dataclass
class CompensateStage:
    """Error-compensation fine-tuning after the quantizer (this module): per decoder layer, tune the
    weight scales, INT rounding offsets (`rounding`) and norm weights (`norms`; `qk_norms` adds q_norm/k_norm)
    with `steps` signed-gradient steps of size `lr` (decaying linearly) so the quantized layer's output matches the
    unquantized one on the first `samples` calibration samples, `batch_size` samples per step."""

    steps: int = 40  # defaults sized for about a minute on qwen3-mini (6 layers) on 2 CPU cores
    lr: float = 0.005  # rounding offsets, in grid steps; scales and norms move RELATIVE_LR_RATIO of it (relative)
    samples: int = 16
    batch_size: int = 1
    rounding: bool = True
    norms: bool = True
    qk_norms: bool = False
    # what the quantized layer is fitted to: "float" = the unquantized model's own layer output (the float path's
    # inputs, so the fit also absorbs error accumulated in earlier layers); "layer" = the unquantized layer applied
    # to the quantized path's inputs (this layer's own quantization error only)
    target: str = "float"

    def __post_init__(self) -> None:
        if self.target not in COMPENSATE_TARGETS:
            raise ValueError(f"compensate.target: must be one of {', '.join(COMPENSATE_TARGETS)}, got {self.target!r}")
        positive("compensate.steps", self.steps)
        positive("compensate.samples", self.samples)
        positive("compensate.batch_size", self.batch_size)
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not 0.0 < self.lr <= 1.0:
            raise ValueError(f"compensate.lr: must be a number in (0, 1], got {self.lr!r}")
        for key in ("rounding", "norms", "qk_norms"):
            boolean(f"compensate.{key}", getattr(self, key))


def _rows(obj, start: int, stop: int, batch: int):
    """Slice rows [start, stop) of every tensor whose first dim is the batch (others, e.g. rotary tables, broadcast)."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_rows(o, start, stop, batch) for o in obj)
    if isinstance(obj, list):
        return [_rows(o, start, stop, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: _rows(v, start, stop, batch) for k, v in obj.items()}
    return obj


def select_batches(ctx: LayerContext, samples: int, batch_size: int, cache=None) -> list[tuple[torch.Tensor, dict]]:
    """The first `samples` calibration inputs of the layer (from `cache`, default the quantized path's), as
    minibatches of `batch_size` samples."""
    out, taken = [], 0
    cache = cache if cache is not None else ctx.cache
    for h, kw in zip(cache.hidden, cache.kwargs):
        for start in range(0, h.shape[0], batch_size):
            if taken >= samples:
                return out
            stop = min(start + batch_size, h.shape[0], start + samples - taken)
            out.append((h[start:stop], _rows(kw, start, stop, h.shape[0])))
            taken += stop - start
    return out


def _forward32(ctx: LayerContext, params: dict[str, torch.Tensor], h: torch.Tensor, kw: dict) -> torch.Tensor:
    """The layer's output [B, T, D] in float32 with the given float32 parameters (inputs moved to the device)."""
    out = functional_call(ctx.layer, params, (h.to(ctx.device).float(),), to_device(kw, ctx.device))
    return out[0] if isinstance(out, tuple) else out


def _float32(state: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(device).float() for k, v in state.items()}


@torch.no_grad()
def _output_error(ctx: LayerContext, params: dict, batches, targets, ref_inputs) -> float:
    """Relative squared error of the layer's residual branches, sum ||y_q - y||^2 / sum ||y - x||^2 (x: the
    target's inputs), with the engine's activation quantization simulated."""
    err = ref = 0.0
    with activation_quantization(ctx.layer, ctx.activation_specs()):
        for (h, kw), y, x in zip(batches, targets, ref_inputs):
            e, r = cq.branch_error(_forward32(ctx, params, h, kw), y.to(ctx.device), x.to(ctx.device))
            err, ref = err + e, ref + r
    if ctx.world.distributed:  # over every rank's samples
        err, ref = ctx.world.sum_(torch.tensor([err, ref], dtype=torch.float64, device=ctx.device)).tolist()
    return err / max(ref, 1e-30)


def _live_params(ctx: LayerContext) -> dict[str, torch.Tensor]:
    return _float32(dict(ctx.layer.named_parameters()), ctx.device)


def _init_linears(ctx: LayerContext, names: list[str], rounding: bool) -> dict[str, cq.LinearCompensation]:
    """One trainable state per quantized Linear; FP8 per-tensor scales of a fused group share one change `a`
    (vLLM fuses those shards and needs one scale)."""
    linears: dict[str, cq.LinearCompensation] = {}
    shared: dict[tuple[str, ...], torch.Tensor] = {}
    for name in names:
        record = _moved(ctx.state.records[ctx.full_name(name)], ctx.device)
        a = None
        if record.kind == "fp8" and record.granularity == "tensor":
            group = next((g for g in ctx.adapter.fused_groups if name in g), (name,))  # shards sharing one scale
            a = shared.setdefault(group, torch.zeros_like(record.scale, dtype=torch.float32))
        w = ctx.pre_rounding.get(name, ctx.float_state[f"{name}.weight"]).to(ctx.device)
        linears[name] = cq.init_compensation(w, record, a, rounding)
    for p in linears.values():
        for t in p.parameters():
            t.requires_grad_(True)
    return linears


def compensate_layer(ctx: LayerContext, cfg: CompensateStage) -> dict:
    """Tune the quantized layer's scales, rounding and norms to match the unquantized layer; see the module doc."""
    if ctx.float_state is None:
        raise ValueError("compensate: the pipeline kept no unquantized copy of the layer (a quantizer stage must run before it)")
    t0 = time.perf_counter()
    names = [n for n in ctx.adapter.linears if ctx.full_name(n) in ctx.state.records]
    norms = (ctx.adapter.norms if cfg.norms else ()) + (ctx.adapter.head_norms if cfg.qk_norms else ())
    samples = -(-cfg.samples // ctx.world.size)  # distributed: each rank's share, from the start of its shard
    batches = select_batches(ctx, samples, cfg.batch_size)
    # target "float": the unquantized model's layer output (its own inputs); "layer": the unquantized layer on ours
    target_batches = select_batches(ctx, samples, cfg.batch_size, ctx.float_cache) if cfg.target == "float" else batches
    with torch.no_grad():
        float_params = _float32(ctx.float_state, ctx.device)
        targets = [_forward32(ctx, float_params, h, kw).to(ctx.cache.store_device) for h, kw in target_batches]
    del float_params
    ref_inputs = [h for h, _ in target_batches]
    before = _output_error(ctx, _live_params(ctx), batches, targets, ref_inputs)

    linears = _init_linears(ctx, names, cfg.rounding)
    norm0 = {n: ctx.layer.get_submodule(n).weight.detach().float() for n in norms}
    norm_change = {n: torch.zeros_like(g, requires_grad=True) for n, g in norm0.items()}
    fixed = {k: v for k, v in _live_params(ctx).items()
             if k.removesuffix(".weight") not in linears and k.removesuffix(".weight") not in norm_change}
    offsets = [p.offsets for p in linears.values() if p.offsets is not None]
    changes = [p.scale_change for p in linears.values()] + list(norm_change.values())
    changes = list({id(t): t for t in changes}.values())  # a shared scale change is stepped once

    losses, status = [], "compensated"
    with torch.enable_grad(), activation_quantization(ctx.layer, ctx.activation_specs(), straight_through=True):
        for step in range(cfg.steps):
            h, kw = batches[step % len(batches)]
            params = dict(fixed)
            params.update({f"{n}.weight": cq.fake_quantized_weight(p) for n, p in linears.items()})
            params.update({f"{n}.weight": norm0[n] * (1.0 + d) for n, d in norm_change.items()})
            loss = cq.output_loss(_forward32(ctx, params, h, kw), targets[step % len(batches)].to(ctx.device))
            if ctx.world.distributed:  # every rank sees the mean loss, so all stop (or step) together
                loss_all = ctx.world.sum_(loss.detach().double().reshape(1)) / ctx.world.size
                loss = loss + (loss_all.to(loss.dtype) - loss.detach()).reshape(loss.shape)  # its value, own gradient
            if not cq.is_finite(loss):
                status = f"kept the quantizer's result: non-finite loss at step {step}"
                warnings.warn(f"compensate: non-finite loss at step {step} on decoder layer {ctx.index}; "
                              "the layer keeps the quantizer's result", RuntimeWarning, stacklevel=2)
                break
            loss.backward()
            _average_gradients(ctx, offsets + changes)  # data-parallel, as DDP: each rank a minibatch per step
            lr = cq.learning_rate(cfg.lr, step, cfg.steps)
            for t in offsets:
                cq.signed_step(t, lr, cq.MAX_ROUNDING_OFFSET)
            for t in changes:
                cq.signed_step(t, lr * cq.RELATIVE_LR_RATIO, cq.MAX_RELATIVE_CHANGE)
            losses.append(float(loss.detach()))

    report = {"samples": ctx.world.total(sum(h.shape[0] for h, _ in batches)), "steps": len(losses),
              "output_error_before": before, "output_error_after": before,
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    if status == "compensated":
        after, moved = _apply(ctx, linears, norm0, norm_change, batches, targets, ref_inputs, before)
        report.update(output_error_after=min(after, before), **moved)
        if after >= before:
            status = f"kept the quantizer's result: tuned output error {after:.4g} >= {before:.4g}"
    report["status"] = status
    report["seconds"] = time.perf_counter() - t0
    return report


def _average_gradients(ctx: LayerContext, tensors: list[torch.Tensor]) -> None:
    """In a distributed world: each tensor's gradient averaged over the ranks (the same order on every rank)."""
    if not ctx.world.distributed:
        return
    for t in tensors:
        if t.grad is not None:
            ctx.world.sum_(t.grad).div_(ctx.world.size)


def _apply(ctx: LayerContext, linears, norm0, norm_change, batches, targets, ref_inputs,
           before: float) -> tuple[float, dict]:
    """Write the tuned records, weights and norms; measure; put everything back if the error did not drop."""
    dtype = next(ctx.layer.parameters()).dtype
    saved_records = {n: ctx.state.records[ctx.full_name(n)] for n in linears}
    saved_weights = {n: ctx.linear(n).weight.data for n in linears}
    saved_norms = {n: ctx.layer.get_submodule(n).weight.data for n in norm_change}
    changed = total = 0
    scale_moves = []
    with torch.no_grad():
        for n, p in linears.items():
            record = cq.export_record(p)
            changed += int((record.q != p.record.q).sum())
            total += record.q.numel()
            scale_moves.append(float((record.scale.float() / p.record.scale.float() - 1).abs().mean()))
            ctx.linear(n).weight.data = record.dequantize(dtype)
            ctx.state.records[ctx.full_name(n)] = _moved(record, "cpu")
        for n, d in norm_change.items():
            ctx.layer.get_submodule(n).weight.data = (norm0[n] * (1.0 + d)).to(dtype)
    after = _output_error(ctx, _live_params(ctx), batches, targets, ref_inputs)
    if after >= before:
        for n in linears:
            ctx.state.records[ctx.full_name(n)] = saved_records[n]
            ctx.linear(n).weight.data = saved_weights[n]
        for n in norm_change:
            ctx.layer.get_submodule(n).weight.data = saved_norms[n]
    changes = {
        "codes_changed_frac": changed / max(total, 1),
        "scale_change_mean_abs": sum(scale_moves) / max(len(scale_moves), 1),
        "norm_change_mean_abs": {n: float(d.detach().abs().mean()) for n, d in norm_change.items()},
    }
    return after, changes


def _moved(record: QuantizedWeight, device) -> QuantizedWeight:
    """A copy of the record with its tensors on `device` (the state keeps records on the CPU)."""
    tensors = {f: getattr(record, f).to(device) for f in ("q", "scale", "zero_point", "g_idx")
               if getattr(record, f) is not None}
    return dataclasses.replace(record, **tensors)


# -- the estimator's cost model (StageSpec cost fields; qwenquant/estimate/) ----------------------------------------


def _host_bytes(cfg: CompensateStage, need) -> tuple[int, str]:
    """The layer's float32 parameters, their gradients and trainable changes, and the unquantized copy."""
    params = need.layer_params(0)
    return 4 * 4 * params + need.dtype_bytes * params, "compensation's float32 layer copy and gradients"


def _seconds(cfg: CompensateStage, need) -> tuple[float, str]:
    """Per layer: float32 forwards for the targets and the before/after errors (3 x samples) and a forward and
    backward per step (3 x steps x batch); a quantizer pass per step for the fake-quantized weights."""
    fwd32 = 2.5 * need.token_s  # a float32 functional_call forward vs the model dtype
    s = need.seq_len
    per_layer = (3 * cfg.samples + 3 * cfg.steps * cfg.batch_size) * s * (fwd32 + need.probe.attn_s_per_token2 * s)
    return need.layers * per_layer + cfg.steps * need.quant_pass, ROUGH_TIME_NOTE


def _check(cfg: CompensateStage, quantizer: str) -> None:
    """The tuning (quant/compensate.py) moves FP8 and INT scales and INT rounding, not NVFP4's two-level scales."""
    if quantizer == "nvfp4":
        raise ValueError("compensate: not available with the nvfp4 quantizer (it tunes FP8 and INT grids only)")


SPEC = StageSpec("compensate", CompensateStage, "refine", compensate_layer, check=_check,
                 float_copy=lambda cfg: True, float_path=lambda cfg: cfg.target == "float",
                 host_bytes=_host_bytes, seconds=_seconds, tag=lambda cfg: "COMP", data_parallel=lambda _cfg: True)
