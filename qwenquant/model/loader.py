"""Resolve a model reference (local dir, hub id, or `Qwen3-4B` shorthand), validate it, and load it."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from qwenquant.errors import BadInputError
from qwenquant.model import hub
from qwenquant.model.moe import unfuse_experts
from qwenquant.model.qwen3 import ArchAdapter, adapter_for, supported_architectures

SHORTHAND = re.compile(r"^Qwen3[-\w.]*$")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ResolvedModel:
    """A model reference turned into a local directory with a validated config."""

    reference: str  # what the user typed
    repo_id: str | None  # hub id when it came from the hub
    path: Path
    config: dict
    adapter: ArchAdapter
    weight_files: list[Path]  # empty only for --dry-run (download=False) of a folder or hub id without local weights
    hub_headers: dict[str, dict[str, dict]] | None = None  # --dry-run of a hub id not cached: {file: safetensors header}


def hub_id_for(reference: str) -> str:
    """`Qwen3-4B` -> `Qwen/Qwen3-4B`; anything with a slash is taken as a hub id."""
    if "/" not in reference and SHORTHAND.match(reference):
        return f"Qwen/{reference}"
    return reference


def default_output_name(reference: str, suffix: str) -> str:
    """./Qwen3-4B-FP8 for `Qwen3-4B`, ./qwen3-mini-FP8 for a local dir."""
    return f"{Path(reference.rstrip('/')).name}-{suffix}"


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    offline = hub.offline()
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=hub.CACHED_PATTERNS,
                                 local_files_only=offline)
    except Exception as err:  # hub errors come in many classes; all mean the same thing to the user
        how = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else f"hub unreachable or no such repository: {type(err).__name__}")
        raise BadInputError(
            f"cannot get model {repo_id!r} from the hub ({how}): download it where the hub is reachable "
            f"(`hf download {repo_id}`; it lands in the cache qwenquant reads) or pass a local directory with --model"
        ) from err
    return Path(path)


def resolve_model(reference: str, revision: str | None = None, download: bool = True) -> ResolvedModel:
    """Find the model's files and check config.json and safetensors headers before loading any weight.

    `download=False` (--dry-run, which sizes a run before anything large is downloaded): a hub id not in the local
    cache gets only its config.json and its safetensors headers from the hub (`ResolvedModel.hub_headers`), and a
    folder without weights is accepted (`weight_files` empty: the estimate derives the tensors from config.json).
    A real run refuses a folder without weights."""
    local = Path(reference).expanduser()
    repo_id, hub_headers = None, None
    if local.exists():
        if not local.is_dir():
            raise BadInputError(f"--model {reference}: not a directory; pass a model folder or a hub id")
        path = local
    elif reference.startswith((".", "/", "~")) or reference.count("/") > 1:
        raise BadInputError(f"--model {reference}: no such directory; check the path")
    else:
        repo_id = hub_id_for(reference)
        path, hub_headers = (_download(repo_id, revision), None) if download else hub.sizing_source(repo_id, revision)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BadInputError(f"--model {reference}: no config.json in {path}; point --model at a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BadInputError(f"--model {reference}: config.json is unreadable ({err})") from err
    if not isinstance(config, dict):
        raise BadInputError(f"--model {reference}: config.json is not a JSON object; point --model at a Hugging Face model folder")
    archs = config.get("architectures") or []
    adapter = next((a for a in (adapter_for(x) for x in archs) if a is not None), None)
    if adapter is None:
        raise BadInputError(
            f"--model {reference}: architecture {archs or config.get('model_type')} is not supported; "
            f"qwenquant supports {', '.join(supported_architectures())}"
        )
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method")
        raise BadInputError(f"--model {reference}: already quantized ({method}); start from the bf16 checkpoint")
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files and (download or any(path.glob("*.bin"))):  # .bin weights: the run would refuse them
        raise BadInputError(f"--model {reference}: no *.safetensors files in {path}; convert .bin weights first")
    for f in weight_files:
        check_safetensors_header(f)
    return ResolvedModel(reference, repo_id, path, config, adapter, weight_files, hub_headers)


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file, streamed (provenance in the report)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_safetensors_header(path: Path) -> dict:
    """Read a safetensors header, turning corruption into a one-line error."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            size = path.stat().st_size
            for key in keys:
                sl = f.get_slice(key)
                sl.get_shape()
    except Exception as err:
        raise BadInputError(f"{path}: corrupt or truncated safetensors file ({err}); re-download it") from err
    header_ok = size > 8
    if not header_ok:
        raise BadInputError(f"{path}: empty safetensors file; re-download it")
    return {"tensors": len(keys), "bytes": size}


def load_model(resolved: ResolvedModel, dtype: str = "bfloat16"):
    """Load weights on CPU in `dtype`; the pipeline moves one layer at a time to the compute device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise BadInputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=DTYPES[dtype], low_cpu_mem_usage=True)
    except Exception as err:
        raise BadInputError(f"--model {resolved.reference}: transformers could not load it ({err})") from err
    model.eval()
    if resolved.adapter.moe is not None:  # one nn.Linear per expert projection, named as on disk
        unfuse_experts(model, resolved.adapter)
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise BadInputError(f"--model {resolved.reference}: weight {name} contains NaN or Inf; the checkpoint is broken, re-download or re-export it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    except Exception as err:
        raise BadInputError(f"--model {resolved.reference}: tokenizer could not be loaded ({err})") from err
    return model, tokenizer
