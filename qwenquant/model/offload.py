"""Models larger than host RAM (`--offload-dir DIR`): decoder layers stay on disk, one is in memory at a time.

`load_offloaded` builds the model skeleton on the meta device from config.json and loads only the resident tensors
(everything outside the decoder layers: embeddings, final norm, lm_head or its tie) from the source safetensors,
re-creating the buffers computed at init (the rotary embedding's inv_freq) on CPU. The decoder layers stay on meta.

A `LayerStore` knows where each decoder layer's tensors are: in the source safetensors (read through safetensors'
memory map, one layer at a time) until the layer is quantized, then in `<work dir>/layer-0000i.safetensors`, which
holds the layer's current (fake-quantized) parameters. `materialize(i)` loads layer i into its existing modules
(`load_state_dict(assign=True)`), `release(i, dirty)` writes it back when it changed and returns it to meta. Module
objects never change, so hooks registered by name (activation quantization) keep working across the two.

The work dir is a subfolder of DIR named after the output folder (`offload_workdir`); it is removed at the end of the
run, and DIR itself too when the run created it. Disk use: about the model's size in the model dtype.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qwenquant.errors import BadInputError, ResourceError
from qwenquant.model.qwen3 import ArchAdapter
from qwenquant.model.skeleton import load_generation_config, load_tokenizer, meta_skeleton

LAYER_FILE = "layer-{:05d}.safetensors"


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`). glibc raises its mmap threshold up to 32 MiB
    after large frees, so a released layer's tensors stay in its heap: measured on a 0.6B-shaped model, RSS grew
    by about one layer per layer (+1 GiB over 28 layers) without this, and stayed flat with it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.state_dict(keep_vars=True).values())


def all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """torch.isfinite(t).all() in chunks: on a whole bf16 embedding table the check alone would allocate several
    times the table (float32 upcast + bool mask), the largest transient of an offloaded load."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[s:s + chunk]).all()) for s in range(0, flat.numel(), chunk))


