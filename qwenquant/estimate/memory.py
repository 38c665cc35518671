"""Peak memory per phase of a run, from what the code holds at each phase (see `memory_phases`): the whole model
in the model dtype on the host, the source's next-token log-probs (fp16, kl_tokens x vocab), the calibration
activations of one layer (twice while propagating), the quantization records (until export, or one layer's when
the run journal keeps them on disk), the largest transient of the recipe's stages (each stage declares it:
`StageSpec.host_bytes`), the exporter's pending shard, the reloaded checkpoint during verification, and the
float32 temporaries of `kl_stats` (five [kl_tokens, vocab] float32 tensors at once), which dominate for Qwen3's
151936-token vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenquant.estimate.facts import FLOAT_DTYPES, MODEL_DTYPE_BYTES, ModelFacts, RunShape
from qwenquant.estimate.need import CALIB_BATCH, StageNeed
from qwenquant.estimate.size import OutputSize, kept_linears
from qwenquant.export.registry import FORMATS
from qwenquant.stages.registry import STAGES, spec_of

KL_FLOAT_COPIES = 5  # kl_stats: float() of both inputs, exp, difference, product: [tokens, vocab] float32 each
SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
COPIES = "quantized weights (new copies; the mapped originals stay in the RSS)"
LOGP_BOTH = "log-probs (source, quantized)"


@dataclass(frozen=True)
class Traits:
    """How the run holds its data. `journal`: finished layers' records go to disk (qwenquant/journal.py) instead of
    staying in memory until export."""

    journal: bool


def run_traits(recipe) -> Traits:
    """As the runner decides (qwenquant/runner/run.py): every run journals its layers but a mixed-precision one,
    which may quantize the model several times and keeps its records in memory."""
    return Traits(journal=recipe.stage("mixed_precision") is None)


def record_bytes(recipe, n: int, k: int, dtype_bytes: int) -> int:
    """Host bytes of one Linear's record (QuantizedWeight), as the recipe's quantizer declares them."""
    spec = STAGES[recipe.quantizer]
    return 0 if spec.record_bytes is None else spec.record_bytes(recipe.quantizer_config, n, k, dtype_bytes)


def records_bytes(recipe, facts: ModelFacts, layer: int | None = None) -> int:
    """Records of every quantizable Linear (of one decoder layer when `layer` is given)."""
    dt = MODEL_DTYPE_BYTES[recipe.model.dtype]
    return sum(record_bytes(recipe, l.n, l.k, dt) for l in facts.linears if layer is None or l.layer == layer)


def journal_bytes(recipe, facts: ModelFacts, shape: RunShape, traits: Traits) -> int:
    """What the run journal writes to disk: every record, the calibration inputs and both log-probs."""
    if not traits.journal:
        return 0
    dt = MODEL_DTYPE_BYTES[recipe.model.dtype]
    return (records_bytes(recipe, facts) + shape.calib_tokens * facts.hidden * dt
            + 2 * shape.kl_tokens * facts.vocab)


def stage_transients(recipe, need: StageNeed) -> tuple[int, str]:
    """Largest transient of the recipe's per-layer stages (host when computing on CPU) and what it is: what each
    stage declares, plus a calibration batch through the layer (the model dtype's activations and float32 hooks)."""
    widest = max((l.n for l in need.linears), default=1)
    batch = CALIB_BATCH * need.seq_len * widest * (3 * need.dtype_bytes + 4)
    total, whats = batch, []
    for cfg in recipe.stages:
        spec = spec_of(cfg)
        if spec.host_bytes is not None:
            nbytes, what = spec.host_bytes(cfg, need)
            total += nbytes
            whats += [what] if what else []
    return total, " + ".join(whats)


@dataclass
class Phase:
    """Host (and device) bytes held at the peak of one phase, by component."""

    name: str
    host: dict[str, int]
    device: dict[str, int] = field(default_factory=dict)
    reclaimable: int = 0  # part of `host` that is clean, no longer used file-backed pages the kernel can drop

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def device_total(self) -> int:
        return sum(self.device.values())


@dataclass(frozen=True)
class Held:
    """The sizes the phases are made of."""

    base_rss: int
    dtype_bytes: int
    model: int
    logp: int  # one set of next-token log-probs (fp16, kl_tokens x vocab)
    fwd_temp: int  # one evaluation forward: logits in the model dtype, their float32 copy, the float32 log-softmax
    kl: int  # kl_stats' float32 temporaries
    records: dict[str, int]  # {what: bytes} of the records held
    copies: dict[str, int]  # {COPIES: bytes} from the quantize phase on (CPU), else {}
    cuda: bool


def _new_weight_copies(recipe, facts: ModelFacts, dt: int) -> int:
    """transformers memory-maps safetensors whose dtype is the model dtype: those weights are file-backed pages in
    the RSS. A quantizer gives each Linear a new (dequantized) weight; the mapped original stays resident until
    the kernel needs the memory (clean page cache: counted in RSS, reclaimable), so the RSS grows by the quantized
    Linears' size during quantization."""
    float_dtypes = {t.dtype for t in facts.tensors.values() if t.dtype in FLOAT_DTYPES}
    if float_dtypes != {SAFETENSORS_DTYPE[recipe.model.dtype]}:
        return 0
    kept, _ = kept_linears(recipe, facts)
    return dt * sum(l.n * l.k for l in facts.linears if l.name not in kept)


def _held(recipe, facts: ModelFacts, shape: RunShape, base_rss: int, traits: Traits, cuda: bool) -> Held:
    dt = MODEL_DTYPE_BYTES[recipe.model.dtype]
    records_all = records_bytes(recipe, facts)
    per_layer = max((records_bytes(recipe, facts, i) for i in range(facts.num_layers)), default=0)
    records = per_layer if traits.journal else records_all
    name = "records (one layer; the others in the journal)" if records != records_all else "records"
    copies = _new_weight_copies(recipe, facts, dt)
    return Held(base_rss=base_rss, dtype_bytes=dt, model=facts.params * dt, logp=2 * shape.kl_tokens * facts.vocab,
                fwd_temp=(dt + 4 + 4) * shape.window * facts.vocab,
                kl=KL_FLOAT_COPIES * 4 * shape.kl_tokens * facts.vocab, records={name: records},
                copies={COPIES: copies} if copies and not cuda else {}, cuda=cuda)


def _run_phases(recipe, facts: ModelFacts, need: StageNeed, out: OutputSize, h: Held) -> list[Phase]:
    """load, evaluate the source, quantize, evaluate the quantized model, export."""
    temps, temps_what = stage_transients(recipe, need)
    biggest = max((l.n * l.k for l in facts.linears), default=0)
    export_pending = min(out.quantized_bytes, recipe.export.max_shard_size_mb * 2**20) + 3 * 4 * biggest
    cache = 2 * need.calib_tokens * facts.hidden * h.dtype_bytes  # one layer's inputs and its propagated outputs
    base = {"process": h.base_rss, "model": h.model}
    # on CUDA the model moves to the device for evaluation and verification; the host keeps the rest
    on_host = {"process": h.base_rss} if h.cuda else base
    fwd_host = {} if h.cuda else {"forward": h.fwd_temp}
    # peak_device_bytes in the report is torch's max_memory_allocated: the CUDA context itself is not in it
    fwd_dev = {"model": h.model, "forward": h.fwd_temp} if h.cuda else {}
    layer_dev = {"layer": facts.layer_linear_params(0) * h.dtype_bytes, temps_what: temps} if h.cuda else {}
    return [
        Phase("load", dict(base)),
        Phase("eval_source", on_host | {"log-probs (source)": h.logp} | fwd_host, fwd_dev),
        Phase("quantize", base | {"log-probs (source)": h.logp} | h.records | {"calibration activations": cache}
              | h.copies | ({} if h.cuda else {temps_what: temps}), layer_dev),
        Phase("eval_quantized", on_host | h.copies | h.records | {LOGP_BOTH: 2 * h.logp} | fwd_host, fwd_dev),
        Phase("export", base | h.records | {LOGP_BOTH: 2 * h.logp, "pending shard": export_pending} | h.copies),
    ]


def _verify_phases(recipe, facts: ModelFacts, out: OutputSize, h: Held) -> list[Phase]:
    """Reloading the written checkpoint (transformers or the format's spec reader) and its KL statistics."""
    lin = facts.linear_params
    reader = FORMATS[recipe.export.format].reload_with(recipe.record_kind, recipe.quantizer_config, facts.moe)
    common = {"process": h.base_rss, "model": h.model} | h.records | {LOGP_BOTH: 2 * h.logp} | h.copies
    fwd_host = {} if h.cuda else {"forward": h.fwd_temp}
    if reader == "transformers":
        # reloaded: its compressed tensors and the dense weights it computes with; then our float32 copies.
        # `del reloaded` does not free it at once (reference cycles wait for the garbage collector): measured
        # on a 0.6B model, it is still there while the KL statistics run
        reloaded = {"reloaded checkpoint": h.model + out.quantized_bytes}
        reload = reloaded | {"log-probs (checkpoint)": h.logp} | fwd_host
        kl_part = reloaded | {"reloaded weights (float32)": 4 * lin, "log-probs (checkpoint)": h.logp,
                              "KL statistics": h.kl}
        return [Phase("verify", common | reload,
                      {"reloaded checkpoint": h.model, "forward": h.fwd_temp} if h.cuda else {}),
                Phase("verify (KL)", common | kl_part)]
    read = {"checkpoint tensors": out.safetensors_bytes, "read weights (float32)": 4 * lin}
    return [Phase("verify", common | read | {"swapped weights": h.dtype_bytes * lin, "log-probs (checkpoint)": h.logp}
                  | fwd_host, {"model": h.model, "forward": h.fwd_temp} if h.cuda else {}),
            Phase("verify (KL)", common | read | {"log-probs (checkpoint)": h.logp, "KL statistics": h.kl})]


def memory_phases(recipe, facts: ModelFacts, shape: RunShape, out: OutputSize, base_rss: int, traits: Traits,
                  cuda: bool) -> list[Phase]:
    """What each phase of a run holds at its peak (host and, when computing on CUDA, device)."""
    h = _held(recipe, facts, shape, base_rss, traits, cuda)
    need = StageNeed(facts, shape, h.dtype_bytes)
    phases = _run_phases(recipe, facts, need, out, h)
    if recipe.eval.verify:
        phases += _verify_phases(recipe, facts, out, h)
    phases.append(Phase("report", {"process": h.base_rss, "model": h.model} | h.records
                        | {LOGP_BOTH: 2 * h.logp, "KL statistics": h.kl} | h.copies))
    for ph in phases:
        ph.reclaimable = ph.host.get(COPIES, 0)
    return phases
