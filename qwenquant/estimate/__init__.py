"""Resource estimate of a run before any weight is loaded (`qwenquant fp8|gptq|awq|rtn|run ... --dry-run`).

From config.json, the safetensors headers (shapes and dtypes only), the resolved recipe and a few-second speed
probe of this machine it predicts, per phase of a run:
- peak host memory (RSS) and peak device memory (CUDA only): `memory.py`,
- the size of the checkpoint's safetensors files (exact per format, from the tensor shapes): `size.py`,
- wall time per stage (the same names as the report's `timings_s`): `time.py`,
and whether the run fits the memory available now (host: /proc/meminfo MemAvailable, or the cgroup limit when
lower; device: torch.cuda.mem_get_info) and the free disk space at the output's parent folder (`available.py`).

The estimator knows no stage and no format: each stage declares its cost (`StageSpec.host_bytes`, `seconds`,
`record_bytes`, ...: qwenquant/stages/spec.py, asked with a `need.StageNeed`), each export format its tensor bytes
and how it is verified (`ExportFormat.tensor_bytes`, `reload_with`). A stage that declares no cost is named in the
estimate's notes. The speed probe is `probe.py`; what the model is, `facts.py`; the result and its verdict,
`result.py`; the tables, `render.py`. Accuracy against measured runs: benchmarks/dry_run_accuracy.py (results in
benchmarks/results/dry_run_accuracy.md).

Everything is a pure function of (facts, recipe, probe) except `model_facts` (reads headers), `eval_tokens` (reads
the evaluation text), the availability functions and `estimate_run`, which puts them together.

Before download: a folder holding only config.json is sized from the architecture (every tensor's shape from
qwenquant/model/qwen3.py `checkpoint_shapes`, its dtype from config.json), a hub id not in the local cache from its
config.json and the safetensors headers read from the hub; the estimate says so in its notes and in
`model.sizes_from`. Without a tokenizer the evaluation text's tokens are estimated from its length (a note too).
With --offload-dir the phases hold the resident tensors and one decoder layer instead of the model
(`memory._offload_phases`, `time._offload_io`); the layer files need disk at the offload folder. A data-free recipe
(qwenquant.stream.eligibility.streams) takes the streaming path unless --no-stream: no calibration, no model
(`stream.py`).
"""

from __future__ import annotations

from pathlib import Path

from qwenquant.device import resolve_device
from qwenquant.errors import BadInputError
from qwenquant.estimate import probe
from qwenquant.estimate.available import (
    available_device_bytes,
    available_host_bytes,
    current_rss_bytes,
    free_disk_bytes,
)
from qwenquant.estimate.facts import LinearInfo, ModelFacts, RunShape, TensorInfo, eval_tokens, model_facts, run_shape
from qwenquant.estimate.memory import Phase, Traits, memory_phases, record_bytes, run_traits
from qwenquant.estimate.render import print_estimate
from qwenquant.estimate.result import Available, Estimate, build_estimate, fits_or_raise
from qwenquant.estimate.size import OutputSize, linear_output_tensors, output_size
from qwenquant.estimate.time import time_estimate
from qwenquant.export.writer import check_output_dir
from qwenquant.model.loader import DTYPES, resolve_model
from qwenquant.model.offload import check_offload_dir
from qwenquant.preflight import check_layout, check_mixed_precision, check_not_source, check_offload, needs_calibration
from qwenquant.stream.eligibility import streaming_blockers, streams

__all__ = ["Available", "Estimate", "LinearInfo", "ModelFacts", "OutputSize", "Phase", "RunShape", "TensorInfo",
           "Traits", "available_device_bytes", "available_host_bytes", "build_estimate", "current_rss_bytes",
           "estimate_run", "eval_tokens", "fits_or_raise", "free_disk_bytes", "linear_output_tensors",
           "memory_phases", "model_facts", "output_size", "print_estimate", "record_bytes", "run_shape", "run_traits",
           "time_estimate"]

PROCESS_BASE_EXTRA = 200 * 2**20  # RSS a run has beyond this process's imports: tokenizer, eval text, allocator


def estimate_run(recipe, out: Path, overwrite: bool = False, offload_dir: Path | None = None,
                 stream: bool = True) -> Estimate:
    """The --dry-run of a run of `recipe` into `out` (`offload_dir`: --offload-dir; `stream`: False for
    --no-stream): the same checks before any work, then the estimate.

    Reads config.json, the safetensors headers and the tokenizer/evaluation text; writes nothing and downloads no
    weight: a folder without weights is sized from config.json alone, a hub id not in the local cache from its
    config.json and safetensors headers read from the hub (qwenquant/model/hub.py)."""
    out = Path(out)
    check_output_dir(out, overwrite)
    if offload_dir is not None:
        check_offload(recipe)
        local = Path(recipe.model.id).expanduser()
        check_offload_dir(offload_dir, out, local if local.is_dir() else None)
    device = resolve_device(recipe.device)
    resolved = resolve_model(recipe.model.id, recipe.model.revision, download=False)
    check_not_source(out, resolved.path)
    check_layout(recipe, resolved.config)
    check_mixed_precision(recipe, resolved.adapter, resolved.config)
    if recipe.eval.kl_tokens == 0 and not (stream and streams(recipe)):  # refused as qwenquant/runner/run.py does
        raise BadInputError("--kl-tokens 0 (no KL) applies to data-free streamed runs only; this run quantizes in "
                            f"memory ({'; '.join(streaming_blockers(recipe) or ['--no-stream'])}): drop --kl-tokens 0")
    facts = model_facts(resolved)
    if not facts.linears:
        raise BadInputError(f"--model {recipe.model.id}: no decoder Linear weights found in the safetensors headers")
    import compressed_tensors  # noqa: F401  (the run's imports, so the baseline RSS below includes them)
    import transformers.models.qwen3.modeling_qwen3  # noqa: F401

    base_rss = current_rss_bytes() + PROCESS_BASE_EXTRA
    text_tokens, note = eval_tokens(recipe.eval.eval_text, resolved.path, recipe.model.id)
    window = min(recipe.eval.window, facts.max_positions)
    if text_tokens < window and not note:  # counted exactly (a short text): the run would stop here
        raise BadInputError(f"evaluation text has {text_tokens} tokens, fewer than one window of {window}")
    shape = run_shape(recipe, facts, text_tokens, needs_calibration(recipe), note)
    rates = probe.run_probe(facts.config, recipe, device, DTYPES[recipe.model.dtype], shape.calib_tokens or 2048,
                            shape.window, shape.seq_len)
    traits = run_traits(recipe, offload=offload_dir is not None, stream=stream)
    est = build_estimate(recipe, facts, shape, rates, device, base_rss, _available(device, out, offload_dir), traits)
    if offload_dir is not None and traits.stream:
        est.notes.append("--offload-dir is not used: this data-free recipe streams tensor by tensor (--no-stream "
                         "quantizes it layer by layer with --offload-dir)")
    return est


def _available(device, out: Path, offload_dir: Path | None) -> Available:
    """Free host and device memory now, free disk at the output's folder and (--offload-dir) at the offload folder."""
    host, host_source = available_host_bytes()
    disk, disk_path = free_disk_bytes(out)
    offload_disk, offload_path, same = None, None, False
    if offload_dir is not None:
        offload_disk, offload_path = free_disk_bytes(Path(offload_dir).expanduser() / "layers")
        same = offload_path.stat().st_dev == disk_path.stat().st_dev
    return Available(host, host_source, available_device_bytes(device), disk, disk_path, offload_disk, offload_path,
                     same)