@dataclass
class LayerStore:
    """Where every decoder layer's tensors are, and which layers are in memory right now (see the module doc)."""

    model: nn.Module
    adapter: ArchAdapter
    folder: Path  # the run's offload work dir (layer files)
    source_index: dict[str, Path]  # tensor name -> source safetensors file
    reference: str = ""  # the user's --model, for error messages
    materialized: set[int] = field(default_factory=set)
    _checked: set[int] = field(default_factory=set)  # layers whose source tensors were checked finite

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.adapter.layers_path)  # type: ignore[return-value]

    def prefix(self, i: int) -> str:
        return f"{self.adapter.layers_path}.{i}."

    def layer_file(self, i: int) -> Path:
        return self.folder / LAYER_FILE.format(i)

    def layer_index(self, key: str) -> int | None:
        """The decoder layer a full tensor name belongs to (None: a resident tensor)."""
        head = self.adapter.layers_path + "."
        return int(key[len(head):].split(".", 1)[0]) if key.startswith(head) else None

    def materialize(self, i: int) -> nn.Module:
        """Load decoder layer i (its file in the work dir if it has one, else the source tensors) on CPU."""
        layer = self.layers[i]
        if i in self.materialized:
            return layer
        targets = layer.state_dict(keep_vars=True)
        if self.layer_file(i).is_file():
            state = load_file(self.layer_file(i))
        else:
            state = self._read_source(i, targets)
        layer.load_state_dict(state, strict=True, assign=True)
        self.materialized.add(i)
        return layer

    def _read_source(self, i: int, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Layer i's tensors from the source safetensors, in the skeleton's dtypes (as from_pretrained casts)."""
        prefix = self.prefix(i)
        by_file: dict[Path, list[str]] = {}
        for local in targets:
            full = prefix + local
            if full not in self.source_index:
                raise BadInputError(f"--model {self.reference}: tensor {full} is not in the checkpoint under that name; "
                                    "run without --offload-dir")
            by_file.setdefault(self.source_index[full], []).append(local)
        state = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for local in names:
                    t, target = f.get_tensor(prefix + local), targets[local]
                    if tuple(t.shape) != tuple(target.shape):
                        raise BadInputError(f"--model {self.reference}: {prefix + local} has shape {tuple(t.shape)}, "
                                            f"config.json implies {tuple(target.shape)}")
                    state[local] = t.to(target.dtype) if t.dtype != target.dtype and t.is_floating_point() else t
        if i not in self._checked:
            for local, t in state.items():
                if t.is_floating_point() and not all_finite(t):
                    raise BadInputError(f"--model {self.reference}: weight {prefix + local} contains NaN or Inf; the "
                                        "checkpoint is broken, re-download or re-export it")
            self._checked.add(i)
        return state

    def release(self, i: int, dirty: bool) -> None:
        """Return decoder layer i to meta; first, when `dirty` (its parameters changed), write them to its file."""
        layer = self.layers[i]
        if i not in self.materialized:
            return
        if dirty:
            self._save(i, layer)
        layer.to("meta")
        self.materialized.discard(i)
        return_freed_memory()

    def _save(self, i: int, layer: nn.Module) -> None:
        state = {k: v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
        path = self.layer_file(i)
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file(state, str(tmp))
        except Exception as err:  # safetensors reports I/O failures as SafetensorError "... (os error 28)"
            code = re.search(r"os error (\d+)", str(err))
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) or (
                    code and int(code.group(1)) in (errno.ENOSPC, errno.EDQUOT)):
                raise ResourceError(f"disk full while offloading decoder layer {i} to {self.folder}; free space "
                                    "or choose another --offload-dir") from err
            raise
        os.replace(tmp, path)

    def release_all(self) -> None:
        """Return every materialized layer to meta without saving (after a failure, or at the end)."""
        for i in sorted(self.materialized):
            self.release(i, dirty=False)

    def state_dict_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`model.state_dict().items()` in the same order, with each decoder layer's live tensors: a layer is
        materialized when its first tensor is reached and released (unchanged) after its last."""
        current: int | None = None
        live: dict[str, torch.Tensor] = {}
        try:
            for key, tensor in self.model.state_dict().items():
                i = self.layer_index(key)
                if i is None:
                    yield key, tensor
                    continue
                if i != current:
                    if current is not None:
                        self.release(current, dirty=False)
                    current, live = i, self.materialize(i).state_dict()
                yield key, live[key[len(self.prefix(i)):]]
        finally:
            live = {}
            if current is not None:
                self.release(current, dirty=False)


def offload_workdir(offload_dir: Path, out: Path, rank: int = 0) -> Path:
    """The run's own subfolder of DIR (runs writing different --out folders can share one DIR); in a distributed run
    each rank other than 0 has its own (`-rank<r>`), so ranks on one machine sharing DIR never touch each other's."""
    digest = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:12]
    return Path(offload_dir).expanduser().resolve() / (f"qwenquant-offload-{Path(out).name}-{digest}"
                                                       + (f"-rank{rank}" if rank else ""))


def check_offload_dir(offload_dir: Path, out: Path, model_path: Path | None = None) -> None:
    """Refuse a DIR that is a file, is not writable, or overlaps --out (replaced at the end) or the source model."""
    d = Path(offload_dir).expanduser().resolve()
    if d.exists() and not d.is_dir():
        raise BadInputError(f"--offload-dir {offload_dir}: is a file; choose a folder path")
    existing = d
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise BadInputError(f"--offload-dir {offload_dir}: {existing} is not writable; choose another folder")
    o = Path(out).resolve()
    if d == o or o in d.parents:
        raise BadInputError(f"--offload-dir {offload_dir} is inside --out {out}, which is replaced at the end; "
                            "choose a folder outside it")
    if model_path is not None:
        m = Path(model_path).resolve()
        if d == m or m in d.parents:
            raise BadInputError(f"--offload-dir {offload_dir} is inside the source model folder {model_path}; "
                                "choose another folder")


