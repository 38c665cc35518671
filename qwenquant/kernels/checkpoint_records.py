"""Checkpoint tensors of one Linear -> a `QuantizedWeight` record (codes, scales, zero points), for every format
qwenquant writes: compressed-tensors float-quantized / pack-quantized / int-quantized, hf-fp8, GPTQ v1 and AWQ GEMM.

The bit unpacking is the spec readers' own (`export/ct_packed.unpack_bits`, `export/gptq_v1.unpack_int32`,
`export/awq_gemm.ORDER`); tests check `record.dequantize()` against each format's `read_linear` bit for bit.
"""

from __future__ import annotations

import torch

from qwenquant.export import ct_nvfp4, ct_packed
from qwenquant.export.awq_gemm import ORDER as AWQ_ORDER
from qwenquant.export.gptq_v1 import unpack_int32
from qwenquant.quant import int8 as int8q
from qwenquant.quant.records import QuantizedWeight

FORMATS = ("bf16", "compressed-tensors", "hf-fp8", "gptq", "awq")


def checkpoint_format(qconfig: dict | None) -> str:
    """Which of FORMATS a config.json `quantization_config` describes (ValueError for anything else)."""
    if not qconfig:
        return "bf16"
    method = qconfig.get("quant_method")
    name = {"compressed-tensors": "compressed-tensors", "fp8": "hf-fp8", "gptq": "gptq", "awq": "awq"}.get(method)
    if name is None:
        raise ValueError(f"quant_method {method!r} is not one of compressed-tensors, fp8, gptq, awq")
    if name == "gptq" and qconfig.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"GPTQ checkpoint_format {qconfig.get('checkpoint_format')!r}: only v1 ('gptq') is read")
    return name


def _ct_group(qconfig: dict, name: str | None = None) -> dict:
    """The compressed-tensors config group with weight args that lists Linear `name` by name (qwenquant writes
    one group per granularity when Linears differ), else the first one."""
    groups = [g for g in (qconfig.get("config_groups") or {}).values() if isinstance(g, dict) and g.get("weights")]
    named = [g for g in groups if name is not None and name in (g.get("targets") or [])]
    return (named or groups or [{}])[0]


def activation_scheme(qconfig: dict | None, name: str | None = None) -> str | None:
    """How the checkpoint quantizes Linear inputs: 'token' / 'tensor' / 'group' (FP8), or None (weight-only)."""
    fmt = checkpoint_format(qconfig)
    if fmt == "hf-fp8":
        return "group"  # dynamic 1x128 groups, the block scheme's activations
    if fmt != "compressed-tensors":
        return None
    acts = _ct_group(qconfig, name).get("input_activations")
    if not acts:
        return None
    return acts.get("strategy") or ("token" if acts.get("dynamic") else "tensor")


def _block_size(qconfig: dict, fmt: str, name: str | None = None) -> int | None:
    """Block size of a block-scaled FP8 checkpoint, None for channel/tensor scales."""
    if fmt == "hf-fp8":
        return int((qconfig.get("weight_block_size") or [128])[0])
    weights = _ct_group(qconfig, name).get("weights", {})
    if weights.get("strategy") != "block":
        return None
    return int((weights.get("block_structure") or [128])[0])


def _fp8_record(q: torch.Tensor, scale: torch.Tensor, block: int | None) -> QuantizedWeight:
    """Granularity from the config (block) or the scale's shape (a one-block weight stays 'block')."""
    n = q.shape[0]
    if block is not None:
        granularity = "block"
    elif scale.numel() == 1:
        granularity = "tensor"
    elif tuple(scale.shape) == (n, 1):
        granularity = "channel"
    else:
        raise ValueError(f"FP8 weight_scale of shape {tuple(scale.shape)} is neither per-tensor, per-channel nor "
                         "a declared block structure")
    return QuantizedWeight(kind="fp8", q=q, scale=scale.reshape(-1) if granularity == "tensor" else scale,
                           granularity=granularity, bits=8, block_size=block if granularity == "block" else None)


