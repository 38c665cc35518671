"""A few-second speed probe of this machine, for the resource estimate of `--dry-run` (qwenquant/estimate/).

It times the operations a run spends its time in, at (or scaled down from) the model's real shapes and with the
run's own code: one real Qwen3 decoder layer built from config.json with random weights (forward in the model
dtype, and in the evaluation's compute dtype when that differs: float32 on the CPU), causal attention, an fp32 matmul (Hessians, AWQ searches), the recipe's quantizer (its `probe_quantize`:
qwenquant/stages/spec.py), the exporter of the chosen format, the log-softmax / KL over the vocabulary, and what
each stage of the recipe measures for its own time (its `probe`, with a `ProbeKit`: GPTQ's column loop, AWQ's clip
search, the FP8 activation simulation). Every number is a rate (seconds per token, per element, ...) that the
estimate scales by the run's sizes. Nothing is written to disk and no weight of the model is read.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from qwenquant.eval.precision import compute_dtype
from qwenquant.export.registry import FORMATS
from qwenquant.model.qwen3 import linear_shapes
from qwenquant.stages.registry import STAGES, spec_of

LAYER_PARAMS_CAP = 160_000_000  # probe layers above this are built narrower and scaled by FLOPs
ELEMENTS_CAP = 2_000_000  # weights the per-element probes quantize


@dataclass
class Probe:
    """Measured rates on this machine and device (seconds unless named otherwise)."""

    device: str
    threads: int
    layer_s_per_token: float  # one decoder layer forward per token, model dtype, attention excluded
    attn_s_per_token2: float  # causal attention of one layer, per (sequence length)^2
    layer_s_per_call: float  # fixed cost of one decoder layer forward call (python, kernel launches)
    lm_head_s_per_token: float  # lm_head matmul per token (model dtype)
    fp32_gflops: float  # float32 matmul throughput (Hessians, AWQ searches, GPTQ lazy updates)
    logits_s_per_element: float  # .float() + log-softmax / cross-entropy of one logit, and its fp16 copy
    kl_s_per_element: float  # qwenquant.eval.perplexity.kl_stats per (token x vocab) element
    act_quant_s_per_element: float  # FP8 activation simulation per input element (0: none)
    quant_s_per_weight: float  # the recipe's quantizer per weight (fp8 / rtn incl. dequantize and error)
    quant_s_per_linear: float  # ... plus this fixed cost per Linear
    export_s_per_weight: float  # the format's linear_tensors per weight
    isfinite_s_per_weight: float  # the loader's NaN/Inf check per weight
    gptq_s_per_column: float = 0.0  # GPTQ column loop: seconds per column ...
    gptq_s_per_column_row: float = 0.0  # ... plus this per column x output row
    awq_clip_s_per_weight: float = 0.0  # AWQ clip search per weight (at min(512, tokens) sampled tokens)
    # evaluation forwards compute in `eval_dtype` (qwenquant/eval/precision.py: float32 on the CPU for a bf16/fp16
    # model): the layer and lm_head rates timed in it; None when it is the model dtype (the rates above apply)
    eval_dtype: str | None = None
    eval_layer_s_per_token: float | None = None
    eval_layer_s_per_call: float | None = None
    eval_attn_s_per_token2: float | None = None
    eval_lm_head_s_per_token: float | None = None
    scaled_from: dict = field(default_factory=dict)  # how a too-large layer was narrowed for the probe
    parts_s: dict = field(default_factory=dict)  # wall time of each part of the probe
    load_avg: float | None = None  # 1-minute load average when the probe ran (a busy machine: slower rates)
    cpus: int | None = None
    seconds: float = 0.0  # wall time of the probe itself

    def to_dict(self) -> dict:
        return asdict(self)

    def eval_rates(self) -> tuple[float, float, float, float]:
        """(layer s/token, layer s/call, attention s/token^2, lm_head s/token) of an evaluation forward."""
        if self.eval_dtype is None:
            return self.layer_s_per_token, self.layer_s_per_call, self.attn_s_per_token2, self.lm_head_s_per_token
        return (self.eval_layer_s_per_token, self.eval_layer_s_per_call, self.eval_attn_s_per_token2,
                self.eval_lm_head_s_per_token)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, budget_s: float = 0.25, max_calls: int = 5) -> float:
    """Fastest wall time of `fn()` over timed calls after one warm-up, within about `budget_s` (at least one timed
    call unless the warm-up alone took over 1.5 s). The fastest, as timeit does: on a shared machine single calls
    are slowed down many times over by other processes, which would make every estimate a worst case."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t
    times: list[float] = []
    spent = 0.0
    while (not times and first < 1.5) or (first < budget_s and spent < budget_s and len(times) < max_calls):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
        spent += times[-1]
    return min(times) if times else first


