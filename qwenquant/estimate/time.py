"""Wall time per stage of a run, keyed like the report's `timings_s` (the recipe's stages under "stages"), from the
speed probe's rates: each stage declares its own time (`StageSpec.seconds`, built from `StageNeed`'s layer forwards
and quantizer passes); the loop's capture, propagation and journal, the evaluations, export, verification and
report are modelled here, with --offload-dir's reads and writes of the decoder layers (`_offload_io`).
`dominant_stage` names the longest part; `streaming_time` is the data-free path's disk-speed line. Constants the
probe does not measure were measured on the 2-core development box (benchmarks/dry_run_accuracy.py)."""

from __future__ import annotations

from qwenquant.estimate.facts import ModelFacts, RunShape
from qwenquant.estimate.memory import Traits, records_bytes
from qwenquant.estimate.need import StageNeed, stage_need
from qwenquant.estimate.size import OutputSize
from qwenquant.stages.registry import spec_of

STARTUP_S = 5.0  # interpreter start and imports of a `qwenquant` run
LOAD_S = 4.0  # resolve + transformers from_pretrained + tokenizer: fixed cost ...
LOAD_BPS = 0.2e9  # ... and per byte of weights (qwen3-mini 4-8 s, a 1.2 GB 0.6B 12 s on the 2-core box)
DISK_READ_BPS = 1.0e9  # safetensors read back in verification
DISK_WRITE_BPS = 0.5e9  # safetensors writes
JOURNAL_BPS = 0.08e9  # the run journal's torch.save of each layer (records, inputs): 0.6B runs on the 2-core box
HASH_BPS = 0.8e9  # sha256 of the source files for the report
TOKENIZE_S_PER_TOKEN = 4e-6  # calibration text tokenization


def moe_active_fraction(facts: ModelFacts) -> float:
    """Share of a layer's Linear weights a token passes through at inference (1 for dense models)."""
    cfg = facts.config
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    top_k = cfg.get("num_experts_per_tok")
    if not experts or not top_k:
        return 1.0
    total = facts.linear_params or 1
    expert = sum(l.n * l.k for l in facts.linears if ".experts." in l.name)
    return (total - expert + expert * top_k / experts) / total


def head_forward(need: StageNeed) -> float:
    """One evaluation window's lm_head and log-softmax (in the evaluation's compute dtype)."""
    probe, w = need.probe, need.shape.window
    return w * probe.eval_rates()[3] + w * need.facts.vocab * probe.logits_s_per_element


def window_forward(need: StageNeed, quantized_acts: bool) -> float:
    """One evaluation window through the whole model, with its log-softmax (MoE: the active experts only), in the
    evaluation's compute dtype (float32 on the CPU: qwenquant/eval/precision.py)."""
    w = need.shape.window
    per_token, per_call, attn, _ = need.probe.eval_rates()
    tok_eval = per_token * need.layer_scale * moe_active_fraction(need.facts)
    act = need.act_quant_s_per_token if quantized_acts else 0.0
    per_layer = per_call + w * (tok_eval + attn * w + act)
    return need.layers * per_layer + head_forward(need)


def stage_seconds(recipe, need: StageNeed, traits: Traits) -> tuple[dict[str, float], list[str]]:
    """Seconds of the quantize phase by part, in the order they run, and the stages' caveats: the capture of the
    calibration inputs, each stage (its declared time; one without is named by `missing_costs`), propagating the
    quantized outputs (with the simulated activation quantization, if any) and the journal's writes."""
    stages: dict[str, float] = {}
    notes: list[str] = []
    calibrated = need.calib_tokens > 0
    if calibrated:
        stages["capture"] = 0.02 + need.calib_tokens * need.facts.hidden * 2e-9
    for cfg in recipe.stages:
        spec = spec_of(cfg)
        if spec.seconds is not None:
            stages[spec.name], note = spec.seconds(cfg, need)
            notes += [note] if note and note not in notes else []
    if calibrated:
        stages["propagate"] = need.calibration_forwards(quantized_acts=True)
    if traits.journal:
        inputs = need.layers * need.calib_tokens * need.facts.hidden * need.dtype_bytes
        stages["journal"] = (records_bytes(recipe, need.facts) + inputs) / JOURNAL_BPS  # every layer's records, inputs
    return stages, notes


def repeated_stage_seconds(recipe, facts: ModelFacts, shape: RunShape, probe) -> dict[str, float]:
    """Per stage, the part of its seconds every rank of a distributed run repeats in full (`StageSpec.
    repeated_seconds`; 0 for a stage without one)."""
    need = stage_need(recipe, facts, shape, probe)
    return {spec_of(cfg).name: spec_of(cfg).repeated_seconds(cfg, need) for cfg in recipe.stages
            if spec_of(cfg).seconds is not None and spec_of(cfg).repeated_seconds is not None}


