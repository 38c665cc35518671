"""Run the bench grid on one checkpoint folder and assemble the result document (schema in `bench.output`).

Points run smallest first (batch ascending, then context ascending). A point that runs out of memory is recorded
with its error, and every point at least as large in both batch and context is recorded as skipped; smaller
points still run.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenquant.bench import bandwidth as bw
from qwenquant.bench.document import build_document
from qwenquant.bench.memory import MemoryProbe, decode_read_bytes, tensor_bytes
from qwenquant.bench.output import summary, write_bench
from qwenquant.bench.timing import PointSettings, measure_point, warmup_steps
from qwenquant.errors import BadInputError, ResourceError
from qwenquant.kernels.kv_cache import kv_bytes_per_token
from qwenquant.kernels.loader import load_inference_model

OOM_ERRORS = (torch.cuda.OutOfMemoryError, MemoryError)


@dataclass
class BenchSettings:
    """What one bench run measures (the CLI flags); bad values are one-line BadInputErrors."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    contexts: list[int] = field(default_factory=lambda: [1024, 8192, 32768])
    decode_tokens: int = 64
    kv_cache: str = "bf16"
    compile: bool = True
    memory_budget_gib: float | None = None
    bandwidth_bytes: int | None = None  # copy-bandwidth buffer; default 1 GiB on CUDA, 64 MiB on CPU
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise BadInputError("--batch-sizes: give positive integers, e.g. 1,8,32")
        if not self.contexts or min(self.contexts) < 1:
            raise BadInputError("--context: give positive integers, e.g. 1024,8192")
        if self.decode_tokens < 1:
            raise BadInputError("--decode-tokens: must be at least 1")
        if self.kv_cache not in ("bf16", "fp8"):
            raise BadInputError(f"--kv-cache {self.kv_cache}: use bf16 or fp8")
        if self.memory_budget_gib is not None and self.memory_budget_gib <= 0:
            raise BadInputError("--memory-budget: must be a positive number of GiB")
        self.batch_sizes, self.contexts = sorted(set(self.batch_sizes)), sorted(set(self.contexts))


def contexts_too_long(settings: BenchSettings, max_positions: int | None, device: torch.device) -> tuple[list[int], str]:
    """The contexts the model cannot attend over (prompt + generated tokens > max_position_embeddings) and why.
    Refused (BadInputError) when no context fits; otherwise those points are recorded as `too_long` and the others
    run (the default grid, 1024,8192,32768, on a model with 4096 positions runs 1024)."""
    if not max_positions:
        return [], ""
    extra = settings.decode_tokens + warmup_steps(device, settings.compile)
    too_long = [c for c in settings.contexts if c + extra > max_positions]
    why = (f"the model supports {max_positions} positions (max_position_embeddings) and each point also generates "
           f"{extra} tokens; use contexts <= {max_positions - extra}")
    if too_long and len(too_long) == len(settings.contexts):
        raise BadInputError(f"--context {','.join(map(str, too_long))}: {why}")
    return too_long, why


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, OOM_ERRORS):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _point_record(batch: int, context: int, measured: dict, memory: dict, bytes_step: int, bandwidth: float) -> dict:
    """One ok point: its timings, memory split, bytes per decode step and the bandwidth bound."""
    bound = bw.bound_tokens_per_s(bytes_step, bandwidth, batch)
    rec = {"batch": batch, "context": context, "status": "ok",
           **{k: v for k, v in measured.items() if k not in ("generated", "kv_cache_bytes")},
           "memory": memory, "bytes_per_decode_step": bytes_step, "bound_tokens_per_s": bound}
    rate = measured.get("decode_tokens_per_s")
    rec["fraction_of_bound"] = None if rate is None else rate / bound
    return rec


def run_point(loaded, settings: BenchSettings, batch: int, context: int, device: torch.device, probe: MemoryProbe,
              weights: tuple[int, int], weight_read: int, kv_per_token: int, bandwidth: float) -> dict:
    """Measure one point and split its memory into weights, KV cache and workspace (CUDA: peak allocated minus
    the weights measured at load minus the cache tensors). `weights` = (exact tensor bytes, measured at load)."""
    probe.settle()
    probe.reset_peak()
    before = probe.current()
    point = PointSettings(batch, context, settings.decode_tokens, warmup_steps(device, settings.compile),
                          settings.kv_cache, settings.compile, settings.seed)
    measured = measure_point(loaded.model, point, device, loaded.kv_scales)
    kv = measured["kv_cache_bytes"]
    peak = probe.peak()
    exact, measured_load = weights
    memory = {"kind": probe.kind, "weights_bytes": exact, "weights_measured_bytes": measured_load, "kv_cache_bytes": kv}
    if peak is not None:
        memory.update(peak_bytes=peak, workspace_bytes=max(peak - measured_load - kv, 0),
                      peak_reserved_bytes=probe.reserved_peak())
    else:
        memory.update(peak_bytes=None, workspace_bytes=None, rss_delta_bytes=probe.current() - before,
                      note="host RSS: no per-point peak is available on CPU; rss_delta is after the point")
    step = bw.bytes_per_decode_step(weight_read, kv_per_token, batch, context)
    rec = _point_record(batch, context, measured, memory, step, bandwidth)
    rec["_generated"] = measured["generated"]
    return rec