def _int_record(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool,
                g_idx: torch.Tensor | None) -> QuantizedWeight:
    """q [N, K], scale/zero [N, n_groups]; a g_idx equal to natural contiguous groups is dropped."""
    k, n_groups = q.shape[1], scale.shape[1]
    gs = k // n_groups
    if g_idx is not None and torch.equal(g_idx.long().cpu(), torch.arange(k) // gs):
        g_idx = None
    return QuantizedWeight(kind="int", q=q.to(torch.int32), scale=scale,
                           granularity="channel" if n_groups == 1 else "group", bits=bits, symmetric=symmetric, zero_point=zero.to(torch.int32), group_size=gs,
                           g_idx=None if g_idx is None else g_idx.to(torch.int32))


def _int8_record(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> QuantizedWeight:
    """An int-quantized Linear (signed int8 codes [N, K], per-channel scale [N, 1]) as an INT8 W8A8 record."""
    n, k = weight.shape
    if zero is not None and bool(zero.any()):
        raise ValueError("int-quantized weight with a non-zero weight_zero_point (asymmetric INT8 is not read)")
    if tuple(scale.shape) != (n, 1):
        raise ValueError(f"int-quantized weight_scale of shape {tuple(scale.shape)} is not per channel [{n}, 1]")
    return QuantizedWeight(kind=int8q.KIND, q=weight.to(torch.int32) + int8q.ZERO, scale=scale, granularity="channel",
                           bits=8, symmetric=True, zero_point=torch.full((n, 1), int8q.ZERO, dtype=torch.int32),
                           group_size=k)


def record_from_tensors(local: dict[str, torch.Tensor], qconfig: dict | None,
                        name: str | None = None) -> QuantizedWeight | None:
    """The record of one Linear from its local tensors (`weight`, `weight_scale`, `qweight`, ...); None when the
    Linear is stored unquantized (a plain floating-point `weight`)."""
    fmt = checkpoint_format(qconfig)
    if fmt == "bf16":
        return None
    if "weight_packed" in local and "weight_global_scale" in local:  # compressed-tensors nvfp4-pack-quantized
        return ct_nvfp4.record(local)
    if "weight_packed" in local:  # compressed-tensors pack-quantized
        bits = ct_packed._config_bits(qconfig, local)
        n, k = (int(v) for v in local["weight_shape"])
        scale = local["weight_scale"]
        q = ct_packed.unpack_bits(local["weight_packed"], bits, k)
        if "weight_zero_point" in local:
            zero = ct_packed.unpack_bits(local["weight_zero_point"].t(), bits, n).t()
        else:
            zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.int32)
        return _int_record(q, scale, zero, bits, "weight_zero_point" not in local, local.get("weight_g_idx"))
    if "qweight" in local and fmt == "gptq":
        bits = int(qconfig["bits"])
        q = unpack_int32(local["qweight"], bits, dim=0).t()  # [K/p, N] -> [N, K]
        zero = (unpack_int32(local["qzeros"], bits, dim=1) + 1).t()  # v1 stores z - 1; [n_groups, N] -> [N, n_groups]
        return _int_record(q, local["scales"].t().contiguous(), zero, bits, bool(qconfig.get("sym", True)),
                           local.get("g_idx"))
    if "qweight" in local and fmt == "awq":
        q = unpack_int32(local["qweight"], 4, dim=1, order=AWQ_ORDER).t()  # [K, N/8] -> [N, K]
        zero = unpack_int32(local["qzeros"], 4, dim=1, order=AWQ_ORDER).t()
        return _int_record(q, local["scales"].t().contiguous(), zero, 4, False, None)
    weight = local.get("weight")
    if weight is not None and weight.dtype == torch.int8 and fmt == "compressed-tensors":  # int-quantized W8A8
        return _int8_record(weight, local["weight_scale"], local.get("weight_zero_point"))
    if weight is not None and weight.dtype == torch.float8_e4m3fn:
        scale = local.get("weight_scale_inv") if fmt == "hf-fp8" else local.get("weight_scale")
        if scale is None:
            raise ValueError("float8 weight without its weight_scale / weight_scale_inv")
        return _fp8_record(weight, scale, _block_size(qconfig, fmt, name))
    return None


def kv_cache_scales(tensors: dict[str, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Calibrated (k_scale, v_scale) of a compressed-tensors `kv_cache_scheme`, keyed by layer index, as fp32: 0-dim
    (strategy tensor, stored [1]) or [H, 1, 1] (attn_head)."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.endswith(".self_attn.k_scale"):
            v = tensors.get(name[: -len("k_scale")] + "v_scale")
            layer = int(name.split(".layers.")[1].split(".")[0])
            if v is not None:
                out[layer] = tuple(s.float().reshape(()) if s.numel() == 1 else s.float().reshape(-1, 1, 1)
                                   for s in (t, v))
    return out
