"""qwenquant: quantization and compression for Qwen3 models (FP8, GPTQ, AWQ) with engine-loadable checkpoints."""

__version__ = "0.1.0"
