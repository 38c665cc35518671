"""Nested run data saved without pickle, so reading it back can never run code: tensors go to a safetensors file,
everything else (dicts with str or number keys, lists, tuples, numbers, strings, None, and dataclasses of the types a
caller allows) to a JSON skeleton beside it that names the tensors. Each save writes, in order and each atomically,
`NAME.safetensors`, `NAME.json` (holding the sha256 of the tensor file) and `NAME.sha256` (the sha256 of the JSON).

`load` checks both hashes: a file that was changed or damaged raises `TamperedFile`. A save that was interrupted
before its `.sha256` was written counts as absent (`load` returns None), so a killed run is never mistaken for a
tampered one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class TamperedFile(ValueError):
    """A stored file does not match the hash written beside it."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _encode(obj: Any, tensors: dict[str, torch.Tensor], types: dict[str, type]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"t": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int, float)) and not isinstance(k, bool) for k in obj):
            raise TypeError(f"safe_store: dict keys must be str or numbers, got {list(obj)[:3]}")
        return {"d": [[k, _encode(v, tensors, types)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"l" if isinstance(obj, list) else "u": [_encode(v, tensors, types) for v in obj]}
    name = type(obj).__name__
    if dataclasses.is_dataclass(obj) and types.get(name) is type(obj):
        return {"c": name, "f": {f.name: _encode(getattr(obj, f.name), tensors, types) for f in dataclasses.fields(obj)}}
    raise TypeError(f"safe_store: cannot store a {name} (allowed dataclasses: {', '.join(types) or 'none'})")


def _decode(node: dict, tensors: dict[str, torch.Tensor], types: dict[str, type]) -> Any:
    (kind, value), *rest = node.items()
    if kind == "t":
        return tensors[value]
    if kind == "v":
        return value
    if kind == "d":
        return {k: _decode(v, tensors, types) for k, v in value}
    if kind in ("l", "u"):
        items = [_decode(v, tensors, types) for v in value]
        return items if kind == "l" else tuple(items)
    if kind == "c" and value in types:
        return types[value](**{k: _decode(v, tensors, types) for k, v in rest[0][1].items()})
    raise TamperedFile(f"unknown entry {kind!r} ({value!r})")


def save(obj: Any, path: Path, types: tuple[type, ...] = ()) -> None:
    """Store `obj` as `path`.safetensors / .json / .sha256 (`path` without a suffix)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(obj, tensors, {t.__name__: t for t in types})
    path = Path(path)
    st, js, sha = (path.with_name(path.name + s) for s in (".safetensors", ".json", ".sha256"))
    _replace(st, lambda tmp: save_file(tensors, str(tmp)))
    _replace(js, lambda tmp: tmp.write_text(json.dumps({"tensors_sha256": _sha256(st), "data": skeleton})))
    _replace(sha, lambda tmp: tmp.write_text(_sha256(js) + "\n"))


def exists(path: Path) -> bool:
    """Whether a complete save of `path` is there (its hash file is written last)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256").is_file()


def remove(path: Path) -> None:
    """Delete what `save` stored at `path` (the hash file first, so a half-removed save counts as absent)."""
    path = Path(path)
    for suffix in (".sha256", ".json", ".safetensors"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def load(path: Path, types: tuple[type, ...] = (), check: bool = True) -> Any:
    """What `save` stored at `path`, after checking both hashes (`check=False`: a file this process wrote or already
    checked, read again); None when no complete save is there."""
    path = Path(path)
    st, js, sha = (path.with_name(path.name + s) for s in (".safetensors", ".json", ".sha256"))
    if not sha.is_file():
        return None
    if check and (not js.is_file() or _sha256(js) != sha.read_text().strip()):
        raise TamperedFile(f"{js} does not match its hash in {sha.name}")
    doc = json.loads(js.read_text())
    if check and (not st.is_file() or _sha256(st) != doc["tensors_sha256"]):
        raise TamperedFile(f"{st} does not match its hash in {js.name}")
    return _decode(doc["data"], load_file(str(st)), {t.__name__: t for t in types})
