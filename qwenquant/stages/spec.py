"""The entry every stage puts in the stage registry (`qwenquant/stages/registry.py`).

A stage is one module in this package holding its config dataclass (validated in `__post_init__`, errors naming
the key), its per-layer function `run(ctx, cfg) -> report dict` on a `LayerContext`, and a `SPEC` that tells the
rest of the program what it needs and what it makes, so the recipe, the loop and the estimator ask the stage
instead of knowing it:

- `role`: where it may sit in a recipe: `plan` (first: decides what is quantized), `transform` (before the
  quantizer, function-preserving), `quantizer` (exactly one), `refine` (after the quantizer);
- `record_kind`: for a quantizer, the kind of QuantizedWeight it makes (`fp8` | `int`): export formats declare
  which kinds they store;
- `uses_calibration(cfg)`: whether the run must load calibration data for it;
- `float_copy(cfg)`: whether the loop keeps a copy of the layer as it enters the quantizer (`ctx.float_state`);
- `float_path(cfg)`: whether the loop propagates the unquantized model's activations beside the quantized ones;
- `check(cfg, quantizer_name)`: constraints on the other stages of the recipe (ValueError naming the key);
- `check_linear(cfg, name, n, k)`: shapes the scheme itself cannot handle (a Linear [N, K]), refused before any
  work: the message, or None (what a format cannot store is the format's check);
- `resolve(cfg, searched)`: the config with the run's search choices (`QuantState.searched`) written in, so the
  saved recipe replays them without searching;
- the data-free path (qwenquant/stream/: quantizers whose config needs no calibration, streamed from the source
  safetensors to the output shards without building the model):
  - `data_free(cfg)`: whether this config quantizes every weight from the weight alone (no data, no search);
  - `quantize_weight(cfg, name, w, group_absmax)`: one Linear's QuantizedWeight from its weight `w` [N, K] in the
    model dtype, the same values `run` records for it (`name`: the full Linear name);
  - `shares_scale(cfg)`: the Linears of a fused group share one scale (FP8 per tensor): the streamer passes the
    group's max |w| as `group_absmax` (else None);
  - `activation_spec(cfg, name)`: how the engine quantizes that Linear's input (an ActivationSpec; None: it
    does not), as `run` registers it in `QuantState.activations`;
- the estimator's cost model (qwenquant/estimate/), each optional (the estimate names a stage lacking one in its
  notes); `need` is a `qwenquant.estimate.need.StageNeed` (the model's shapes, the run's token counts, the dtype's
  bytes and, for times, the speed probe's rates):
  - `host_bytes(cfg, need) -> (bytes, what)`: the largest transient the stage holds while it runs on one decoder
    layer (host memory on the CPU, device memory on CUDA) and what it is; `(0, "")` when nothing worth counting;
  - `seconds(cfg, need) -> (seconds, note)`: its wall time over the whole model, and a caveat for the estimate's
    notes ("" when none; `ROUGH_TIME_NOTE` for times modelled from layer forwards instead of probed);
  - `repeated_seconds(cfg, need) -> seconds`: (data-parallel stages) the part of `seconds` that every rank of a
    distributed run repeats in full (GPTQ's factorizations and per-column steps); a distributed estimate divides
    only the rest by the number of ranks (qwenquant/estimate/ranks.py); absent: all of it divides;
  - `record_bytes(cfg, n, k, dtype_bytes) -> bytes`: (quantizers) host bytes of the record (QuantizedWeight) one
    Linear [N, K] gets;
  - `kept_linears(cfg, facts) -> (names, note)`: (plan stages) full names of the Linears left in the source dtype
    (`facts`: `qwenquant.estimate.facts.ModelFacts`); a note when the run chooses them and this is a guess;
  - `label(cfg) -> str`: (quantizers) the scheme's settings as the estimate's title shows them (`w4 g128 sym`);
  - `serving_scheme(cfg) -> str`: (quantizers) the scheme an engine runs the checkpoint with, a key of
    `qwenquant.targets.SCHEME_NEEDS` (`fp8-w8a8`, `w4a16`, ...): which GPUs can run it (`--target`);
  - `tag(cfg) -> str`: what the stage adds to a quantize command's default output folder name, ./<model>-<scheme>-
    <tags> (`BLOCK-STATIC`, `SMOOTH`, `G64`); "" where the stage is at its command's defaults;
  - `probe_quantize(cfg, w, dtype) -> QuantizedWeight`: (quantizers) one round-to-nearest pass over a weight with its
    dequantize and error: the per-weight work the speed probe times as the quantizer's cost;
  - `probe(cfg, kit) -> {rate: value}`: rates only this stage's `seconds` uses, measured with the probe's kit
    (`qwenquant.estimate.probe.ProbeKit`) and named like the fields of `qwenquant.estimate.probe.Probe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

ROLES = ("plan", "transform", "quantizer", "refine")
# a stage's `seconds` note for a time modelled from layer forwards, not probed
ROUGH_TIME_NOTE = "compensation / scale search times are rough (modelled from layer forwards, not probed)"


def _always(_cfg) -> bool:
    return True


def _never(_cfg) -> bool:
    return False


def _no_check(_cfg, _quantizer: str) -> None:
    return None


def _any_shape(_cfg, _name: str, _n: int, _k: int) -> str | None:
    return None


def _unchanged(cfg, _searched: dict) -> Any:
    return cfg


@dataclass(frozen=True)
class StageSpec:
    name: str
    config: type
    role: str
    run: Callable[..., dict]
    record_kind: str | None = None
    uses_calibration: Callable[[Any], bool] = _always
    float_copy: Callable[[Any], bool] = _never
    float_path: Callable[[Any], bool] = _never
    check: Callable[[Any, str], None] = _no_check
    check_linear: Callable[[Any, str, int, int], str | None] = _any_shape
    resolve: Callable[[Any, dict], Any] = _unchanged
    host_bytes: Callable[[Any, Any], tuple[int, str]] | None = None
    seconds: Callable[[Any, Any], tuple[float, str]] | None = None
    repeated_seconds: Callable[[Any, Any], float] | None = None
    record_bytes: Callable[[Any, int, int, int], int] | None = None
    kept_linears: Callable[[Any, Any], tuple[set[str], str]] | None = None
    label: Callable[[Any], str] | None = None
    probe_quantize: Callable[..., Any] | None = None
    probe: Callable[[Any, Any], dict[str, float]] | None = None
    data_free: Callable[[Any], bool] = _never
    quantize_weight: Callable[..., Any] | None = None
    shares_scale: Callable[[Any], bool] = _never
    activation_spec: Callable[[Any, str], Any] = lambda _cfg, _name: None
    tag: Callable[[Any], str] = lambda _cfg: ""
    serving_scheme: Callable[[Any], str] | None = None
    # whether the stage runs data-parallel over torch.distributed ranks (qwenquant/distributed.py): every statistic
    # it gathers from calibration data is combined over the ranks (Hessians, activation maxima, sampled inputs:
    # stages/observe.py, stages/gptq.py)
    data_parallel: Callable[[Any], bool] = _never

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"stage {self.name}: role {self.role!r} is not one of {ROLES}")
        if (self.role == "quantizer") != (self.record_kind is not None):
            raise ValueError(f"stage {self.name}: quantizers (and only they) declare a record_kind")
        if (self.quantize_weight is None) != (self.data_free is _never):
            raise ValueError(f"stage {self.name}: a data-free quantizer declares both data_free and quantize_weight")
