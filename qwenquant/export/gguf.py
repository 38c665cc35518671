"""GGUF (llama.cpp, Ollama, LM Studio): one `model.gguf` file holding the weights, the hyper-parameters and the
tokenizer, written with the `gguf` package (llama.cpp's own Python writer).

Quantized Linears carry our INT codes unchanged as GGUF's 32-element block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: the
mapping and the float16 rounding of scales in qwenquant/export/gguf_blocks.py). Everything else keeps the source
dtype llama.cpp computes with: 1-D tensors (the RMSNorm weights, q_norm/k_norm included) as F32, as llama.cpp's own
converter writes them; the embedding table and Linears left unquantized (kept sensitive) as BF16 (F16/F32 when the
source is). Tied embeddings (`tie_word_embeddings`): no `output.weight`; llama.cpp's qwen3 loader then uses
`token_embd.weight` as the output head. Tensor names come from gguf-py's own HF -> GGUF name map for MODEL_ARCH.QWEN3
(`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`; MODEL_ARCH.QWEN3MOE for Qwen3-MoE, whose
experts are stacked per projection: qwenquant/export/gguf_experts.py); Qwen's rotary is NEOX-style, so q/k rows are
written unpermuted. Metadata: qwenquant/export/gguf_meta.py.

The registry entry (`EXPORT_FORMAT`) stores `int` records; the file is not a safetensors folder, so the entry names
its own writer (`write_folder`) and its own verification (qwenquant/eval/gguf_verify.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from qwenquant.errors import BadInputError
from qwenquant.export.format_spec import ExportFormat, int_actorder
from qwenquant.export.gguf_blocks import BLOCK, BLOCK_BYTES, PackedLinear, check_groups, pack, type_for
from qwenquant.export.gguf_experts import ExpertStacker, expert_slot
from qwenquant.export.gguf_meta import add_hparams, add_tokenizer, arch_of, gguf_module, num_experts, tensor_names
from qwenquant.quant.records import QuantizedWeight

FILE_NAME = "model.gguf"
FLOAT_TYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _float_array(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """(raw little-endian bytes as uint8 [..., bytes per row], GGUF type): 1-D -> F32, else the source dtype."""
    t = t.detach().cpu().contiguous()
    if t.dim() == 1 or t.dtype not in FLOAT_TYPES:
        t = t.float()
    qtype = FLOAT_TYPES[t.dtype]
    raw = t.view(torch.int16) if t.dtype != torch.float32 else t.view(torch.int32)
    return raw.numpy().view(np.uint8).reshape(*t.shape[:-1], -1), qtype


def write_gguf(path: Path, config: dict, tokenizer, items: Iterable[tuple[str, torch.Tensor]],
               records: dict[str, QuantizedWeight], qtype: str | None = None, name: str = "qwen3") -> dict:
    """Write `path` (one GGUF file). `items`: the model's (state-dict key, tensor) pairs; a key whose module has a
    record is written from the record. `qtype` forces one block type (refused when the codes do not fit it).
    Returns what was written: tensor types counted, float16 rounding measured, tokenizer summary."""
    gguf = gguf_module()
    arch = arch_of(config)
    names = tensor_names(config)
    experts = ExpertStacker(num_experts(config))
    tied = bool(config.get("tie_word_embeddings", False))
    writer = gguf.GGUFWriter(str(path), arch)
    add_hparams(writer, config, arch, name)
    tok = add_tokenizer(writer, tokenizer, int(config["vocab_size"]), config.get("bos_token_id"))
    counts: dict[str, int] = {}
    rounding = {"mins_rounded": 0, "max_min_deviation": 0.0, "minima": 0}
    for key, tensor in items:
        if tied and key == "lm_head.weight":
            continue  # one table; llama.cpp uses token_embd as the output head when `output` is absent
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in records:
            packed = pack(records[module], qtype)
            data, ttype = packed.data, packed.qtype
            _add_rounding(rounding, packed)
        else:
            data, ttype = _float_array(tensor)
        if expert_slot(key) is not None:  # qwen3moe: experts stacked per projection (qwenquant/export/gguf_experts.py)
            done = experts.add(key, data, ttype)
            if done is None:
                continue
            key, data, ttype = done
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"no GGUF name for tensor {key}")
        writer.add_tensor(target, data, raw_dtype=gguf.GGMLQuantizationType[ttype])
        counts[ttype] = counts.get(ttype, 0) + 1
    experts.check_complete()
    file_type = _file_type(gguf, counts)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": Path(path).name, "tensor_types": counts, "fp16_rounding": rounding, "tokenizer": tok}


def _add_rounding(total: dict, packed: PackedLinear) -> None:
    if packed.qtype in ("Q4_1", "Q5_1"):
        total["minima"] += packed.data.shape[0] * packed.data.shape[1] // BLOCK_BYTES[packed.qtype]
        total["mins_rounded"] += packed.mins_rounded
        total["max_min_deviation"] = max(total["max_min_deviation"], packed.max_min_deviation)


def _file_type(gguf, counts: dict[str, int]):
    """general.file_type: the block type the quantized Linears use (llama.cpp's `MOSTLY_*`), else the float one."""
    quantized = [t for t in counts if t in BLOCK_BYTES]
    kind = quantized[0] if len(quantized) == 1 else ("BF16" if "BF16" in counts else None)
    names = {"BF16": "MOSTLY_BF16", "F16": "MOSTLY_F16", "F32": "ALL_F32"}
    return getattr(gguf.LlamaFileType, names.get(kind, f"MOSTLY_{kind}"), None) if kind else None


def read_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a GGUF file: name -> (GGUF type name, float32 values in llama.cpp's [rows, K] order),
    dequantized with gguf-py's own `gguf.quants.dequantize` (the reference, not our packing)."""
    gguf = gguf_module()
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists ne0 (K) first
        values = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        out[t.name] = (t.tensor_type.name, values)
    return out


def read_metadata(path: Path) -> dict[str, object]:
    """Scalar and string metadata of a GGUF file (arrays summarized by length)."""
    gguf = gguf_module()
    reader = gguf.GGUFReader(str(path))
    out: dict[str, object] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if len(field.types) > 1 or (field.types and field.types[0] == gguf.GGUFValueType.ARRAY):
            out[key] = len(field.data)
        else:
            out[key] = field.contents()
    return out


# -- the registry entry ---------------------------------------------------------------------------------------------


def _check_stage(kind: str, cfg) -> None:
    if kind != "int":
        raise ValueError("export.format: gguf stores INT weights (Q8_0/Q4_0/Q4_1/Q5_0/Q5_1); FP8 exports to "
                         "compressed-tensors or hf-fp8")
    try:
        type_for(cfg.bits, cfg.symmetric)
        check_groups(cfg.group_size, int_actorder(cfg))
    except ValueError as err:
        raise ValueError(f"export.format: {err}") from None


def _check_linear(kind: str, cfg, name: str, n: int, k: int) -> str | None:
    if k % BLOCK:
        return f"{name} has {k} input features; GGUF blocks need a multiple of 32, use --format compressed-tensors"
    return None


def _check_config(config: dict) -> str | None:
    try:
        arch_of(config)
    except BadInputError as err:
        return str(err)
    return None


def _tensor_bytes(kind: str, cfg, n: int, k: int, dtype_bytes: int) -> dict[str, int]:
    return {"weight": n * math.ceil(k / BLOCK) * BLOCK_BYTES[type_for(cfg.bits, cfg.symmetric)]}


def _linear_tensors(qw: QuantizedWeight, cfg, name: str, activation) -> dict[str, torch.Tensor]:
    return {"weight": torch.from_numpy(pack(qw).data)}


def _quantization_config(kind: str, cfg, ignore: list[str], linears: list[str]) -> tuple[dict, None]:
    return {"quant_method": "gguf", "type": type_for(cfg.bits, cfg.symmetric), "ignore": ignore}, None


def _read_linear(tensors: dict[str, torch.Tensor], config: dict, name: str) -> torch.Tensor:
    """One Linear's float32 [N, K] from its block bytes, through gguf-py's dequantize."""
    from gguf.quants import dequantize

    gguf = gguf_module()
    return torch.from_numpy(dequantize(tensors["weight"].numpy(), gguf.GGMLQuantizationType[config["type"]]).copy())


def _write_folder(folder: Path, model, tokenizer, recipe, state, items) -> dict:
    config = model.config.to_dict()
    written = write_gguf(Path(folder) / FILE_NAME, config, tokenizer, items, state.records,
                         name=Path(str(recipe.model.id)).name)
    return {"files": [FILE_NAME], "tensor_bytes": (Path(folder) / FILE_NAME).stat().st_size, "gguf": written}


EXPORT_FORMAT = ExportFormat(
    "gguf", ("int",), _check_stage, _tensor_bytes,
    linear_tensors=_linear_tensors,
    quantization_config=_quantization_config,
    reload_with=lambda kind, cfg, moe: "llama.cpp",
    read_linear=_read_linear,
    check_linear=_check_linear,
    check_config=_check_config,
    write_folder=_write_folder,
)
