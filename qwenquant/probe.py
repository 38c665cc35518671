"""A few-second speed probe of this machine, for the resource estimate of `--dry-run` (qwenquant/estimate.py).

It times the operations a run spends its time in, at (or scaled down from) the model's real shapes and with the
run's own code: one real Qwen3 decoder layer built from config.json with random weights (forward in the model
dtype), causal attention, an fp32 matmul (Hessians, AWQ searches), the pure quantizers of `qwenquant/quant/`, the
exporter of the chosen format, the FP8 activation simulation, and the log-softmax / KL over the vocabulary.
Every number is a rate (seconds per token, per element, ...) that `estimate.py` scales by the run's sizes.
Nothing is written to disk and no weight of the model is read.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch

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
    scaled_from: dict = field(default_factory=dict)  # how a too-large layer was narrowed for the probe
    parts_s: dict = field(default_factory=dict)  # wall time of each part of the probe
    load_avg: float | None = None  # 1-minute load average when the probe ran (a busy machine: slower rates)
    cpus: int | None = None
    seconds: float = 0.0  # wall time of the probe itself

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, budget_s: float = 0.25, max_calls: int = 5) -> float:
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
    from qwenquant.model.qwen3 import linear_shapes

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
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

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
    t_attn = _best_time(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), device)
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
    t1 = _best_time(lambda: forward(n1), device) - attn * own_heads * n1**2
    t2 = _best_time(lambda: forward(n2), device, max_calls=3) - attn * own_heads * n2**2
    per_token = max((t2 - t1) / (n2 - n1), 0.2 * t2 / n2)
    per_call = max(t1 - n1 * per_token, 0.0)
    del layer
    return per_token * ratio, per_call, attn, ({"probe_hidden": hidden, "flop_ratio": ratio} if ratio > 1 else {})


@torch.no_grad()
def _matmul_gflops(n: int, k: int, dtype: torch.dtype, device: torch.device, tokens: int = 256) -> float:
    n, k = min(n, 4096), min(k, 4096)
    x = torch.randn(tokens, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device)
    t = _best_time(lambda: x @ w.T, device)
    return 2 * tokens * n * k / t / 1e9


def _weight_slice(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random [rows, K] weight with rows x K <= ELEMENTS_CAP (rows a multiple of 128 where possible)."""
    rows = max(1, min(n, ELEMENTS_CAP // k))
    if rows >= 128:
        rows -= rows % 128
    return (torch.randn(rows, k, device=device) * 0.02).to(dtype)


@torch.no_grad()
def _quantizer_rates(recipe, n: int, k: int, tokens: int, dtype: torch.dtype, device: torch.device,
                     basic_only: bool = False) -> dict:
    """Per-weight seconds of the recipe's quantizer, its exporter, and the GPTQ / AWQ specifics (`basic_only`:
    the quantizer's own two rates, for a second sample)."""
    from qwenquant.export.checkpoint import linear_tensors
    from qwenquant.pipeline import QuantState
    from qwenquant.quant import awq as awqq
    from qwenquant.quant import fp8 as fp8q
    from qwenquant.quant import gptq as gptqq
    from qwenquant.quant import intq

    q = recipe.stage(recipe.quantizer)
    w = _weight_slice(n, k, dtype, device)
    out: dict = {}
    if recipe.quantizer == "fp8":
        def quantize(wx=w):
            qw = fp8q.quantize_fp8(wx, q.weights, q.block_size, scale_dtype=dtype)
            qw.dequantize(dtype)
            fp8q.weight_error(wx, qw)
            return qw
    else:
        def quantize(wx=w):
            qw = intq.quantize_rtn(wx.float(), q.bits, q.group_size, q.symmetric, scale_dtype=dtype)
            deq = qw.dequantize()
            float((wx.float() - deq).norm())
            return qw
    per_weight = _best_time(quantize, device) / w.numel()
    small = w[: min(8, w.shape[0])]
    out["quant_s_per_weight"] = per_weight
    # the fixed cost per Linear (many small tensor ops, the stage's bookkeeping) dominates for small Linears
    out["quant_s_per_linear"] = max(_best_time(lambda: quantize(small), device) - small.numel() * per_weight, 0.0)
    if basic_only:
        return out
    record = quantize()
    if record.kind == "int" and recipe.export.format in ("gptq", "awq") and record.shape[0] % 8:
        record = intq.quantize_rtn(w[: record.shape[0] // 8 * 8 or 8].float(), q.bits, q.group_size, q.symmetric,
                                   scale_dtype=dtype)
    record.q, record.scale = record.q.cpu(), record.scale.cpu()
    record.zero_point = None if record.zero_point is None else record.zero_point.cpu()
    state = QuantState(records={"probe": record})
    out["export_s_per_weight"] = _best_time(lambda: linear_tensors(recipe, "probe", state), torch.device("cpu"),
                                            max_calls=1) / record.q.numel()
    out["isfinite_s_per_weight"] = _best_time(lambda: bool(torch.isfinite(w).all()), device) / w.numel()
    if recipe.quantizer == "gptq":
        cfg = gptqq.GPTQConfig(bits=q.bits, group_size=q.group_size if q.group_size != -1 else -1,
                               symmetric=q.symmetric, actorder=None if q.actorder == "none" else q.actorder,
                               dampening_frac=q.dampening_frac, block_size=q.block_size)
        # the column loop's cost grows with the rows (strided column reads and writes of [N, K] arrays): time
        # 128 columns at 256 and 2048 rows; a group needs >= 128 columns
        kp = 128
        x = torch.randn(1024, kp, device=device)
        H = 2 * x.T @ x / x.shape[0]
        times = []
        for rows in (256, 2048):
            wp = torch.randn(rows, kp, device=device) * 0.02
            times.append(_best_time(lambda wp=wp: gptqq.quantize_weight(wp, H, cfg, scale_dtype=dtype), device,
                                    budget_s=0.5, max_calls=3))
        # a two-point slope is fragile on a shared machine (one slow call flattens it): at least half of the
        # 2048-row time is per-row work (about 70% on a quiet 2-core box)
        per_row = max((times[1] - times[0]) / (kp * (2048 - 256)), 0.5 * times[1] / (kp * 2048))
        out["gptq_s_per_column_row"] = per_row
        out["gptq_s_per_column"] = max(times[0] / kp - per_row * 256, 0.0)
    if recipe.quantizer == "awq":
        xs = torch.randn(min(512, max(tokens, 1)), k, device=device)
        ws = w[:64].float()  # search_clip works in batches of 64 output rows: one batch is representative
        t = _best_time(lambda: awqq.search_clip(ws, xs, q.bits, q.group_size, q.symmetric, scale_dtype=dtype),
                       device, max_calls=1)
        out["awq_clip_s_per_weight"] = t / ws.numel()
    return out


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

    t_logits = _best_time(process, device) / (rows * vocab)
    a = F.log_softmax(torch.randn(1, rows, vocab), -1).half()
    b = F.log_softmax(torch.randn(1, rows, vocab), -1).half()
    t_kl = _best_time(lambda: kl_stats(a, b), torch.device("cpu"), max_calls=2) / (rows * vocab)
    return t_logits, t_kl


@torch.no_grad()
def _act_quant_rate(recipe, k: int, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds per input element of the FP8 activation simulation the recipe installs during propagation/eval."""
    from qwenquant.quant.fp8 import fake_quantize_activation

    stage = recipe.stage("fp8")
    if stage is None or stage.activations == "none":
        return 0.0
    mode = {"dynamic": "group" if stage.weights == "block" else "token", "static": "tensor"}[stage.activations]
    k = k - k % stage.block_size if mode == "group" and k >= stage.block_size else k
    x = torch.randn(max(16, min(2048, ELEMENTS_CAP // k)), k, device=device).to(dtype)
    scale = torch.tensor([0.01], dtype=dtype, device=device)
    return _best_time(lambda: fake_quantize_activation(x, mode, scale, stage.block_size), device) / x.numel()


def run_probe(config: dict, recipe, device: torch.device, dtype: torch.dtype, calib_tokens: int, window: int,
              seq_len: int = 0) -> Probe:
    """Measure this machine's rates for the model's shapes (a few seconds; scaled-down layers for big models)."""
    from qwenquant.model.qwen3 import linear_shapes

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
    fp32 = timed("fp32_matmul", lambda: _matmul_gflops(n, k, torch.float32, device))
    logits_rate, kl_rate = timed("logits", lambda: _logits_rates(vocab, dtype, device))
    rates = timed("quantizer", lambda: _quantizer_rates(recipe, n, k, calib_tokens, dtype, device))
    act = timed("act_quant", lambda: _act_quant_rate(recipe, max(kk for _, kk in shapes.values()), dtype, device))
    # a second, later sample of the cheap quantizer rates (other processes come and go within seconds)
    again = timed("quantizer_again", lambda: _quantizer_rates(recipe, n, k, calib_tokens, dtype, device, True))
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
        act_quant_s_per_element=act,
        scaled_from=scaled,
        parts_s=parts,
        load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        seconds=time.perf_counter() - started,
        **rates,
    )