def _layer_params(cfg: dict) -> int:
    return sum(n * k for n, k in linear_shapes(cfg).values())


def narrowed_config(config: dict, cap: int = LAYER_PARAMS_CAP) -> tuple[dict, float]:
    """config with hidden/intermediate/heads halved until a layer has <= cap Linear weights; (config, FLOP ratio
    real/probe). head_dim stays, so attention per head is unchanged."""
    cfg = dict(config)
    real = _layer_params(cfg)
    while _layer_params(cfg) > cap and cfg["num_attention_heads"] % 2 == 0 and cfg["num_key_value_heads"] % 2 == 0 \
            and cfg["hidden_size"] % 256 == 0:
        cfg["hidden_size"] //= 2
        cfg["intermediate_size"] //= 2
        cfg["num_attention_heads"] //= 2
        cfg["num_key_value_heads"] //= 2
    return cfg, real / _layer_params(cfg)


def _build_layer(config: dict, dtype: torch.dtype, device: torch.device):
    """A real Qwen3 decoder layer (and its rotary embedding) with random N(0, 0.02) weights."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import (
        Qwen3DecoderLayer,
        Qwen3RotaryEmbedding,
    )

    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "rms_norm_eps", "max_position_embeddings", "rope_parameters", "rope_theta", "rope_scaling",
            "attention_bias", "hidden_act")
    cfg = Qwen3Config(**{k: config[k] for k in keys if config.get(k) is not None}, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = Qwen3DecoderLayer(cfg, layer_idx=0)
    layer = layer.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    rotary = Qwen3RotaryEmbedding(cfg).to(device)
    return layer.eval(), rotary


@torch.no_grad()
def _layer_rates(config: dict, dtype: torch.dtype, device: torch.device, window: int,
                 calls_tokens: int = 4096) -> tuple[float, float, float, dict]:
    """(layer seconds per token without attention, seconds per forward call, attention seconds per token^2,
    narrowing info). Two call sizes separate the per-token cost from the per-call overhead (it matters for small
    layers); `calls_tokens`: the largest call the run makes (an evaluation window or a calibration batch)."""
    import torch.nn.functional as F

    cfg, ratio = narrowed_config(config)
    layer, rotary = _build_layer(cfg, dtype, device)
    hidden = cfg["hidden_size"]
    heads, head_dim = config["num_attention_heads"], config.get("head_dim") or hidden // config["num_attention_heads"]
    s = int(min(window, 1024 if heads * head_dim <= 4096 else 512))
    q = torch.randn(1, heads, s, head_dim, dtype=dtype, device=device)
    t_attn = best_time(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), device)
    attn = t_attn / s**2
    own_heads = cfg["num_attention_heads"] / heads  # the probe layer may have fewer heads than the real one

    def forward(n: int):
        x = torch.randn(1, n, hidden, dtype=dtype, device=device)
        pos = torch.arange(n, device=device).unsqueeze(0)
        layer(x, position_embeddings=rotary(x, pos), position_ids=pos, attention_mask=None, use_cache=False)

    # The run's forwards are large (an evaluation window, or 8 calibration samples): measure large calls too, as
    # large as ~30 GFLOP allows (per-token cost falls steeply with the call size on a CPU), and a quarter of it
    n2 = int(min(calls_tokens, max(512, 3e10 / (2 * _layer_params(cfg)))))
    n1 = max(n2 // 4, 8)
    forward(16)  # lazy initialisation (attention backend selection, kernels) is not a rate
    t1 = best_time(lambda: forward(n1), device) - attn * own_heads * n1**2
    t2 = best_time(lambda: forward(n2), device, max_calls=3) - attn * own_heads * n2**2
    per_token = max((t2 - t1) / (n2 - n1), 0.2 * t2 / n2)
    per_call = max(t1 - n1 * per_token, 0.0)
    return per_token * ratio, per_call, attn, ({"probe_hidden": hidden, "flop_ratio": ratio} if ratio > 1 else {})


@torch.no_grad()
def _matmul_gflops(n: int, k: int, dtype: torch.dtype, device: torch.device, tokens: int = 256) -> float:
    n, k = min(n, 4096), min(k, 4096)
    x = torch.randn(tokens, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device)
    t = best_time(lambda: x @ w.T, device)
    return 2 * tokens * n * k / t / 1e9


def _weight_slice(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random [rows, K] weight with rows x K <= ELEMENTS_CAP (rows a multiple of 128 where possible)."""
    rows = max(1, min(n, ELEMENTS_CAP // k))
    if rows >= 128:
        rows -= rows % 128
    return (torch.randn(rows, k, device=device) * 0.02).to(dtype)


@torch.no_grad()
def _logits_rates(vocab: int, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(seconds per logit for float() + log_softmax/cross-entropy + fp16 copy, seconds per element of kl_stats)."""
    import torch.nn.functional as F

    from qwenquant.eval.perplexity import kl_stats

    rows = max(8, min(256, 8_000_000 // vocab))
    logits = torch.randn(rows, vocab, device=device).to(dtype)
    target = torch.randint(0, vocab, (rows - 1,), device=device)

    def process():
        f = logits.float()
        F.cross_entropy(f[:-1], target, reduction="sum")
        F.log_softmax(f, dim=-1).to("cpu", torch.float16)

    t_logits = best_time(process, device) / (rows * vocab)
    a = F.log_softmax(torch.randn(1, rows, vocab), -1).half()
    b = F.log_softmax(torch.randn(1, rows, vocab), -1).half()
    t_kl = best_time(lambda: kl_stats(a, b), torch.device("cpu"), max_calls=2) / (rows * vocab)
    return t_logits, t_kl


@dataclass(frozen=True)
class ProbeKit:
    """What a stage's `probe` measures with: a random slice of the largest Linear's weight (model dtype, on the
    device), the run's calibration tokens, the widest Linear input, and the probe's timer."""

    weight: torch.Tensor
    tokens: int
    widest_input: int
    dtype: torch.dtype
    device: torch.device
    elements_cap: int = ELEMENTS_CAP

    def time(self, fn, budget_s: float = 0.25, max_calls: int = 5) -> float:
        """Fastest wall time of `fn()` (see `best_time`)."""
        return best_time(fn, self.device, budget_s, max_calls)


def _on_cpu(record):
    """The record with its tensors on the CPU, where the exporter works."""
    tensors = {f: getattr(record, f).cpu() for f in ("q", "scale", "zero_point", "g_idx")
               if getattr(record, f) is not None}
    return dataclasses.replace(record, **tensors)


def _quantize_rates(recipe, w: torch.Tensor, dtype: torch.dtype, device: torch.device) -> dict:
    """Seconds per weight of the recipe's quantizer (its `probe_quantize`) and its fixed cost per Linear, which
    dominates for small Linears (many small tensor ops, the stage's bookkeeping)."""
    spec, cfg = STAGES[recipe.quantizer], recipe.quantizer_config
    if spec.probe_quantize is None:  # named in the estimate's notes (qwenquant/estimate/need.py)
        return {"quant_s_per_weight": 0.0, "quant_s_per_linear": 0.0}
    per_weight = best_time(lambda: spec.probe_quantize(cfg, w, dtype), device) / w.numel()
    small = w[: min(8, w.shape[0])]
    per_linear = max(best_time(lambda: spec.probe_quantize(cfg, small, dtype), device) - small.numel() * per_weight, 0.0)
    return {"quant_s_per_weight": per_weight, "quant_s_per_linear": per_linear}


def _export_rates(recipe, w: torch.Tensor, dtype: torch.dtype, device: torch.device) -> dict:
    """Seconds per weight of the format's tensors for one quantized Linear, and of the loader's NaN/Inf check."""
    spec, cfg = STAGES[recipe.quantizer], recipe.quantizer_config
    fmt = FORMATS[recipe.export.format]
    out = {"isfinite_s_per_weight": best_time(lambda: bool(torch.isfinite(w).all()), device) / w.numel()}
    if spec.probe_quantize is None:
        return out | {"export_s_per_weight": 0.0}
    record = spec.probe_quantize(cfg, w, dtype)
    rows, k = record.shape
    if fmt.check_linear(spec.record_kind, cfg, "probe", rows, k):  # a slice the format cannot pack: whole words
        record = spec.probe_quantize(cfg, w[: rows // 8 * 8 or 8], dtype)
    record = _on_cpu(record)
    seconds = best_time(lambda: fmt.linear_tensors(record, cfg, "probe", None), torch.device("cpu"), max_calls=1)
    return out | {"export_s_per_weight": seconds / record.q.numel()}


@torch.no_grad()
def run_probe(config: dict, recipe, device: torch.device, dtype: torch.dtype, calib_tokens: int, window: int,
              seq_len: int = 0) -> Probe:
    """Measure this machine's rates for the model's shapes (a few seconds; scaled-down layers for big models)."""
    started = time.perf_counter()
    parts: dict[str, float] = {}

    def timed(name: str, fn):
        t = time.perf_counter()
        result = fn()
        parts[name] = round(time.perf_counter() - t, 3)
        return result

    shapes = linear_shapes(config)
    n, k = max(shapes.values(), key=lambda s: s[0] * s[1])  # the largest Linear (gate/up: [intermediate, hidden])
    vocab, hidden = int(config["vocab_size"]), int(config["hidden_size"])
    largest_call = max(window, min(calib_tokens, 8 * seq_len)) if seq_len else window
    layer_tok, layer_call, attn, scaled = timed("layer", lambda: _layer_rates(config, dtype, device, window,
                                                                              largest_call))
    gflops_model = timed("lm_head", lambda: _matmul_gflops(min(vocab, 16384), hidden, dtype, device, tokens=512))
    eval_rates = timed("evaluation", lambda: _eval_rates(config, dtype, device, window))
    fp32 = timed("fp32_matmul", lambda: _matmul_gflops(n, k, torch.float32, device))
    logits_rate, kl_rate = timed("logits", lambda: _logits_rates(vocab, dtype, device))
    w = _weight_slice(n, k, dtype, device)
    rates = {"act_quant_s_per_element": 0.0}  # unless a stage simulates activation quantization
    rates |= timed("quantizer", partial(_quantize_rates, recipe, w, dtype, device))
    rates |= timed("export", partial(_export_rates, recipe, w, dtype, device))
    kit = ProbeKit(w, calib_tokens, max(kk for _, kk in shapes.values()), dtype, device)
    for cfg in recipe.stages:  # what each stage measures for its own time
        spec = spec_of(cfg)
        if spec.probe is not None:
            rates |= timed(spec.name, partial(spec.probe, cfg, kit))
    # a second, later sample of the cheap quantizer rates (other processes come and go within seconds)
    again = timed("quantizer_again", lambda: _quantize_rates(recipe, _weight_slice(n, k, dtype, device), dtype, device))
    rates |= {key: min(rates[key], value) for key, value in again.items()}
    return Probe(
        device=str(device),
        threads=torch.get_num_threads(),
        layer_s_per_token=layer_tok,
        layer_s_per_call=layer_call,
        attn_s_per_token2=attn,
        lm_head_s_per_token=2 * hidden * vocab / (gflops_model * 1e9),
        fp32_gflops=fp32,
        logits_s_per_element=logits_rate,
        kl_s_per_element=kl_rate,
        scaled_from=scaled,
        parts_s=parts,
        load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        seconds=time.perf_counter() - started,
        **rates,
        **eval_rates,
    )


def _eval_rates(config: dict, dtype: torch.dtype, device: torch.device, window: int) -> dict:
    """The evaluation's own layer and lm_head rates when it computes in another dtype than the model's (float32 on
    the CPU: qwenquant.eval.precision.compute_dtype), one window per forward; {} when it does not."""
    eval_dtype = compute_dtype(device, dtype)
    if eval_dtype == dtype:
        return {}
    per_token, per_call, attn, _ = _layer_rates(config, eval_dtype, device, window, window)
    gflops = _matmul_gflops(min(int(config["vocab_size"]), 16384), int(config["hidden_size"]), eval_dtype, device,
                            tokens=512)
    return {"eval_dtype": str(eval_dtype).removeprefix("torch."), "eval_layer_s_per_token": per_token,
            "eval_layer_s_per_call": per_call, "eval_attn_s_per_token2": attn,
            "eval_lm_head_s_per_token": 2 * int(config["hidden_size"]) * int(config["vocab_size"]) / (gflops * 1e9)}
