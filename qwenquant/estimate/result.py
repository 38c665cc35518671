"""The estimate of a run: sizes, memory phases and times put together (`build_estimate`), whether it fits the
memory and disk available now, and the notes that qualify it. `Estimate.to_dict()` is the --json document."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from qwenquant.errors import ResourceError
from qwenquant.estimate.facts import MODEL_DTYPE_BYTES, ModelFacts, RunShape
from qwenquant.estimate.memory import Phase, Traits, journal_bytes, memory_phases
from qwenquant.estimate.need import missing_costs
from qwenquant.estimate.size import OutputSize, output_size
from qwenquant.estimate.stream import stream_phases, stream_time_estimate
from qwenquant.estimate.time import dominant_stage, repeated_stage_seconds, streaming_time, time_estimate
from qwenquant.stages.registry import STAGES

GiB = 2**30


@dataclass
class Estimate:
    """Everything --dry-run prints (`to_dict` is the --json document)."""

    model: dict
    recipe: dict
    run: dict
    sizes: dict
    memory: dict
    disk: dict
    timings_s: dict
    fits: dict
    reasons: list[str]
    notes: list[str]
    probe: dict
    dominant_stage: dict  # the longest part of the run (time.dominant_stage)
    streaming: dict | None = None  # the data-free streaming path's reads and writes (time.streaming_time), or None
    ranks: dict | None = None  # a distributed run's per-rank time and memory (estimate/ranks.py), or None
    repeated_s: dict | None = None  # per stage, the seconds every rank repeats (time.repeated_stage_seconds)

    @property
    def ok(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return {"ok": self.ok, "dry_run": True} | asdict(self)

    def error_line(self) -> str:
        return "; ".join(self.reasons) + " (estimated by --dry-run; nothing was loaded or written)"


def fits_or_raise(est: Estimate) -> None:
    """Exit 5 with a one-line error when the run would not fit (the estimate is attached for --json)."""
    if not est.ok:
        err = ResourceError(est.error_line())
        err.details = est.to_dict()
        raise err


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f} GiB"


@dataclass(frozen=True)
class Available:
    """What the machine has now: host bytes and where that number comes from, free device bytes (CUDA only), free
    disk bytes and the folder they were measured at."""

    host: int | None
    host_source: str
    device: int | None
    disk: int
    disk_path: Path
    offload_disk: int | None = None  # --offload-dir: free bytes where the layer files go (None without it)
    offload_path: Path | None = None
    offload_same_disk: bool = False  # the offload folder is on the output's filesystem (one budget for both)


@dataclass(frozen=True)
class Peaks:
    """The phases' peaks: host RSS, what must fit (RSS less droppable page cache), device (CUDA only)."""

    host: Phase
    need: int
    device: Phase | None

    @classmethod
    def of(cls, phases: list[Phase], cuda: bool) -> Peaks:
        return cls(max(phases, key=lambda p: p.host_total), max(p.host_total - p.reclaimable for p in phases),
                   max(phases, key=lambda p: p.device_total) if cuda else None)


@dataclass(frozen=True)
class DiskNeed:
    """Bytes the run writes: the output folder with the run journal, and the --offload-dir layer files."""

    out: int
    journal: int
    offload: int

    def at_out(self, avail: Available) -> int:
        return self.out + self.journal + (self.offload if avail.offload_same_disk else 0)


def _disk_reasons(avail: Available, need: DiskNeed) -> list[str]:
    reasons = []
    if need.at_out(avail) > avail.disk:
        reasons.append(f"the output needs about {gib(need.at_out(avail))} on disk but {avail.disk_path} has "
                       f"{gib(avail.disk)} free")
    if avail.offload_disk is not None and not avail.offload_same_disk and need.offload > avail.offload_disk:
        reasons.append(f"--offload-dir needs about {gib(need.offload)} for the decoder layers but "
                       f"{avail.offload_path} has {gib(avail.offload_disk)} free")
    return reasons


def _reasons(peaks: Peaks, avail: Available, device, disk: DiskNeed) -> list[str]:
    """Why the run would not fit (empty: it fits)."""
    reasons = []
    if avail.host is not None and peaks.need > avail.host:
        big = max(peaks.host.host.items(), key=lambda kv: kv[1])
        reasons.append(f"estimated peak host memory {gib(peaks.need)} (during {peaks.host.name}; largest part: {big[0]} "
                       f"{gib(big[1])}) exceeds the {gib(avail.host)} available ({avail.host_source})")
    if peaks.device is not None and avail.device is not None and peaks.device.device_total > avail.device:
        reasons.append(f"estimated peak device memory {gib(peaks.device.device_total)} (during {peaks.device.name}) "
                       f"exceeds the {gib(avail.device)} free on {device}")
    return reasons + _disk_reasons(avail, disk)


def _notes(recipe, facts: ModelFacts, shape: RunShape, out: OutputSize, probe, peak: Phase,
           stage_notes: list[str]) -> list[str]:
    """What qualifies the estimate: guesses it had to make, parts it leaves out, how the probe ran."""
    notes = facts.notes + [n for n in (out.note, shape.text_note) if n] + stage_notes + missing_costs(recipe)
    if probe.load_avg is not None and probe.cpus and probe.load_avg > probe.cpus:
        notes.append(f"the machine was busy during the probe (load average {probe.load_avg:.1f} on {probe.cpus} CPUs): "
                     "the times scale with how busy it is while the run goes on")
    if probe.scaled_from:
        notes.append(f"the probe ran a narrower layer (hidden {probe.scaled_from.get('probe_hidden')}) and scaled "
                     f"by FLOPs x{probe.scaled_from.get('flop_ratio', 1):.1f}")
    if recipe.eval.tasks:
        notes.append("zero-shot task evaluation (--tasks) is not in the time estimate")
    if peak.name in ("report", "verify (KL)") and peak.host.get("KL statistics", 0) > peak.host_total / 3:
        notes.append(f"the host peak is the KL statistics over {shape.kl_tokens} tokens x {facts.vocab} vocabulary "
                     "(float32); a recipe with a smaller eval.kl_tokens lowers it")
    return notes


