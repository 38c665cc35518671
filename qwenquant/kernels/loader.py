"""A checkpoint folder -> a transformers model whose quantized Linears run low-precision kernels.

bf16 folders load with `from_pretrained`. Quantized folders (every format `qwenquant.kernels.checkpoint_records`
reads) get a skeleton from their config on the meta device; each quantized Linear becomes a kernel module built
from its record, everything else (embeddings, norms, lm_head, Linears kept in bf16) is loaded as stored.
Kernel choice per record and device:
- FP8 channel/tensor scales with activation quantization: W8A8 `_scaled_mm` where the device has an FP8 matmul
  (CPU, CUDA SM89+), else FP8 weight-only; weight-only checkpoints: FP8 weight-only.
- FP8 128x128 block scales: dequantized to bf16 once at load (no block-scaled kernel here; labelled).
- INT4 (group 32-256 or channel-wise): `Int4Linear`; other bit widths / shapes: dequantized to bf16 (labelled).
- NVFP4 (compressed-tensors nvfp4-pack-quantized): dequantized to bf16 at load (no FP4 kernel here; labelled, and
  W4A4 checkpoints run with unquantized activations), reference: FP4 activations simulated.
- INT8 W8A8 (compressed-tensors int-quantized): `Int8Linear` on `torch._int_mm` with dynamic per-token INT8
  activations (shapes CUDA's `_int_mm` cannot take: dequantized to bf16, labelled).
`reference=True` builds the dequantize-then-matmul model instead (float32 weights and matmuls, FP8 / INT8
activations simulated by `ActivationSpec.quantize`), the numerical reference the kernel modules are tested against.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qwenquant.errors import BadInputError
from qwenquant.eval.verify import read_checkpoint_tensors
from qwenquant.kernels import fp8_linear, int4_linear, int8_linear
from qwenquant.kernels.checkpoint_records import (activation_scheme, checkpoint_format, kv_cache_scales,
                                                  record_from_tensors)
from qwenquant.quant import int8 as int8q
from qwenquant.quant.records import QuantizedWeight
from qwenquant.state import ActivationSpec

BF16_LABEL = "bf16: torch matmul (unquantized)"
BLOCK_LABEL = ("FP8 128x128 block checkpoint: dequantized to bf16 at load (bf16 weight memory and compute; "
               "no block-scaled FP8 kernel here)")
DEQUANT_LABEL = "INT{bits} {why}: dequantized to bf16 at load (no low-bit kernel; bf16 weight memory and compute)"
NVFP4_LABEL = ("NVFP4 checkpoint: dequantized to bf16 at load (no FP4 kernel here; bf16 weight memory and "
               "compute{acts})")
REFERENCE_LABEL = "reference: dequantized weight, float32 math{acts}"


class DenseLinear(nn.Linear):
    """A bf16 Linear holding a dequantized weight, labelled with why no low-precision kernel runs it."""

    def __init__(self, weight: torch.Tensor, label: str):
        n, k = weight.shape
        super().__init__(k, n, bias=False, device=weight.device, dtype=weight.dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.kernel_label = label


class ReferenceLinear(nn.Module):
    """The checkpoint's math in float32: activation rounding as the engine does it (if any: FP8 per token / group /
    tensor, INT8 per token), then x @ w_hat^T with the dequantized weight; the result in the input dtype. What
    kernel modules are tested against."""

    def __init__(self, weight: torch.Tensor, act_mode: str | None, input_scale: torch.Tensor | None,
                 act_dtype: str = "fp8"):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.acts = None if act_mode is None else ActivationSpec(act_mode, input_scale, dtype=act_dtype)
        self.act_mode = act_mode
        self.kernel_label = REFERENCE_LABEL.format(
            acts=f", {act_dtype.upper()} {act_mode} activations simulated" if act_mode else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.acts is not None:
            xf = self.acts.quantize(xf)
        return nn.functional.linear(xf, self.weight).to(x.dtype)


@dataclass
class LoadedModel:
    """A model ready for inference plus what the bench reports about it."""

    model: nn.Module
    folder: Path
    format: str  # checkpoint_records.FORMATS
    quant_config: dict | None
    activations: str | None  # 'token' | 'tensor' | 'group' | None
    kv_scales: dict[int, tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def kernels(self) -> dict[str, dict[str, int]]:
        """Linear type (e.g. 'self_attn.q_proj', 'lm_head') -> {kernel label: number of modules}."""
        out: dict[str, Counter] = {}
        for name, module in self.model.named_modules():
            if isinstance(module, (nn.Linear, fp8_linear.FP8Linear, int4_linear.Int4Linear, int8_linear.Int8Linear,
                                   ReferenceLinear)):
                kind = name.split(".", 3)[-1] if ".layers." in name else name
                out.setdefault(kind, Counter())[getattr(module, "kernel_label", BF16_LABEL)] += 1
        return {k: dict(v) for k, v in out.items()}


def _config_dict(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise BadInputError(f"{folder}: config.json is unreadable ({type(err).__name__})") from err


def build_linear(qw: QuantizedWeight, device: torch.device, activations: str | None, input_scale: torch.Tensor | None,
                 reference: bool = False) -> nn.Module:
    """The inference module for one quantized Linear (see the module docstring for the choice)."""
    if qw.kind == "nvfp4":
        w4a4 = activations == "tensor_group" and input_scale is not None
        if reference:
            scale = input_scale.to(device) if w4a4 else None
            return ReferenceLinear(qw.dequantize().to(device), "group" if w4a4 else None, scale, act_dtype="nvfp4")
        return DenseLinear(qw.dequantize(torch.bfloat16).to(device),
                           NVFP4_LABEL.format(acts=", FP4 activations not simulated" if w4a4 else ""))
    if reference and qw.kind == int8q.KIND:
        return ReferenceLinear(qw.dequantize().to(device), "token", None, act_dtype="int8")
    if reference:
        acts = activations if qw.kind == "fp8" and activations in ("token", "tensor", "group") else None
        scale = None if input_scale is None else input_scale.to(device)
        return ReferenceLinear(qw.dequantize().to(device), acts, scale)
    if qw.kind == int8q.KIND:
        reason = int8_linear.unsupported_reason(qw, device)
        if reason is None:
            return int8_linear.Int8Linear(qw, device)
        why = f"{reason}, activations not quantized"
        return DenseLinear(qw.dequantize(torch.bfloat16).to(device), DEQUANT_LABEL.format(bits=8, why=why))
    if qw.kind == "fp8":
        if qw.granularity == "block":
            return DenseLinear(qw.dequantize(torch.bfloat16).to(device), BLOCK_LABEL)
        mode = fp8_linear.scaled_mm_mode(str(device)) if activations in ("token", "tensor") else None
        return fp8_linear.FP8Linear(qw.q.to(device), qw.scale.to(device), mode or "weight-only",
                                    input_scale=None if input_scale is None else input_scale.to(device))
    reason = int4_linear.unsupported_reason(qw, device)
    if reason is None:
        return int4_linear.Int4Linear(qw, device)
    return DenseLinear(qw.dequantize(torch.bfloat16).to(device), DEQUANT_LABEL.format(bits=qw.bits, why=reason))


def _skeleton(folder: Path):
    """The model built from config.json on the meta device, without its quantization_config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def _rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute non-persistent buffers the checkpoint does not hold (rotary inv_freq) on `device`."""
    for name, module in list(model.named_modules()):
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            if not type(module).__name__.endswith("RotaryEmbedding"):
                raise RuntimeError(f"{name}: buffers missing from the checkpoint")
            model.set_submodule(name, type(module)(config=model.config).to(device))


def load_inference_model(folder: Path, device: torch.device, reference: bool = False) -> LoadedModel:
    """Load `folder` on `device` with kernel modules for its quantized Linears (or the dequantized reference)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    qconfig = _config_dict(folder).get("quantization_config")
    try:
        fmt = checkpoint_format(qconfig)
    except ValueError as err:
        raise BadInputError(f"{folder}: {err}") from err
    if fmt == "bf16":
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise BadInputError(f"{folder}: transformers could not load it ({type(err).__name__}: {first})") from err
        return LoadedModel(model.to(device).eval(), folder, fmt, None, None)
    activations = activation_scheme(qconfig)
    model = _skeleton(folder)
    try:
        tensors = read_checkpoint_tensors(folder)
    except Exception as err:  # safetensors reports corruption in its own error class
        raise BadInputError(f"{folder}: unreadable safetensors ({type(err).__name__}: {str(err)[:200]})") from err
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        prefix, _, local = key.rpartition(".")
        by_module.setdefault(prefix, {})[local] = t
    consumed: set[str] = set()
    replaced: set[str] = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name not in by_module:
            continue
        local = by_module[name]
        try:
            qw = record_from_tensors(local, qconfig, name)
        except (ValueError, KeyError) as err:
            raise BadInputError(f"{folder}: cannot read the quantized tensors of {name} ({err})") from err
        if qw is None:
            continue
        acts = activation_scheme(qconfig, name)  # per Linear: a checkpoint may mix channel and block groups
        model.set_submodule(name, build_linear(qw, device, acts, local.get("input_scale", local.get("input_global_scale")),
                                                  reference))
        consumed.update(f"{name}.{k}" for k in local)
        replaced.add(name)
    kv_scales = kv_cache_scales(tensors)
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).to(device)
             for k, v in tensors.items() if k not in consumed and not k.endswith(("k_scale", "v_scale"))}
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k.rpartition(".")[0] not in replaced
               and not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing:
        raise BadInputError(f"{folder}: checkpoint lacks {len(missing)} tensors the model needs (first: {missing[0]})")
    if model.config.tie_word_embeddings:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _rebuild_meta_buffers(model, device)
    notes = []
    if fmt in ("gptq", "awq"):
        notes.append("GPTQ/AWQ fp16 scales are rounded to bf16 for the int4 kernel (relative error <= 2**-8)")
    return LoadedModel(model.eval(), folder, fmt, qconfig, activations, kv_scales, notes)
