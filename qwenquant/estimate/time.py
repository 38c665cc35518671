"""Wall time per stage of a run, keyed like the report's `timings_s` (the recipe's stages under "stages"), from the
speed probe's rates: each stage declares its own time (`StageSpec.seconds`, built from `StageNeed`'s layer forwards
and quantizer passes); the loop's capture, propagation and journal, the evaluations, export, verification and
report are modelled here. Constants the probe does not measure were measured on the 2-core development box
(benchmarks/dry_run_accuracy.py)."""

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


def window_forward(need: StageNeed, quantized_acts: bool) -> float:
    """One evaluation window through the whole model, with its log-softmax (MoE: the active experts only)."""
    probe, w = need.probe, need.shape.window
    tok_eval = need.token_s * moe_active_fraction(need.facts)
    act = need.act_quant_s_per_token if quantized_acts else 0.0
    per_layer = probe.layer_s_per_call + w * (tok_eval + probe.attn_s_per_token2 * w + act)
    return need.layers * per_layer + w * probe.lm_head_s_per_token + w * need.facts.vocab * probe.logits_s_per_element


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


def time_estimate(recipe, facts: ModelFacts, shape: RunShape, out: OutputSize, probe,
                  traits: Traits) -> tuple[dict, list[str]]:
    """(seconds per phase, keyed like the report's timings_s with the stages under "stages", plus startup, report
    and total; the stages' caveats)."""
    need = stage_need(recipe, facts, shape, probe)
    stages, notes = stage_seconds(recipe, need, traits)
    windows = shape.ppl_windows + shape.kl_windows
    n_weights = facts.linear_params
    calibrated = shape.calib_tokens > 0
    timings: dict = {
        "startup": STARTUP_S,
        "load": LOAD_S + facts.source_bytes / LOAD_BPS + facts.params * probe.isfinite_s_per_weight,
        "calibration_data": (0.1 + shape.calib_tokens * TOKENIZE_S_PER_TOKEN) if calibrated else 0.0,
        "eval_source": windows * window_forward(need, False),
        "quantize": sum(stages.values()),
        "eval_quantized": windows * window_forward(need, True),
        "export": 0.5 + n_weights * probe.export_s_per_weight + out.safetensors_bytes / DISK_WRITE_BPS,
    }
    if recipe.eval.verify:
        timings["verify"] = (LOAD_S + out.safetensors_bytes / DISK_READ_BPS + n_weights * probe.export_s_per_weight
                             + shape.kl_windows * window_forward(need, True)
                             + 2 * shape.kl_tokens * facts.vocab * probe.kl_s_per_element + n_weights * 4e-9)
    timings["report"] = shape.kl_tokens * facts.vocab * probe.kl_s_per_element + facts.source_bytes / HASH_BPS + 0.3
    timings["stages"] = stages
    timings["total"] = sum(v for k, v in timings.items() if isinstance(v, float))
    return timings, notes
