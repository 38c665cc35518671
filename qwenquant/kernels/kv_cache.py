"""Static KV caches for decoding: transformers' `StaticCache` (bf16), or the same with K/V stored in float8_e4m3fn.

transformers' own FP8 cache (`QuantizedCache(backend="fp8")`) grows by concatenation and cannot be compiled or
captured in a CUDA graph, so `FP8StaticLayer` keeps StaticLayer's preallocated, in-place design and only changes
the storage: k_fp8 = fp8(k / k_scale) per layer (one scale for K and one for V, or one per KV head). Scales come
from the checkpoint's calibrated `kv_cache_scheme` (k_scale / v_scale, per tensor or per head: `qwenquant ...
--kv-cache fp8`) when present, else from the first update (the prefill's absmax / 448 per layer; later values
beyond it saturate at +-448). Attention still computes in bf16: each layer's cache is upcast when
it is read, so only one layer's bf16 copy exists at a time (workspace, not cache).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticCache, StaticLayer

from qwenquant.quant.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE

KV_DTYPES = ("bf16", "fp8")


class FP8StaticLayer(StaticLayer):
    """A StaticLayer holding K/V as float8_e4m3fn [B, H, max_len, D] with fp32 scales: one per layer (0-dim) or one
    per KV head ([H, 1, 1])."""

    def __init__(self, max_cache_len: int, k_scale=None, v_scale=None):
        super().__init__(max_cache_len=max_cache_len)
        self.calibrated = k_scale is not None and v_scale is not None
        self.k_scale, self.v_scale = _scale(k_scale), _scale(v_scale)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        shape = (self.batch_size, self.num_heads, self.max_cache_len)
        self.keys = torch.zeros(*shape, self.k_head_dim, dtype=FP8_DTYPE, device=self.device)
        self.values = torch.zeros(*shape, self.v_head_dim, dtype=FP8_DTYPE, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if self.k_scale is None:  # uncalibrated: scale from this first (prefill) update
            self.k_scale = (key_states.float().abs().amax() / FP8_MAX).clamp(min=MIN_SCALE).cpu()
            self.v_scale = (value_states.float().abs().amax() / FP8_MAX).clamp(min=MIN_SCALE).cpu()
        self.k_scale = self.k_scale.to(self.device)
        self.v_scale = self.v_scale.to(self.device)
        if not torch.compiler.is_compiling():
            for t in (self.keys, self.values, self.cumulative_length, self.k_scale, self.v_scale):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new positions in fp8 and return the whole cache upcast to the model dtype."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = key_states.shape[-2]
        position = torch.arange(length, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(length)
        k8 = quantize_kv(key_states, self.k_scale)
        v8 = quantize_kv(value_states, self.v_scale)
        # index_copy_ has no float8 kernel on CPU; the same bytes copy as uint8 everywhere
        self.keys.view(torch.uint8).index_copy_(2, position, k8.view(torch.uint8))
        self.values.view(torch.uint8).index_copy_(2, position, v8.view(torch.uint8))
        return dequantize_kv(self.keys, self.k_scale, self.dtype), dequantize_kv(self.values, self.v_scale, self.dtype)


def _scale(value) -> torch.Tensor | None:
    """A float or a stored k_scale/v_scale ([1]: per tensor, [H, 1, 1]: per head) as fp32, 0-dim when single."""
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32)
    return t.reshape(()) if t.numel() == 1 else t.reshape(-1, 1, 1)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8(x / scale), saturating at +-448."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale in `dtype` (fp8 -> bf16 is exact; a 0-dim fp32 scale multiplies without an fp32 copy, per-head scales
    are cast to `dtype`, as checkpoints store them)."""
    return q.to(dtype) * (scale if scale.dim() == 0 else scale.to(dtype))


def make_static_cache(config, max_cache_len: int, kv_dtype: str = "bf16",
                      scales: dict[int, tuple] | None = None) -> StaticCache:
    """A StaticCache for `config`; with kv_dtype 'fp8' its layers are FP8StaticLayers (calibrated scales if given)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv cache dtype {kv_dtype!r}; use one of {KV_DTYPES}")
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    if kv_dtype == "fp8":
        scales = scales or {}
        cache.layers = [FP8StaticLayer(max_cache_len, *scales.get(i, (None, None))) for i in range(len(cache.layers))]
    return cache


def cache_bytes(cache: StaticCache) -> int:
    """Bytes held by the cache's K/V tensors (0 before the first update allocates them)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def kv_bytes_per_token(config, kv_dtype: str = "bf16") -> int:
    """K + V bytes one token adds to the cache of every layer: 2 * layers * kv_heads * head_dim * element size."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = 1 if kv_dtype == "fp8" else 2
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * element
