"""Peak memory per phase of a run, from what the code holds at each phase (see `memory_phases`): the whole model
in the model dtype on the host, the source's next-token log-probs (fp16, kl_tokens x vocab), the calibration
activations of one layer (twice while propagating), the quantization records (until export, or one layer's when
the run journal keeps them on disk), the largest transient of the recipe's stages (each stage declares it:
`StageSpec.host_bytes`), the exporter's pending shard, the reloaded checkpoint during verification, and the
float32 temporaries of `kl_stats` (five [kl_tokens, vocab] float32 tensors at once), which dominate for Qwen3's
151936-token vocabulary. With --offload-dir (`_offload_phases`) the model is replaced by the resident tensors and
one decoder layer, and the layer-streamed evaluation holds the hidden states of every window; the data-free
streaming path has its own phases (qwenquant/estimate/stream.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwenquant.estimate.facts import FLOAT_DTYPES, MODEL_DTYPE_BYTES, ModelFacts, RunShape
from qwenquant.estimate.need import CALIB_BATCH, StageNeed
from qwenquant.estimate.size import OutputSize, kept_linears
from qwenquant.eval.precision import compute_dtype
from qwenquant.export.registry import FORMATS
from qwenquant.model.loader import DTYPES
from qwenquant.model.qwen3 import head_dim
from qwenquant.stages.registry import STAGES, spec_of
from qwenquant.stream.eligibility import streams

KL_FLOAT_COPIES = 5  # kl_stats: float() of both inputs, exp, difference, product: [tokens, vocab] float32 each
SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
COPIES = "quantized weights (new copies; the mapped originals stay in the RSS)"
LOGP_BOTH = "log-probs (source, quantized)"


@dataclass(frozen=True)
class Traits:
    """How the run holds its data. `journal`: finished layers' records go to disk (qwenquant/journal.py) instead of
    staying in memory until export. `offload`: --offload-dir, the decoder layers stay on disk and one is in memory at
    a time (qwenquant/model/offload.py). `stream`: the data-free streaming path (qwenquant/stream/), which builds no
    model (qwenquant/estimate/stream.py)."""

    journal: bool
    offload: bool = False
    stream: bool = False


def run_traits(recipe, offload: bool = False, stream: bool = False) -> Traits:
    """As the runner decides (qwenquant/runner/run.py): a data-free recipe streams unless --no-stream (and then
    ignores --offload-dir); every other run journals its layers but a mixed-precision one, which may quantize the
    model several times and keeps its records in memory."""
    streamed = stream and streams(recipe)
    return Traits(journal=recipe.stage("mixed_precision") is None and not streamed, offload=offload and not streamed,
                  stream=streamed)


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
    fwd_temp: int  # one evaluation window's head: see `_forward_temp`
    kl: int  # kl_stats' float32 temporaries
    records: dict[str, int]  # {what: bytes} of the records held
    copies: dict[str, int]  # {COPIES: bytes} from the quantize phase on (CPU), else {}
    cuda: bool
    resident: int = 0  # --offload-dir: the tensors outside the decoder layers (embeddings, final norm, lm_head)
    layer: int = 0  # --offload-dir: the largest decoder layer, the one materialized at a time
    hidden_states: int = 0  # --offload-dir: every evaluated window's hidden states and position embeddings


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
    copies = 0 if traits.offload else _new_weight_copies(recipe, facts, dt)  # offloaded layers are read, not mapped
    return Held(base_rss=base_rss, dtype_bytes=dt, model=facts.params * dt, logp=2 * shape.kl_tokens * facts.vocab,
                fwd_temp=_forward_temp(facts, shape, dt, eval_dtype_bytes(recipe, cuda)),
                kl=KL_FLOAT_COPIES * 4 * shape.kl_tokens * facts.vocab, records={name: records},
                copies={COPIES: copies} if copies and not cuda else {}, cuda=cuda,
                **(_offloaded(facts, shape, dt, eval_dtype_bytes(recipe, cuda)) if traits.offload else {}))


def eval_dtype_bytes(recipe, cuda: bool) -> int:
    """Bytes per element of the evaluation's compute dtype (qwenquant/eval/precision.py: float32 on the CPU for a
    bf16/fp16 model, the model dtype on an accelerator)."""
    device = torch.device("cuda" if cuda else "cpu")
    return compute_dtype(device, DTYPES[recipe.model.dtype]).itemsize


def _forward_temp(facts: ModelFacts, shape: RunShape, dt: int, ev: int) -> int:
    """The head of one evaluation window: in the model dtype, its logits, their float32 copy and the float32
    log-softmax; computed in float32 from a bf16/fp16 model, the lm_head's float32 weight copy beside the float32
    logits during the matmul, then the logits with the cross-entropy's and the log-softmax's float32 temporaries
    and the fp16 log-probs."""
    logits = shape.window * facts.vocab
    if ev == dt:
        return (dt + 4 + 4) * logits
    return max(ev * facts.vocab * facts.hidden + ev * logits, (ev + 4 + 2) * logits)


def _offloaded(facts: ModelFacts, shape: RunShape, dt: int, ev: int) -> dict[str, int]:
    """Held's --offload-dir sizes: the resident tensors, the largest decoder layer, and the evaluation's hidden
    states in its compute dtype `ev` (the layer-streamed evaluation runs the union of the perplexity and KL windows;
    per token its hidden state, the rotary cos/sin and the positions)."""
    windows = max(shape.ppl_windows, shape.kl_windows)
    per_token = (facts.hidden + 2 * head_dim(facts.config)) * ev + 16
    return {"resident": facts.resident_params * dt,
            "layer": max(map(facts.layer_params, range(facts.num_layers)), default=0) * dt,
            "hidden_states": windows * shape.window * per_token}


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


def _offload_phases(recipe, facts: ModelFacts, need: StageNeed, out: OutputSize, h: Held) -> list[Phase]:
    """--offload-dir (qwenquant/runner/placement.py OffloadedModel): the resident tensors stay, one decoder layer is
    materialized at a time; evaluation keeps every window's hidden states while the layers stream, then runs the
    head (in float32 on the CPU: the lm_head's float32 copy) one window at a time; verification reads the checkpoint back one layer at a time (no reload, no
    forward: the resident tensors' stored copies at once, then one layer's with its weights read as float32) and
    computes the KL statistics twice, one after the other."""
    temps, temps_what = stage_transients(recipe, need)
    export_pending = min(out.quantized_bytes, recipe.export.max_shard_size_mb * 2**20) + 3 * 4 * need.largest_linear
    cache = 2 * need.calib_tokens * facts.hidden * h.dtype_bytes
    base = {"process": h.base_rss, "resident tensors (embeddings, norm, lm_head)": h.resident}
    layer = {"decoder layer (one at a time)": h.layer}
    # the layers stream, then the head runs per window: the larger of the two, beside every window's hidden states
    step = layer if h.cuda or h.layer >= h.fwd_temp else {"forward": h.fwd_temp}
    evaluation = {"hidden states (every window)": h.hidden_states} | step
    fwd_dev = ({"decoder layer (one at a time)": h.layer, "resident tensors (embeddings, norm, lm_head)": h.resident,
                "forward": h.fwd_temp} if h.cuda else {})
    layer_dev = layer | {temps_what: temps} if h.cuda else {}
    kl = {LOGP_BOTH: 2 * h.logp, "KL statistics": h.kl}
    phases = [
        Phase("load", dict(base)),
        Phase("eval_source", base | evaluation | {"log-probs (source)": h.logp}, fwd_dev),
        Phase("quantize", base | layer | {"log-probs (source)": h.logp} | h.records | {"calibration activations": cache}
              | ({} if h.cuda else {temps_what: temps}), layer_dev),
        Phase("eval_quantized", base | evaluation | h.records | {LOGP_BOTH: 2 * h.logp}, fwd_dev),
        Phase("export", base | layer | h.records | {LOGP_BOTH: 2 * h.logp, "pending shard": export_pending}),
    ]
    common = base | h.records | {LOGP_BOTH: 2 * h.logp}
    if recipe.eval.verify:  # the resident tensors' stored copies are read at once, then one layer's at a time
        stored_layer = (out.safetensors_bytes - h.resident) // max(facts.num_layers, 1)
        read = max(h.resident, stored_layer + h.layer + 4 * need.largest_linear)
        phases += [Phase("verify", common | {"checkpoint tensors read back (resident, or one layer)": read}),
                   Phase("verify (KL)", common | kl)]
    return phases + [Phase("report", common | kl)]


def memory_phases(recipe, facts: ModelFacts, shape: RunShape, out: OutputSize, base_rss: int, traits: Traits,
                  cuda: bool) -> list[Phase]:
    """What each phase of a run holds at its peak (host and, when computing on CUDA, device)."""
    h = _held(recipe, facts, shape, base_rss, traits, cuda)
    need = StageNeed(facts, shape, h.dtype_bytes)
    if traits.offload:
        return _offload_phases(recipe, facts, need, out, h)
    phases = _run_phases(recipe, facts, need, out, h)
    if recipe.eval.verify:
        phases += _verify_phases(recipe, facts, out, h)
    phases.append(Phase("report", {"process": h.base_rss, "model": h.model} | h.records
                        | {LOGP_BOTH: 2 * h.logp, "KL statistics": h.kl} | h.copies))
    for ph in phases:
        ph.reclaimable = ph.host.get(COPIES, 0)
    return phases
