"""Calibration samples: shipped sets, a local .txt/.jsonl file, or a hub dataset id -> fixed-length token windows.

Chat sources (`--calib chat`, or a .jsonl of `{"messages": [...]}`) are rendered through the model's chat template
first (qwenquant/chat_calibration.py) and packed without extra separators: the template's end-of-turn markers
already separate conversations."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from qwenquant.chat_calibration import chat_texts
from qwenquant.errors import BadInputError

BUILTIN_DIR = Path(__file__).resolve().parent / "data" / "calibration"  # also linked from <repo>/calibration/
BUILTIN_SETS = {"builtin": ("en", "zh"), "builtin:en": ("en",), "builtin:zh": ("zh",)}


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BadInputError(f"{path}:{n}: not valid JSON ({err.msg}); one JSON object per line") from err
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise BadInputError(f'{path}:{n}: no "text" string field; each line must be {{"text": "..."}}')
            texts.append(text)
    return texts


def _read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise BadInputError(f"calibration file {path} does not exist")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix in (".txt", ".raw", ".md"):
        text = path.read_text(encoding="utf-8", errors="replace")
        return [p for p in text.split("\n\n") if p.strip()]
    raise BadInputError(f"calibration file {path}: unsupported type {path.suffix!r}; use .txt or .jsonl")


def _read_hub(dataset: str) -> list[str]:
    """`name[:config][@split]`, text column `text`."""
    from datasets import load_dataset

    name, _, split = dataset.partition("@")
    name, _, config = name.partition(":")
    try:
        ds = load_dataset(name, config or None, split=split or "train")
    except Exception as err:
        raise BadInputError(
            f"cannot load calibration dataset {dataset!r} from the hub ({type(err).__name__}); "
            "pass a local .txt/.jsonl file or --calib builtin"
        ) from err
    if "text" not in ds.column_names:
        raise BadInputError(f"dataset {dataset!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t and t.strip()]


def read_texts(source: str) -> list[str]:
    """Documents of a calibration source; builtin sets are interleaved across languages."""
    if source in BUILTIN_SETS:
        files = [BUILTIN_DIR / f"{lang}.jsonl" for lang in BUILTIN_SETS[source]]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise BadInputError(f"builtin calibration data is missing ({missing[0]}); reinstall qwenquant or pass "
                                "--calib FILE.txt|FILE.jsonl")
        per_lang = [_read_jsonl(f) for f in files]
        texts = []
        for i in range(max(len(p) for p in per_lang)):
            texts.extend(p[i] for p in per_lang if i < len(p))
        return texts
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl", ".raw", ".md") or path.exists():
        return _read_file(path)
    return _read_hub(source)


def build_samples(texts: list[str], tokenizer, num_samples: int, seq_len: int, seed: int,
                  separate: bool = True) -> torch.Tensor:
    """[num_samples, seq_len] token ids: documents shuffled with `seed`, joined by EOS (`separate`), cut into
    windows."""
    if num_samples < 1 or seq_len < 8:
        raise BadInputError(f"--num-samples must be >= 1 and --seq-len >= 8 (got {num_samples}, {seq_len})")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise BadInputError("calibration data is empty; give a file with text or use --calib builtin")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    sep = [tokenizer.eos_token_id] if separate and tokenizer.eos_token_id is not None else []
    need = num_samples * seq_len
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"] + sep)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise BadInputError(
            f"calibration data too short: {len(ids)} tokens, need {num_samples} x {seq_len} = {need}; "
            "lower --num-samples/--seq-len or give more text"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(num_samples, seq_len)


def load_calibration(source: str, tokenizer, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    chats = chat_texts(source, tokenizer, BUILTIN_DIR)
    if chats is not None:
        return build_samples(chats, tokenizer, num_samples, seq_len, seed, separate=False)
    return build_samples(read_texts(source), tokenizer, num_samples, seq_len, seed)


def samples_hash(ids: torch.Tensor) -> str:
    """sha256 of the token ids: identifies exactly what the model was calibrated on."""
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()
