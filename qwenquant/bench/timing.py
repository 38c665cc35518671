"""One bench point: chunked prefill of `batch` random prompts of `context` tokens into a static KV cache, then greedy
decoding of `decode_tokens` tokens one step at a time (compiled with CUDA graphs on CUDA unless disabled).

Prefill tokens/s = batch * context / prefill seconds; time to first token = prefill seconds (the first token's
argmax included); inter-token latency = seconds per decode step (each step yields one token per sequence); decode
tokens/s = batch * steps / decode seconds. Warm-up steps (compilation, graph capture) are not timed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from qwenquant.kernels.kv_cache import cache_bytes, make_static_cache

PREFILL_CHUNK = 2048


@dataclass
class PointSettings:
    batch: int
    context: int
    decode_tokens: int
    warmup_steps: int
    kv_cache: str  # bf16 | fp8
    compile: bool  # torch.compile(mode="reduce-overhead") for decode steps (CUDA only)
    seed: int = 0


def warmup_steps(device: torch.device, compile_decode: bool) -> int:
    """Untimed decode steps: CUDA graphs need warm-up runs and a capture run; eager needs one."""
    return 3 if device.type == "cuda" and compile_decode else 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(model, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Next greedy token [B, 1] after `tokens` [B, T] at `positions` [B, T]."""
    out = model(input_ids=tokens, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(dim=-1, keepdim=True)


def _decode_fn(model, compile_decode: bool):
    """The per-step decode function and whether it is compiled."""
    if not compile_decode:
        return _forward, False
    torch._dynamo.reset()  # one graph per point's shapes; frees the previous point's CUDA graphs
    return torch.compile(_forward, mode="reduce-overhead", fullgraph=True), True


@torch.no_grad()
def measure_point(model, settings: PointSettings, device: torch.device, kv_scales=None,
                  prompt: torch.Tensor | None = None) -> dict:
    """Time prefill and decode for one (batch, context); returns timings, the tokens and the cache bytes.

    The prompt is random token ids (seeded) unless given ([batch, context])."""
    s = settings
    if prompt is None:
        vocab = model.config.get_text_config().vocab_size
        prompt = torch.randint(0, vocab, (s.batch, s.context), generator=torch.Generator().manual_seed(s.seed))
    prompt = prompt.to(device)
    max_len = s.context + s.warmup_steps + s.decode_tokens
    cache = make_static_cache(model.config, max_len, s.kv_cache, kv_scales)
    _sync(device)
    start = time.perf_counter()
    for lo in range(0, s.context, PREFILL_CHUNK):
        hi = min(lo + PREFILL_CHUNK, s.context)
        pos = torch.arange(lo, hi, device=device).unsqueeze(0).expand(s.batch, -1)
        token = _forward(model, cache, prompt[:, lo:hi], pos)
    _sync(device)
    prefill_s = time.perf_counter() - start
    step, compiled = _decode_fn(model, s.compile and device.type == "cuda")
    note = None
    tokens, times = [token], []
    position = s.context
    for i in range(s.warmup_steps + s.decode_tokens):
        pos = torch.full((s.batch, 1), position, device=device, dtype=torch.long)
        t0 = time.perf_counter()
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            token = step(model, cache, tokens[-1], pos).clone()
        except Exception as err:  # a compile failure must not lose the point: fall back to eager, say so
            if not compiled:
                raise
            note = f"torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); decode ran eager"
            step, compiled = _forward, False
            token = step(model, cache, tokens[-1], pos).clone()
        _sync(device)
        if i >= s.warmup_steps:
            times.append(time.perf_counter() - t0)
        tokens.append(token)
        position += 1
    decode_s = sum(times)
    result = {
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": s.batch * s.context / prefill_s,
        "ttft_s": prefill_s,
        "decode_s": decode_s,
        "decode_steps": len(times),
        "decode_tokens_per_s": s.batch * len(times) / decode_s if decode_s > 0 else None,
        "itl_ms_mean": 1000 * statistics.fmean(times) if times else None,
        "itl_ms_p50": 1000 * statistics.median(times) if times else None,
        "itl_ms_p90": 1000 * sorted(times)[int(0.9 * (len(times) - 1))] if times else None,
        "compiled": compiled,
        "kv_cache_bytes": cache_bytes(cache),
        "max_cache_len": max_len,
        "generated": torch.cat(tokens, dim=1).cpu(),
    }
    if note:
        result["note"] = note
    del cache
    return result
