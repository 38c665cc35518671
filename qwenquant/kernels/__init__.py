"""Inference modules that run quantized Linears with real low-precision kernels (not dequantize-then-matmul),
and the loader that builds a model with them from a checkpoint folder (used by `qwenquant bench`).

- `fp8_linear`: FP8 W8A8 through `torch._scaled_mm` (row-wise scales) and FP8 weight-only (upcast per matmul).
- `int4_linear`: INT4 W4A16 through torch's int4 packing kernels (tinygemm on CUDA, the CPU int4 kernel on CPU).
- `checkpoint_records`: checkpoint tensors of each export format -> `QuantizedWeight` records.
- `kv_cache`: a static KV cache that stores K/V in float8_e4m3 with per-layer scales.
- `loader`: a checkpoint folder -> a transformers model whose quantized Linears are the modules above.
"""
