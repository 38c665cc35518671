"""The precision every evaluation computes in: float32 on the CPU, the model's own dtype on an accelerator.

Why: CPUs without bf16 matrix units emulate bf16 matmuls. One 2048-token forward of qwen3-mini took 12.0 s in bf16
and 5.0 s in float32 on the shared 2-core development machine, and lm-eval answered 2x more requests per second
(benchmarks/results/eval_speed.md), while a GPU computes bf16 at full speed. float32 is also the more exact reference: source and quantized model are both evaluated in it, so their
difference is the quantization's, not bf16 rounding noise.

How, without a float32 copy of the model: `compute_in_float32` hooks every module that owns bf16/fp16 parameters
or buffers. Just before the module's forward its own tensors are swapped for float32 copies (`tensor.data`, so
tied parameters stay one object); right after it the original tensors are put back, the very same storage, so
nothing a run quantizes, exports or verifies changes by a bit, and at most one module's float32 copies exist at a
time (for a model held one decoder layer at a time this is also one layer's). An embedding table is not copied:
its output is cast instead (a lookup then a cast equals the lookup in the cast table), so every activation after it
is float32, including the rotary cos/sin and the attention mask that transformers derives from it.

FP8 activation quantization (`qwenquant.activations.activation_quantization`) hooks the Linears' inputs: it
computes in float32 and returns its input's dtype, so in a float32 evaluation the Linear sees the dequantized FP8
activation (code x scale) exactly, as vLLM's kernels multiply FP8 codes and apply the scales in float32.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator

import torch
from torch import nn

CPU_COMPUTE_DTYPE = torch.float32
LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype an evaluation on `device` computes in for a model stored in `model_dtype`."""
    if device.type == "cpu" and model_dtype in LOW_PRECISION:
        return CPU_COMPUTE_DTYPE
    return model_dtype


def compute_dtype_name(device: torch.device, model_dtype: torch.dtype) -> str:
    """`compute_dtype` as reports spell it ("float32")."""
    return str(compute_dtype(device, model_dtype)).removeprefix("torch.")


def evaluation_precision(model: nn.Module, device: torch.device) -> ContextManager[None]:
    """The context every evaluation forward of `model` on `device` runs in: float32 on the CPU (see the module doc),
    nothing on an accelerator."""
    if torch.device(device).type == "cpu":
        return compute_in_float32(model)
    return nullcontext()


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


@contextmanager
def compute_in_float32(model: nn.Module) -> Iterator[None]:
    """Every forward of `model`'s modules inside the block computes in float32; afterwards every parameter and
    buffer is the tensor it was before (same storage, same dtype). Hooks are always removed; tensors still swapped
    when a forward raised are put back on exit. Nesting is harmless (an inner swap finds float32 and does nothing).
    The dtypes are read at each forward, so tensors a loader replaces later (compressed-tensors decompresses FP8
    weights to bf16 in the first forward; offloaded layers are materialized from meta) are covered too."""
    swapped: dict[nn.Module, list[list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def upcast(module: nn.Module, _args) -> None:
        saved = [(t, t.data) for t in _own_tensors(module) if t.dtype in LOW_PRECISION]
        for t, data in saved:
            t.data = data.to(CPU_COMPUTE_DTYPE)
        swapped.setdefault(module, []).append(saved)

    def restore(module: nn.Module, _args, _out) -> None:
        for t, data in (swapped[module].pop() if swapped.get(module) else []):
            t.data = data

    def cast_output(_module: nn.Module, _args, out):
        return out.to(CPU_COMPUTE_DTYPE) if isinstance(out, torch.Tensor) and out.dtype in LOW_PRECISION else out

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                handles.append(module.register_forward_hook(cast_output))
            elif _own_tensors(module):  # first among the pre-hooks: one raising after it still finds its restore
                handles.append(module.register_forward_pre_hook(upcast, prepend=True))
                handles.append(module.register_forward_hook(restore, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for module, stack in swapped.items():
            while stack:
                restore(module, None, None)