def scheme(recipe) -> str:
    """The quantizer and its settings as the quantizer labels them (`gptq w4 g128 sym`)."""
    spec = STAGES[recipe.quantizer]
    return f"{recipe.quantizer} {spec.label(recipe.quantizer_config)}" if spec.label else recipe.quantizer


def _memory(phases: list[Phase], peaks: Peaks, avail: Available, device) -> dict:
    dev = peaks.device
    return {"peak_host_bytes": peaks.host.host_total, "peak_host_phase": peaks.host.name,
            "peak_host_breakdown": peaks.host.host, "reclaimable_at_peak_bytes": peaks.host.reclaimable,
            "needed_host_bytes": peaks.need, "host_phases": {p.name: p.host_total for p in phases},
            "available_host_bytes": avail.host, "available_host_source": avail.host_source,
            "peak_device_bytes": dev.device_total if dev else None, "peak_device_phase": dev.name if dev else None,
            "peak_device_breakdown": dev.device if dev else None, "available_device_bytes": avail.device,
            "device": str(device)}


def _sizes(facts: ModelFacts, out: OutputSize) -> dict:
    return {"output_bytes": out.safetensors_bytes, "folder_bytes": out.folder_bytes,
            "quantized_tensor_bytes": out.quantized_bytes, "other_tensor_bytes": out.other_bytes,
            "header_bytes": out.header_bytes, "tensors": out.tensors, "files": out.files,
            "quantized_linears": out.quantized_linears, "kept_linears": out.kept_linears,
            "source_bytes": facts.source_bytes,
            "ratio": out.safetensors_bytes / facts.source_bytes if facts.source_bytes else None}


def _disk_need(recipe, facts: ModelFacts, shape: RunShape, out: OutputSize, traits: Traits) -> DiskNeed:
    offload = (facts.params - facts.resident_params) * MODEL_DTYPE_BYTES[recipe.model.dtype] if traits.offload else 0
    return DiskNeed(out.folder_bytes, journal_bytes(recipe, facts, shape, traits), offload)


def _disk(need: DiskNeed, avail: Available) -> dict:
    return {"need_bytes": need.at_out(avail), "journal_bytes": need.journal, "free_bytes": avail.disk,
            "path": str(avail.disk_path), "offload_bytes": need.offload if avail.offload_path else None,
            "offload_free_bytes": avail.offload_disk, "offload_same_disk": avail.offload_same_disk,
            "offload_path": str(avail.offload_path) if avail.offload_path else None}


def build_estimate(recipe, facts: ModelFacts, shape: RunShape, probe, device, base_rss: int, avail: Available,
                   traits: Traits) -> Estimate:
    """Combine sizes, memory phases and times into an Estimate and decide whether the run fits."""
    cuda = getattr(device, "type", "cpu") == "cuda"
    out = output_size(recipe, facts)
    if traits.stream:
        phases = stream_phases(recipe, facts, shape, base_rss, cuda, MODEL_DTYPE_BYTES[recipe.model.dtype])
        timings, stage_notes = stream_time_estimate(recipe, facts, shape, out, probe)
    else:
        phases = memory_phases(recipe, facts, shape, out, base_rss, traits, cuda)
        timings, stage_notes = time_estimate(recipe, facts, shape, out, probe, traits)
    peaks = Peaks.of(phases, cuda)
    disk = _disk_need(recipe, facts, shape, out, traits)
    dev_fits = None
    if peaks.device is not None and avail.device is not None:
        dev_fits = peaks.device.device_total <= avail.device
    return Estimate(
        model={"reference": facts.reference, "path": facts.path, "architecture": facts.architecture,
               "num_layers": facts.num_layers, "parameters": facts.params, "source_bytes": facts.source_bytes,
               "dtype": recipe.model.dtype, "tied_embeddings": facts.tied, "vocab_size": facts.vocab,
               "sizes_from": facts.sizes_from},
        recipe={"stages": [type(s).__name__ for s in recipe.stages], "scheme": scheme(recipe),
                "format": recipe.export.format, "device": str(device)},
        run={"calibration_tokens": shape.calib_tokens, "seq_len": shape.seq_len, "eval_window": shape.window,
             "ppl_windows": shape.ppl_windows, "kl_tokens": shape.kl_tokens, "eval_text_tokens": shape.text_tokens,
             "verify": recipe.eval.verify, "records_in_journal": traits.journal, "offload": traits.offload,
             "streamed": traits.stream},
        sizes=_sizes(facts, out),
        memory=_memory(phases, peaks, avail, device),
        disk=_disk(disk, avail),
        timings_s=timings,
        fits={"host": avail.host is None or peaks.need <= avail.host, "device": dev_fits,
              "disk": not _disk_reasons(avail, disk)},
        reasons=_reasons(peaks, avail, device, disk),
        notes=_notes(recipe, facts, shape, out, probe, peaks.host, stage_notes),
        probe=probe.to_dict(),
        dominant_stage=dominant_stage(timings),
        streaming=streaming_time(facts, out) if traits.stream else None,
        repeated_s=None if traits.stream else repeated_stage_seconds(recipe, facts, shape, probe),
    )
