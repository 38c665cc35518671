"""The data-free streaming path's memory and time (qwenquant/runner/stream.py, qwenquant/stream/): recipes that
`qwenquant.stream.eligibility.streams` accepts build no model and run no calibration forward.

Memory, from what the code holds: `quantize_and_write` holds the quantize jobs in flight (each about WORK_FACTOR
times its source weights, together within WORK_BUDGET_BYTES: qwenquant/stream/execute.py); the
layer-streamed verification (qwenquant/stream/verify.py) holds the resident tensors and one decoder layer (twice: as
read and as read back from the checkpoint) in its evaluation dtype (float32 on CPU) and the source's and the
checkpoint's hidden states of every evaluated window, then computes perplexity and the KL window by window (no
log-probs are kept). Time: reading the source and writing the output at disk speed plus the quantizer's passes, and
for the verification two forwards over the windows with the reads and checks of every layer. Keyed like the
streamed run's report (`load`, `quantize_and_write`, `verify`, `report`).
"""

from __future__ import annotations

from qwenquant.estimate.facts import ModelFacts, RunShape
from qwenquant.estimate.memory import Phase, eval_dtype_bytes
from qwenquant.estimate.need import WEIGHT_COPIES, StageNeed, stage_need
from qwenquant.estimate.size import OutputSize
from qwenquant.estimate.time import (DISK_READ_BPS, DISK_WRITE_BPS, HASH_BPS, LOAD_S, STARTUP_S, head_forward,
                                     window_forward)
from qwenquant.model.qwen3 import head_dim
from qwenquant.runner.stream import stream_workers
from qwenquant.stages.registry import spec_of
from qwenquant.stream.execute import WORK_BUDGET_BYTES, WORK_FACTOR

KL_WINDOW = "head of one window (float32 logits, log-probs and KL temporaries)"
KL_WINDOW_COPIES = 5  # qwenquant.stream.verify.kl_by_window: both log-softmaxes, exp, difference, product


def _jobs_bytes(recipe, need: StageNeed) -> int:
    """The quantize jobs in flight: each holds WORK_FACTOR times its source bytes (one fused group when the quantizer
    shares a scale across it, else one Linear); together they wait for WORK_BUDGET_BYTES, and a job larger than the
    budget runs alone (qwenquant/stream/execute.py)."""
    cfg = recipe.quantizer_config
    weights = (2 if spec_of(cfg).shares_scale(cfg) else 1) * need.largest_linear  # gate/up: the largest fused group
    job = WORK_FACTOR * weights * need.dtype_bytes
    return max(min(stream_workers() * job, WORK_BUDGET_BYTES), job)


def stream_phases(recipe, facts: ModelFacts, shape: RunShape, base_rss: int, cuda: bool,
                  dtype_bytes: int) -> list[Phase]:
    """What each phase of a streamed run holds at its peak (host memory; see the module docstring)."""
    need = StageNeed(facts, shape, dtype_bytes)
    ev = eval_dtype_bytes(recipe, cuda)  # the verification loads the resident tensors and layers in it
    windows = max(shape.ppl_windows, shape.kl_windows)  # the longer window set is evaluated
    per_token = facts.hidden * ev
    hidden = {"hidden states (source and checkpoint, every window)": 2 * windows * shape.window * per_token,
              "position embeddings": windows * shape.window * (2 * head_dim(facts.config) * ev + 16)}
    base = {"process": base_rss}
    resident = base | {"resident tensors (embeddings, norm, lm_head)": facts.resident_params * ev}
    layer = max(map(facts.layer_params, range(facts.num_layers)), default=0) * ev
    window = shape.window * facts.vocab  # one window's logits
    phases = [Phase("load", dict(base)),
              Phase("quantize_and_write", base | {"quantize jobs in flight": _jobs_bytes(recipe, need)})]
    if windows:  # no evaluation pass at all with --no-ppl --kl-tokens 0 --no-verify
        layer_pass = {"decoder layer (as read and as read back)": 2 * layer,
                      "float32 copies of the largest Linear": WEIGHT_COPIES * 4 * need.largest_linear}
        head = KL_WINDOW_COPIES * 4 if shape.kl_windows else ev + 4  # the KL's log-probs, or perplexity's logits
        phases += [Phase("verify", resident | hidden | layer_pass),
                   Phase("verify (KL)", resident | hidden | {KL_WINDOW: head * window})]
    return phases + [Phase("report", dict(base))]


def stream_time_estimate(recipe, facts: ModelFacts, shape: RunShape, out: OutputSize, probe) -> tuple[dict, list[str]]:
    """(seconds per phase of a streamed run, keyed like its report's timings_s, plus startup and total; notes): the
    verification runs the source and the checkpoint over the windows, then perplexity and log-probs each with its
    own head forwards."""
    need = stage_need(recipe, facts, shape, probe)
    union, windows = max(shape.ppl_windows, shape.kl_windows), shape.ppl_windows + shape.kl_windows
    layers = (facts.params - facts.resident_params) * need.dtype_bytes
    kl = shape.kl_tokens * facts.vocab * probe.kl_s_per_element
    timings: dict = {
        "startup": STARTUP_S,
        "load": LOAD_S,  # resolve, meta skeleton, tokenizer
        "quantize_and_write": (facts.source_bytes / DISK_READ_BPS + out.safetensors_bytes / DISK_WRITE_BPS
                               + need.quant_pass / stream_workers() + facts.params * probe.isfinite_s_per_weight),
        "verify": (union * (window_forward(need, False) + window_forward(need, True))
                   + 2 * (windows - union) * head_forward(need)
                   + (layers + out.safetensors_bytes) / DISK_READ_BPS + need.quant_pass
                   + facts.linear_params * probe.export_s_per_weight + kl),
        "report": facts.source_bytes / HASH_BPS + 0.3,
        "stages": {},
    }
    if not union:  # --no-ppl --kl-tokens 0 --no-verify: no evaluation pass
        del timings["verify"]
    timings["total"] = sum(v for v in timings.values() if isinstance(v, float))
    return timings, []
