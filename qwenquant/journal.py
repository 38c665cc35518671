"""The run journal: each finished decoder layer's results on disk, in the run's temporary output folder.

Two jobs, one mechanism:
- bounded memory: a layer's quantized records (codes and scales, needed only by the exporter) leave host memory
  as soon as the layer is done; `JournalRecords` loads them back one layer file at a time while the checkpoint is
  written, so the exporter never holds more than one layer's records;
- resumable runs: after each layer the journal also keeps that layer's other final parameters (norms folded by
  smoothing or tuned by compensation, Linears kept in bf16), its activation specs and report, and the activations
  entering the next layer. `qwenquant ... --resume` restores layers 0..k-1 from it and continues at layer k; the
  checkpoint is identical to an uninterrupted run's because every layer sees exactly the inputs it would have seen.

Layout (`<tmp out>/_journal/`): `journal.json` (fingerprint of the run, world size, layers done, stage seconds),
`layer-00003.*` (records + params + specs + report of layer 3), `inputs-00003.*` (the inputs of layer 4, and
its inputs in the unquantized model when compensation fits to those), `source_eval.*` (the source model's
evaluation, measured once).

A distributed run (qwenquant/distributed.py) journals the same files, but each rank propagates only its shard of
the calibration samples, so each rank writes its own `inputs-00003-rank1of2.*`; rank 0 alone writes the rest, and
counts layer 3 as done in journal.json only after a barrier that every rank passes once its shard is on disk. A
rank keeps its last two shards (the one journal.json may still point to, and the newest). A resume needs the same
number of ranks: each rank restores the finished layers from rank 0's files and its own shard of the activations. Every file but journal.json is a `qwenquant.safe_store` save: safetensors + JSON +
sha256, no pickle, so a journal someone else wrote cannot run code in the resuming process, and one that fails its
hashes is refused with a one-line error. Files are written to a temporary name and renamed, and `journal.json`
last, so a run killed at any instant leaves a consistent journal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
from collections.abc import MutableMapping
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from qwenquant import safe_store
from qwenquant.distributed import World
from qwenquant.errors import BadInputError
from qwenquant.eval.perplexity import PerplexityResult
from qwenquant.quant.records import QuantizedWeight
from qwenquant.state import ActivationSpec

JOURNAL_DIR = "_journal"
JOURNAL_VERSION = 2  # 2: safe_store files (1: torch.save pickles, refused)


def run_fingerprint(recipe_yaml: str, weight_files: list[Path], extra: dict | None = None) -> str:
    """What must not change between an interrupted run and its resumption: the recipe and the source weights
    (names, sizes and modification times: hashing a large model's files would cost minutes)."""
    h = hashlib.sha256(recipe_yaml.encode())
    for f in sorted(Path(p) for p in weight_files):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(extra or {}, sort_keys=True).encode())
    return h.hexdigest()


def _load(path: Path, types: tuple[type, ...] = ()):
    """A journal file read back through safe_store (no pickle), its hashes checked; None if it was never finished."""
    try:
        return safe_store.load(path, types)
    except safe_store.TamperedFile as err:
        raise BadInputError(f"the interrupted run's journal failed its integrity check ({err}); run without --resume "
                            "to start over") from err


def _record_to_dict(r: QuantizedWeight) -> dict:
    return dataclasses.asdict(r)


def _record_from_dict(d: dict) -> QuantizedWeight:
    return QuantizedWeight(**d)


def read_journal(out_tmp: Path) -> dict | None:
    """`journal.json` of a run's temporary output folder, or None when it holds no journal."""
    path = Path(out_tmp) / JOURNAL_DIR / "journal.json"
    return json.loads(path.read_text()) if path.is_file() else None


def inputs_name(i: int, world: World) -> str:
    """The journal file holding layer i's outputs (the inputs of layer i + 1): this rank's shard of them when the
    run has several ranks."""
    return f"inputs-{i:05d}-rank{world.rank}of{world.size}" if world.distributed else f"inputs-{i:05d}"


def _ranks(n: int) -> str:
    return "1 process" if n == 1 else f"{n} ranks"


def layers_done_in(out_tmp: Path, fingerprint: str | None, world_size: int = 1) -> int:
    """Decoder layers an earlier (interrupted) run of the same recipe on the same weights, with as many ranks,
    finished in `out_tmp`; a journal of another recipe, model or world size is refused (and left as it is).
    `fingerprint` None: not compared (the other ranks of a distributed run, whose source files may carry other
    modification times; rank 0 compares it, and check_ranks made sure all ranks run the same recipe on the same
    files)."""
    meta = read_journal(out_tmp)
    if meta is None:
        return 0
    journaled = int(meta.get("world_size", 1))
    if journaled != world_size:
        how = "in one process, without --nproc or torchrun" if journaled == 1 else \
            f"with --nproc {journaled} (or torchrun with {journaled} processes in all)"
        raise BadInputError(f"{out_tmp} holds an interrupted run of {_ranks(journaled)} but this run has "
                            f"{_ranks(world_size)}; resume it {how}, or run without --resume to start over")
    if meta.get("version") != JOURNAL_VERSION or (fingerprint is not None and meta.get("fingerprint") != fingerprint):
        raise BadInputError(f"{out_tmp} holds an interrupted run of a different recipe or model; "
                            "run without --resume to start over")
    return int(meta["layers_done"])


