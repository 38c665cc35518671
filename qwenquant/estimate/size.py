"""The checkpoint's size: which Linears are quantized (a plan stage may keep some in the source dtype), the bytes
each quantized one gets in the export format (the format declares them: `ExportFormat.tensor_bytes`), everything
else in the model dtype, and the safetensors headers and shards."""

from __future__ import annotations

from dataclasses import dataclass

from qwenquant.estimate.facts import DTYPE_BYTES, FLOAT_DTYPES, MODEL_DTYPE_BYTES, ModelFacts, header_bytes
from qwenquant.export.registry import FORMATS
from qwenquant.stages.registry import spec_of

RUN_FILES_BYTES = 200_000  # recipe.yaml, qwenquant_report.json (per-layer reports), REPORT.md, README.md, configs


def kept_linears(recipe, facts: ModelFacts) -> tuple[set[str], str]:
    """Linears the recipe's plan stage keeps in the source dtype (an estimate when the run chooses them)."""
    kept: set[str] = set()
    notes = []
    for cfg in recipe.stages:
        spec = spec_of(cfg)
        if spec.kept_linears is not None:
            names, note = spec.kept_linears(cfg, facts)
            kept |= names
            notes += [note] if note else []
    return kept, "; ".join(notes)


def linear_output_tensors(recipe, n: int, k: int, dtype_bytes: int) -> dict[str, int]:
    """Bytes of each tensor one quantized Linear [N, K] gets in the checkpoint (the format's own count)."""
    return FORMATS[recipe.export.format].tensor_bytes(recipe.record_kind, recipe.quantizer_config, n, k, dtype_bytes)


def _shards(entries: list[tuple[str, int, int]], shard_bytes: int) -> list[list[tuple[str, int, int]]]:
    """The entries split into files as the shard writer does (a new file when the next tensor would overflow)."""
    groups: list[list[tuple[str, int, int]]] = [[]]
    current = 0
    for e in entries:
        if groups[-1] and current + e[2] > shard_bytes:
            groups.append([])
            current = 0
        groups[-1].append(e)
        current += e[2]
    return groups


@dataclass
class OutputSize:
    """The checkpoint's safetensors bytes, split by kind."""

    safetensors_bytes: int
    quantized_bytes: int  # tensors of quantized Linears
    other_bytes: int  # embeddings, norms, lm_head, kept Linears (model dtype)
    header_bytes: int
    tensors: int
    files: int
    quantized_linears: int
    kept_linears: int
    folder_bytes: int  # + config, tokenizer, recipe, report, model card
    note: str = ""


def output_size(recipe, facts: ModelFacts) -> OutputSize:
    """Size of what write_checkpoint writes: quantized Linears per format, everything else in the model dtype,
    a tied lm_head written once (as the embedding)."""
    dt = MODEL_DTYPE_BYTES[recipe.model.dtype]
    kept, note = kept_linears(recipe, facts)
    quantized = {l.name: l for l in facts.linears if l.name not in kept}
    entries: list[tuple[str, int, int]] = []
    q_bytes = other = 0
    for name, t in facts.tensors.items():
        if facts.tied and name == "lm_head.weight":
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in quantized:
            l = quantized[module]
            for local, nbytes in linear_output_tensors(recipe, l.n, l.k, dt).items():
                entries.append((f"{module}.{local}", 2, nbytes))
                q_bytes += nbytes
        else:
            nbytes = t.numel * (dt if t.dtype in FLOAT_DTYPES else DTYPE_BYTES.get(t.dtype, 2))
            entries.append((name, len(t.shape), nbytes))
            other += nbytes
    shards = _shards(entries, recipe.export.max_shard_size_mb * 2**20)
    header = sum(header_bytes(g) for g in shards)
    index = 0 if len(shards) == 1 else sum(len(e[0]) + 40 for e in entries)
    total = q_bytes + other + header
    return OutputSize(total, q_bytes, other, header, len(entries), len(shards), len(quantized), len(kept),
                      total + index + facts.copied_files_bytes + RUN_FILES_BYTES, note)
