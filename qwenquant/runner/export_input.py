"""What `qwenquant export gguf|onnx DIR` reads: the input folder (config and tensors) and the bf16 model its
verification compares with, plus the names of the report files these commands write beside their output."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from qwenquant.errors import BadInputError
from qwenquant.report import REPORT_JSON, REPORT_MD  # noqa: F401 (re-exported to both export commands)


def read_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, every tensor of the folder's safetensors files); a folder without either is bad
    input."""
    if not (folder / "config.json").is_file():
        raise BadInputError(f"{folder}: no config.json; pass a Qwen3 checkpoint folder")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BadInputError(f"{folder}: no safetensors weights (an exported GGUF/ONNX folder cannot be converted again)")
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    return json.loads((folder / "config.json").read_text()), tensors


def source_folder(folder: Path, source: Path | None, quantized: bool) -> Path:
    """The bf16 model verification compares with: `folder` itself when it is not quantized, else `source`
    (--source) or the reference its qwenquant_report.json names."""
    if not quantized:
        return folder
    if source is not None:
        return source
    report = folder / REPORT_JSON
    ref = json.loads(report.read_text()).get("model", {}).get("reference") if report.is_file() else None
    if ref and Path(ref).is_dir():
        return Path(ref)
    raise BadInputError("verification compares with the bf16 model this checkpoint came from: pass --source DIR "
                        "(or --no-verify)")