class JournalRecords(MutableMapping):
    """`QuantState.records` backed by the journal: records of finished layers live in their layer file and are
    loaded on access (one layer file cached), records of the layer in progress live in memory."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._memory: dict[str, QuantizedWeight] = {}
        self._on_disk: dict[str, Path] = {}  # insertion order = quantization order
        self._order: list[str] = []
        self._cached: tuple[Path | None, dict] = (None, {})

    def __getitem__(self, name: str) -> QuantizedWeight:
        if name in self._memory:
            return self._memory[name]
        path = self._on_disk[name]
        if self._cached[0] != path:
            # every layer file here was written by this process or checked when `restore` read it: no second hash pass
            self._cached = (path, safe_store.load(path, check=False)["records"])
        return _record_from_dict(self._cached[1][name])

    def __setitem__(self, name: str, record: QuantizedWeight) -> None:
        self._on_disk.pop(name, None)
        if name not in self._order:
            self._order.append(name)
        self._memory[name] = record

    def __contains__(self, name: object) -> bool:  # without loading a layer file (Mapping's would)
        return name in self._memory or name in self._on_disk

    def __delitem__(self, name: str) -> None:
        self._memory.pop(name, None)
        self._on_disk.pop(name, None)
        self._order.remove(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)

    def take_layer(self, prefix: str) -> dict[str, dict]:
        """The in-memory records whose names start with `prefix`, as plain dicts (for the layer file)."""
        return {n: _record_to_dict(r) for n, r in self._memory.items() if n.startswith(prefix)}

    def mark_on_disk(self, names, path: Path) -> None:
        """These records are now in `path`: drop them from memory."""
        for n in names:
            self._memory.pop(n, None)
            self._on_disk[n] = path
            if n not in self._order:
                self._order.append(n)


class Journal:
    """The `_journal/` folder of one run (see the module doc)."""

    def __init__(self, out_tmp: Path, fingerprint: str, world: World | None = None):
        self.folder = Path(out_tmp) / JOURNAL_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.world = world or World()
        self.records = JournalRecords(self.folder)

    # -- bookkeeping ----------------------------------------------------------------------------------------------

    def _meta_path(self) -> Path:
        return self.folder / "journal.json"

    def read_meta(self) -> dict | None:
        return read_journal(self.folder.parent)

    def layers_done(self) -> int:
        """Decoder layers finished by an earlier (interrupted) run of the same recipe on the same weights."""
        return layers_done_in(self.folder.parent, self.fingerprint, self.world.size)

    def _write_meta(self, layers_done: int, stage_seconds: dict, inputs: bool) -> None:
        tmp = self._meta_path().with_name("journal.json.tmp")
        tmp.write_text(json.dumps({"version": JOURNAL_VERSION, "fingerprint": self.fingerprint,
                                   "world_size": self.world.size, "layers_done": layers_done,
                                   "stage_seconds": stage_seconds, "inputs": inputs}))
        os.replace(tmp, self._meta_path())

    # -- source evaluation ----------------------------------------------------------------------------------------

    def save_source_eval(self, result: dict) -> None:
        """Keep the source model's evaluation; a journal without journal.json yet gets one (0 layers done), so that
        a --resume after an interruption before the first layer finished compares the recipe and model fingerprint
        before reusing this evaluation."""
        safe_store.save(result, self.folder / "source_eval", (PerplexityResult,))
        if self.read_meta() is None:
            self._write_meta(0, {}, inputs=False)

    def load_source_eval(self) -> dict | None:
        return _load(self.folder / "source_eval", (PerplexityResult,))

    # -- layers ---------------------------------------------------------------------------------------------------

    def layer_path(self, i: int) -> Path:
        return self.folder / f"layer-{i:05d}"

    def inputs_path(self, i: int) -> Path:
        """The inputs of layer i + 1 (layer i's outputs; in a distributed run this rank's shard of them), kept per
        layer so that a run killed between writing them and counting layer i as done still finds layer i's own."""
        return self.folder / inputs_name(i, self.world)

    def save_layer(self, i: int, prefix: str, layer: nn.Module, state, next_inputs, float_inputs=None) -> None:
        """Persist layer i (records, other parameters, activation specs, report) and the next layer's inputs,
        then drop the layer's records from memory. In a distributed run every rank writes its shard of the inputs
        and rank 0 the rest; layer i counts as done (journal.json) once every rank's shard is on disk."""
        main = self.world.main
        records = self.records.take_layer(prefix) if main else {}
        if main:
            self._save_layer_file(i, prefix, layer, state, records)
        if next_inputs is not None:
            safe_store.save({"hidden": next_inputs.hidden, "kwargs": next_inputs.kwargs,
                             "float_hidden": float_inputs.hidden if float_inputs is not None else None},
                            self.inputs_path(i))
        self._fault_injection(i, barrier=True)
        self.world.barrier(f"journaling decoder layer {i}")  # every rank's shard of layer i is on disk
        if main:
            self._write_meta(i + 1, state.stage_seconds, inputs=next_inputs is not None)
            self.records.mark_on_disk(list(records), self.layer_path(i))
        # the inputs journal.json can no longer point to: layer i's own (one process), layer i - 1's (ranks: the
        # barrier above says journal.json counts at least layer i - 1 as done, perhaps not yet layer i)
        stale = i - 2 if self.world.distributed else i - 1
        if stale >= 0:
            safe_store.remove(self.inputs_path(stale))
        self._fault_injection(i, barrier=False)

    def _save_layer_file(self, i: int, prefix: str, layer: nn.Module, state, records: dict) -> None:
        """layer-0000i: the layer's records, its other final parameters, activation specs, searched choices, report."""
        # a recorded Linear's live weight is its record dequantized, so only the record is kept; verified here,
        # since resuming rebuilds the weight that way (anything else stays in `params`)
        recorded = {n[len(prefix):] + ".weight" for n, d in records.items()
                    if torch.equal(layer.get_submodule(n[len(prefix):]).weight.detach().cpu(),
                                   _record_from_dict(d).dequantize(layer.get_submodule(n[len(prefix):]).weight.dtype))}
        params = {k: v.detach().to("cpu").clone() for k, v in layer.state_dict().items() if k not in recorded}
        specs = {n: dataclasses.asdict(s) for n, s in state.activations.items() if n.startswith(prefix)}
        searched = {kind: {n: v for n, v in choices.items()  # keyed by Linear name or by layer index
                           if (n.startswith(prefix) if isinstance(n, str) else n == i)}
                    for kind, choices in state.searched.items()}
        kv_scales = {n: list(s) for n, s in state.kv_scales.items() if n.startswith(prefix)}  # --kv-cache fp8
        safe_store.save({"records": records, "params": params, "activations": specs, "searched": searched,
                         "report": state.layer_reports[-1] if state.layer_reports else None, "kv_scales": kv_scales},
                        self.layer_path(i))

    def _fault_injection(self, i: int, barrier: bool) -> None:
        """For the resume tests, QWENQUANT_FAULT_KILL_AFTER_LAYER: `i` SIGKILLs the process (every rank) once layer i
        is journaled; `i@r` SIGKILLs rank r of a distributed run mid-way through journaling layer i (its shard
        written, before the barrier), so that layer i is never counted as done."""
        layer, _, rank = os.environ.get("QWENQUANT_FAULT_KILL_AFTER_LAYER", "").partition("@")
        if layer == str(i) and (rank == str(self.world.rank) if barrier else rank == ""):
            os.kill(os.getpid(), signal.SIGKILL)

    def restore(self, layers: nn.ModuleList, layers_path: str, state, n_done: int, layer_store=None):
        """Put layers 0..n_done-1 back as the interrupted run left them; return the inputs of layer n_done
        as (hidden, kwargs, float-path hidden or None) lists, or None when the run captured none.
        With a `layer_store` (--offload-dir) each layer is materialized, restored and written back in turn."""
        for i in range(n_done):
            prefix = f"{layers_path}.{i}."
            saved = _load(self.layer_path(i))
            if saved is None:
                raise BadInputError(f"the interrupted run's journal has no {self.layer_path(i).name}; run without "
                                    "--resume to start over")
            layer = layers[i] if layer_store is None else layer_store.materialize(i)
            own = dict(layer.named_parameters()) | dict(layer.named_buffers())
            for k, v in saved["params"].items():
                own[k].data = v.to(own[k].dtype)
            for name, d in saved["records"].items():
                linear = layer.get_submodule(name[len(prefix):])
                linear.weight.data = _record_from_dict(d).dequantize(linear.weight.dtype)
            self.records.mark_on_disk(list(saved["records"]), self.layer_path(i))
            state.activations.update({n: ActivationSpec(**s) for n, s in saved["activations"].items()})
            for kind, choices in saved["searched"].items():
                state.searched.setdefault(kind, {}).update(choices)
            state.kv_scales.update({n: tuple(s) for n, s in saved.get("kv_scales", {}).items()})
            if saved["report"] is not None:
                state.layer_reports.append(saved["report"])
            if layer_store is not None:
                layer_store.release(i, dirty=True)
        meta = self.read_meta() or {}
        for stage, seconds in meta.get("stage_seconds", {}).items():
            state.stage_seconds[stage] = seconds
        if not (n_done and meta.get("inputs")):  # no calibration inputs are propagated (RTN alone)
            return None
        saved = _load(self.inputs_path(n_done - 1))
        if saved is None:
            raise BadInputError(f"the interrupted run's journal did not keep {self.inputs_path(n_done - 1).name}; "
                                "run without --resume to start over")
        return saved["hidden"], saved["kwargs"], saved["float_hidden"]