def _offload_io(recipe, need: StageNeed, out: OutputSize, timings: dict, stages: dict) -> None:
    """--offload-dir: only the resident tensors are loaded up front; each evaluation reads every decoder layer from
    disk (the source safetensors, checked finite on first read, then the work dir's layer files); the quantize phase
    writes each layer back; verification reads the checkpoint back instead of reloading and running the model, and
    computes the KL statistics twice."""
    facts, probe = need.facts, need.probe
    resident, layer_params = facts.resident_params, facts.params - facts.resident_params
    read = layer_params * need.dtype_bytes / DISK_READ_BPS
    timings["load"] = LOAD_S + resident * need.dtype_bytes / LOAD_BPS + resident * probe.isfinite_s_per_weight
    timings["eval_source"] += read + layer_params * probe.isfinite_s_per_weight
    timings["eval_quantized"] += read
    stages["offload"] = read + layer_params * need.dtype_bytes / DISK_WRITE_BPS
    timings["export"] += read
    if recipe.eval.verify:
        timings["verify"] = (out.safetensors_bytes / DISK_READ_BPS + read + facts.linear_params
                             * probe.export_s_per_weight + 2 * need.shape.kl_tokens * facts.vocab * probe.kl_s_per_element)


def time_estimate(recipe, facts: ModelFacts, shape: RunShape, out: OutputSize, probe,
                  traits: Traits) -> tuple[dict, list[str]]:
    """(seconds per phase, keyed like the report's timings_s with the stages under "stages", plus startup, report
    and total; the stages' caveats)."""
    need = stage_need(recipe, facts, shape, probe)
    stages, notes = stage_seconds(recipe, need, traits)
    windows = max(shape.ppl_windows, shape.kl_windows)  # one forward per distinct window (the KL ones are a prefix)
    n_weights = facts.linear_params
    calibrated = shape.calib_tokens > 0
    kl_elements = shape.kl_tokens * facts.vocab
    timings: dict = {
        "startup": STARTUP_S,
        "load": LOAD_S + facts.source_bytes / LOAD_BPS + facts.params * probe.isfinite_s_per_weight,
        "calibration_data": (0.1 + shape.calib_tokens * TOKENIZE_S_PER_TOKEN) if calibrated else 0.0,
        "eval_source": windows * window_forward(need, False),
        "quantize": 0.0,  # the stages' sum, below
        "eval_quantized": windows * window_forward(need, True),
        "export": 0.5 + n_weights * probe.export_s_per_weight + out.safetensors_bytes / DISK_WRITE_BPS,
    }
    if recipe.eval.verify:
        timings["verify"] = (LOAD_S + out.safetensors_bytes / DISK_READ_BPS + n_weights * probe.export_s_per_weight
                             + shape.kl_windows * window_forward(need, True)
                             + 2 * kl_elements * probe.kl_s_per_element + n_weights * 4e-9)
    if traits.offload:
        _offload_io(recipe, need, out, timings, stages)
    timings["quantize"] = sum(stages.values())
    timings["report"] = kl_elements * probe.kl_s_per_element + facts.source_bytes / HASH_BPS + 0.3
    timings["stages"] = stages
    timings["total"] = sum(v for k, v in timings.items() if isinstance(v, float))
    return timings, notes


LABELS = {"startup": "startup", "load": "loading the model", "calibration_data": "calibration data",
          "eval_source": "source evaluation", "eval_quantized": "quantized-model evaluation", "export": "export",
          "verify": "verification", "report": "report", "capture": "calibration capture",
          "propagate": "calibration propagation", "journal": "run journal", "offload": "offload reads and writes"}


def dominant_stage(timings: dict) -> dict:
    """The part of the run that takes longest: a phase, or inside the quantize phase one of its stages (the
    quantizer, calibration propagation, ...), with its share of the total."""
    parts = {k: v for k, v in timings.items() if isinstance(v, float) and k not in ("quantize", "total")}
    parts |= timings["stages"]
    name = max(parts, key=parts.get)
    return {"name": name, "label": LABELS.get(name, f"{name} stage"), "seconds": parts[name],
            "share": parts[name] / timings["total"] if timings["total"] else 0.0}


def streaming_time(facts: ModelFacts, out: OutputSize) -> dict:
    """The data-free streaming path (qwenquant/stream/: no model, no calibration forwards): about the time to read
    the source safetensors and write the output at disk speed."""
    read, write = facts.source_bytes, out.safetensors_bytes
    return {"read_bytes": read, "write_bytes": write, "seconds": read / DISK_READ_BPS + write / DISK_WRITE_BPS}
