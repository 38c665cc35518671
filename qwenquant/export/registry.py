"""The export-format registry: every `export.format` a recipe may name. A new format is one module in this package
with an `EXPORT_FORMAT` (qwenquant/export/format_spec.py), added to `FORMATS` here."""

from __future__ import annotations

from types import MappingProxyType

from qwenquant.export import awq_gemm, compressed_tensors, gguf, gptq_v1, hf_fp8
from qwenquant.export.format_spec import ExportFormat

FORMATS: MappingProxyType[str, ExportFormat] = MappingProxyType({
    f.name: f for f in (compressed_tensors.EXPORT_FORMAT, hf_fp8.EXPORT_FORMAT, gptq_v1.EXPORT_FORMAT,
                        awq_gemm.EXPORT_FORMAT, gguf.EXPORT_FORMAT)
})