@contextmanager
def offload_session(offload_dir: Path, out: Path, rank: int = 0, remove_dir: bool | None = None) -> Iterator[Path]:
    """Create the run's work dir (this rank's: `offload_workdir`; and DIR if missing), yield it, and always remove
    it, and DIR too when `remove_dir` (None: when it was missing before) and it is empty. A distributed run decides
    `remove_dir` once for all ranks (rank 0 removes DIR, at the end: the others finish first). A work dir left by a
    killed run of the same --out is replaced."""
    d = Path(offload_dir).expanduser().resolve()
    created = not d.exists() if remove_dir is None else remove_dir
    work = offload_workdir(d, out, rank)
    try:
        work.parent.mkdir(parents=True, exist_ok=True)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
    except OSError as err:
        raise BadInputError(f"--offload-dir {offload_dir}: cannot create {work} ({err.strerror})") from err
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created:
            try:
                d.rmdir()  # only when empty
            except OSError:
                pass


def _rebuild_init_buffers(model: nn.Module, adapter: ArchAdapter) -> None:
    """Buffers computed at init (rotary inv_freq) are meta in the skeleton: compute them again on CPU."""
    layers_head = adapter.layers_path + "."
    missing = [n for n, b in model.named_buffers() if b.is_meta and not n.startswith(layers_head)]
    if not missing:
        return
    rotary = model.get_submodule(adapter.rotary)
    fresh = type(rotary)(config=rotary.config)  # computes its buffers in __init__, on the default (CPU) device
    for name, buf in fresh.named_buffers(recurse=False):
        rotary._buffers[name] = buf
    left = [n for n, b in model.named_buffers() if b.is_meta and not n.startswith(layers_head)]
    if left:  # a module qwenquant does not know how to initialise: a bug to report, not a user error
        raise RuntimeError(f"--offload-dir: cannot initialise buffer {left[0]} outside the decoder layers")


def load_offloaded(resolved, dtype: str, folder: Path):
    """(model, tokenizer, LayerStore): the skeleton on meta with the resident tensors on CPU (see the module doc).

    Produces the same model object `load_model` does (config, generation config, dtypes, tied embeddings, MoE
    experts split) except that decoder layers stay on meta until `LayerStore.materialize`."""
    adapter: ArchAdapter = resolved.adapter
    model = meta_skeleton(resolved, dtype)

    index: dict[str, Path] = {}
    for f in resolved.weight_files:
        with safe_open(str(f), framework="pt") as sf:
            index.update({k: f for k in sf.keys()})
    store = LayerStore(model, adapter, Path(folder), index, resolved.reference)

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    resident: dict[str, torch.Tensor] = {}
    targets = model.state_dict(keep_vars=True)
    for key, target in targets.items():
        if store.layer_index(key) is not None:
            continue
        if key not in index:
            if tied and key == f"{adapter.lm_head}.weight":
                continue  # tied to the embeddings, re-tied below
            raise BadInputError(f"--model {resolved.reference}: tensor {key} is not in the checkpoint; "
                                "run without --offload-dir")
        with safe_open(str(index[key]), framework="pt") as sf:
            t = sf.get_tensor(key)
        resident[key] = t.to(target.dtype) if t.dtype != target.dtype and t.is_floating_point() else t
    model.load_state_dict(resident, strict=False, assign=True)
    if tied:
        model.tie_weights()
    _rebuild_init_buffers(model, adapter)
    for name, param in model.named_parameters():
        if not param.is_meta and not all_finite(param):
            raise BadInputError(f"--model {resolved.reference}: weight {name} contains NaN or Inf; the checkpoint is "
                                "broken, re-download or re-export it")
    layers_head = adapter.layers_path + "."
    loose = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(layers_head)]
    if loose:
        raise BadInputError(f"--model {resolved.reference}: tensor {loose[0]} was not loaded; run without --offload-dir")

    model.generation_config = load_generation_config(resolved.path)
    return model, load_tokenizer(resolved), store
