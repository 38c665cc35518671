"""Read the Linear weights back out of a written model.onnx, from the ONNX operator specs (not from the builder):

- `MatMulNBits` (com.microsoft, attributes K, N, bits, block_size): B uint8 [N, ceil(K/block), block*bits/8] holds
  the codes of row n, block b, lowest bits first (4-bit: element 2j in the low nibble of byte j); scales [N,
  n_blocks] (or flat); zero_points uint8 packed the same way along the blocks (or absent: 2^(bits-1)); g_idx int32
  [K] (optional: act-order, the block of each input column, g = g_idx[k], else g = k // block).
  W[n, k] = (q[n, k] - zp[n, g]) * scale[n, g].
- QDQ: `MatMul(x, DequantizeLinear(q, scale[, zp], axis=0, block_size))` with q int4/uint4 [K, N]:
  W^T[k, n] = (q[k, n] - zp[k // block, n]) * scale[k // block, n].
- `MatMul` with a float initializer [K, N] (fp32 builds): W = B^T.
Node names `/model/layers.{i}/{attn|mlp}/{proj}/MatMul*` and `/lm_head/MatMul*` give the module; the builder's fused
`qkv_proj` is split back into q/k/v by the config's head sizes. Weights are float32 [out, in], computed in float32
exactly as onnxruntime's dequantization does.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

NODE = re.compile(r"^/(?:model/layers\.(\d+)/(attn|mlp)/(\w+)|(lm_head))/MatMul")
PARTS = {"attn": "self_attn", "mlp": "mlp"}


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 [..., bytes] -> [..., count] codes, lowest bits first."""
    if bits == 8:
        return packed[..., :count].astype(np.int32)
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)[..., :count].astype(np.int32)


def dequantize_matmul_nbits(attrs: dict, b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None,
                            g_idx: np.ndarray | None = None) -> np.ndarray:
    """Float32 [N, K] from MatMulNBits inputs (module docstring); `g_idx` [K] (act-order) gives each input
    column's block instead of k // block."""
    n, k, bits, block = int(attrs["N"]), int(attrs["K"]), int(attrs["bits"]), int(attrs["block_size"])
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits with {bits} bits is not read")
    n_blocks = (k + block - 1) // block
    q = _unpack(b.reshape(n, n_blocks, -1), bits, block).reshape(n, n_blocks * block)[:, :k]
    s = scales.astype(np.float32).reshape(n, n_blocks)
    if zp is None:
        z = np.full((n, n_blocks), 1 << (bits - 1), dtype=np.int32)
    elif zp.dtype == np.uint8:
        z = _unpack(zp.reshape(n, -1), bits, n_blocks)
    else:
        raise ValueError(f"MatMulNBits zero points of dtype {zp.dtype} are not read")
    idx = np.arange(k) // block if g_idx is None else g_idx.astype(np.int64)
    return ((q - z[:, idx]).astype(np.float32) * s[:, idx]).astype(np.float32)


def dequantize_linear_blocked(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int,
                              block: int) -> np.ndarray:
    """Float32 W^T [K, N] from a blocked DequantizeLinear along axis 0 (module docstring)."""
    if axis != 0:
        raise ValueError(f"DequantizeLinear along axis {axis} is not read")
    idx = np.arange(q.shape[0]) // block
    z = 0 if zp is None else zp.astype(np.int32)[idx]
    return ((q.astype(np.int32) - z) * scale.astype(np.float32)[idx]).astype(np.float32)


def _module(match: re.Match, config: dict) -> list[tuple[str, int]]:
    """[(Linear name, its output rows)] for a node name match (qkv_proj -> q, k, v)."""
    if match.group(4):
        return [("lm_head", int(config["vocab_size"]))]
    layer, part, proj = match.group(1), PARTS[match.group(2)], match.group(3)
    prefix = f"model.layers.{layer}.{part}."
    if proj == "qkv_proj":
        head = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        q, kv = head * int(config["num_attention_heads"]), head * int(config["num_key_value_heads"])
        return [(prefix + "q_proj", q), (prefix + "k_proj", kv), (prefix + "v_proj", kv)]
    return [(prefix + proj, -1)]


def read_linears(path: Path, config: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({Linear name: float32 weight [out, in]}, {Linear name: how it is stored}) from a model.onnx."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: node for node in model.graph.node for o in node.output}

    def array(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name and name in inits else None

    weights, kinds = {}, {}
    for node in model.graph.node:
        match = NODE.match(node.name)
        if match is None or node.op_type not in ("MatMulNBits", "MatMul"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            ins = list(node.input) + [""] * 5
            w = dequantize_matmul_nbits(attrs, array(ins[1]), array(ins[2]), array(ins[3]), array(ins[4]))
            kind = f"MatMulNBits {attrs['bits']}-bit block {attrs['block_size']}" + (
                " with zero points" if ins[3] else "") + (" and g_idx" if ins[4] else "")
        elif node.input[1] in inits:
            w, kind = array(node.input[1]).astype(np.float32).T, "MatMul float"
        elif node.input[1] in producers and producers[node.input[1]].op_type == "DequantizeLinear":
            dq = producers[node.input[1]]
            dq_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
            ins = list(dq.input) + [""] * 3
            w = dequantize_linear_blocked(array(ins[0]), array(ins[1]), array(ins[2]), int(dq_attrs.get("axis", 1)),
                                          int(dq_attrs.get("block_size", 0))).T
            kind = f"QDQ DequantizeLinear {array(ins[0]).dtype} block {dq_attrs.get('block_size')}"
        else:
            continue  # e.g. a tied lm_head computed from the embedding table
        start = 0
        for name, rows in _module(match, config):
            rows = w.shape[0] - start if rows < 0 else rows
            weights[name] = torch.from_numpy(np.ascontiguousarray(w[start:start + rows]))
            kinds[name] = kind
            start += rows
    return weights, kinds