def run_grid(loaded, settings: BenchSettings, device: torch.device, probe: MemoryProbe, weights: tuple[int, int],
             kv_per_token: int, bandwidth: float, advance=lambda: None, too_long=(), why: str = "") -> list[dict]:
    """Every (batch, context) point, smallest first; OOM records the point and skips the ones that contain it;
    contexts longer than the model attends over (`too_long`, reason `why`) are recorded, not run."""
    points, failed = [], []
    for batch in settings.batch_sizes:
        for context in settings.contexts:
            if context in too_long:
                points.append({"batch": batch, "context": context, "status": "too_long", "error": why})
                advance()
                continue
            if any(batch >= b and context >= c for b, c in failed):
                points.append({"batch": batch, "context": context, "status": "skipped",
                               "error": "skipped: at least as large as a point that ran out of memory"})
                advance()
                continue
            try:
                rec = run_point(loaded, settings, batch, context, device, probe, weights,
                                decode_read_bytes(loaded.model, batch), kv_per_token, bandwidth)
            except Exception as err:  # noqa: BLE001 - OOM is recorded; anything else propagates
                if not _is_oom(err):
                    raise
                failed.append((batch, context))
                first = str(err).splitlines()[0][:300] if str(err) else "out of memory"
                rec = {"batch": batch, "context": context, "status": "oom", "error": f"{type(err).__name__}: {first}"}
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            points.append(rec)
            advance()
    return points


def warm_up(loaded, settings: BenchSettings, device: torch.device) -> None:
    """One small untimed eager prefill + decode, so the first point does not pay for library and kernel setup."""
    tiny = PointSettings(1, min(16, min(settings.contexts)), 1, 1, settings.kv_cache, False, settings.seed)
    measure_point(loaded.model, tiny, device, loaded.kv_scales)


def run_bench(folder: Path, settings: BenchSettings, device: torch.device, reporter=None, command: str = "") -> dict:
    """Load `folder` with kernel modules, run the grid, and return the result document (bench.output schema)."""
    started = time.time()
    raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    too_long, why = contexts_too_long(settings, (raw.get("text_config") or raw).get("max_position_embeddings"), device)
    if too_long and reporter is not None:
        reporter.log(f"warning: --context {','.join(map(str, too_long))} not run: {why}")
    probe = MemoryProbe(device)
    probe.settle()
    before_load = probe.current()
    t0 = time.perf_counter()
    try:
        loaded = load_inference_model(folder, device)
    except Exception as err:  # noqa: BLE001 - only out-of-memory is turned into a user-facing error
        if not _is_oom(err):
            raise
        raise ResourceError(f"out of memory loading {folder} on {device}: the weights alone do not fit") from err
    load_s = time.perf_counter() - t0
    probe.settle()
    weights_measured = probe.current() - before_load
    kv_per_token = kv_bytes_per_token(loaded.model.config.get_text_config(), settings.kv_cache)
    weight_exact = tensor_bytes(loaded.model)
    bw_bytes = settings.bandwidth_bytes or (1 << 30 if device.type == "cuda" else 64 << 20)
    bandwidth = bw.copy_bandwidth(device, bw_bytes)
    warm_up(loaded, settings, device)
    total = len(settings.batch_sizes) * len(settings.contexts)
    if reporter is not None:
        with reporter.step(f"bench {Path(folder).name}", total) as advance:
            points = run_grid(loaded, settings, device, probe, (weight_exact, weights_measured), kv_per_token,
                              bandwidth["bytes_per_s"], advance, too_long, why)
    else:
        points = run_grid(loaded, settings, device, probe, (weight_exact, weights_measured), kv_per_token,
                          bandwidth["bytes_per_s"], too_long=too_long, why=why)
    generated = {f"{p['batch']}x{p['context']}": p.pop("_generated") for p in points if "_generated" in p}
    result = build_document(loaded, settings, device, points, bandwidth, (weight_exact, weights_measured, probe.kind),
                            load_s, command, started)
    result["_generated"] = generated
    del loaded
    probe.settle()
    return result


def quick_bench(folder: Path, out: Path, device: torch.device, command: str = "") -> dict:
    """The one small fixed setting `qwenquant compare --bench` uses (batch 1, context 128 or less, 16 decode
    tokens); writes the bench folder `out` and returns `bench.output.summary` of it."""
    raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    max_positions = (raw.get("text_config") or raw).get("max_position_embeddings") or 2048
    settings = BenchSettings(batch_sizes=[1], contexts=[min(128, max_positions // 2)], decode_tokens=16)
    result = run_bench(Path(folder), settings, device, command=command)
    result.pop("_generated", None)
    write_bench(result, out)
    return summary(result)
