"""Resource estimate of a run before any weight is loaded (`qwenquant fp8|gptq|awq|rtn|run ... --dry-run`).

From config.json, the safetensors headers (shapes and dtypes only), the resolved recipe and a few-second speed
probe of this machine (qwenquant/probe.py) it predicts, per phase of `qwenquant.run.run_recipe`:
- peak host memory (RSS) and peak device memory (CUDA only),
- the size of the checkpoint's safetensors files (exact per format, from the tensor shapes),
- wall time per stage (the same names as the report's `timings_s`),
and whether the run fits the memory available now (host: /proc/meminfo MemAvailable, or the cgroup limit when
lower; device: torch.cuda.mem_get_info) and the free disk space at the output's parent folder.

The memory model follows what the code holds at each phase (see `host_phases`): the whole model in the model dtype
on the host, the source's next-token log-probs (fp16, kl_tokens x vocab), the calibration activations of one
layer (twice while propagating), the quantization records (until export, or one layer's when the run journal
keeps them on disk), the exporter's pending shard, the reloaded checkpoint during verification, and the float32
temporaries of `kl_stats` (five [kl_tokens, vocab] float32 tensors at once), which dominate for Qwen3's
151936-token vocabulary. Constants that are not measured by the probe are named below with how they were obtained.
Accuracy against measured runs: benchmarks/dry_run_accuracy.py (results in benchmarks/results/dry_run_accuracy.md).

Everything here is a pure function of (facts, recipe, probe) except `model_facts` (reads headers), `eval_tokens`
(reads the evaluation text), the availability functions and `estimate_run`, which puts them together.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwenquant.errors import BadInputError, ResourceError

GiB = 2**30
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MODEL_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Constants not covered by the probe, measured on the 2-core development box (benchmarks/dry_run_accuracy.py):
PROCESS_BASE_EXTRA = 200 * 2**20  # RSS a run has beyond this process's imports: tokenizer, eval text, allocator
STARTUP_S = 5.0  # interpreter start and imports of a `qwenquant` run
LOAD_S = 4.0  # resolve + transformers from_pretrained + tokenizer: fixed cost ...
LOAD_BPS = 0.2e9  # ... and per byte of weights (qwen3-mini 4-8 s, a 1.2 GB 0.6B 12 s on the 2-core box)
DISK_READ_BPS = 1.0e9  # safetensors read back in verification
DISK_WRITE_BPS = 0.5e9  # safetensors writes
JOURNAL_BPS = 0.08e9  # the run journal's torch.save of each layer (records, inputs): 0.6B runs on the 2-core box
HASH_BPS = 0.8e9  # sha256 of the source files for the report
TOKENIZE_S_PER_TOKEN = 4e-6  # calibration text tokenization
CALIB_BATCH = 8  # run_sequential's calibration batch (samples per layer forward)
KL_FLOAT_COPIES = 5  # kl_stats: float() of both inputs, exp, difference, product: [tokens, vocab] float32 each
WIKITEXT2_TEST_CHARS = 1_288_556  # WikiText-2 raw test, rows joined with "\n\n" (when the file is not local)


@dataclass
class TensorInfo:
    """One tensor of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 2)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a safetensors file (its JSON header only; no data is read)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as err:
        raise BadInputError(f"{path}: corrupt or truncated safetensors header ({err}); re-download it") from err
    return {k: TensorInfo(v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


@dataclass
class LinearInfo:
    """A decoder Linear the quantizer may replace: full module name, [N out, K in], layer index, name in layer."""

    name: str
    n: int
    k: int
    layer: int
    local: str


@dataclass
class ModelFacts:
    """What the estimate needs to know about the model, from config.json and the safetensors headers."""

    reference: str
    path: str
    architecture: str
    config: dict
    num_layers: int
    hidden: int
    vocab: int
    tied: bool
    max_positions: int
    tensors: dict[str, TensorInfo]
    linears: list[LinearInfo]
    source_bytes: int  # safetensors files on disk
    copied_files_bytes: int  # tokenizer and generation files the output folder gets a copy of
    groups: list[list[LinearInfo]] = field(default_factory=list)  # Linears sharing one input (GPTQ's groups)

    @property
    def params(self) -> int:
        """Parameters the loaded model holds (a tied lm_head shares the embedding)."""
        return sum(t.numel for n, t in self.tensors.items() if not (self.tied and n == "lm_head.weight"))

    @property
    def linear_params(self) -> int:
        return sum(l.n * l.k for l in self.linears)

    def layer_linear_params(self, i: int = 0) -> int:
        return sum(l.n * l.k for l in self.linears if l.layer == i)


def _layer_adapters(adapter, config: dict, num_layers: int) -> list:
    """The adapter of each decoder layer (MoE layers differ), with older single-adapter code as a fallback."""
    if hasattr(adapter, "layers"):
        return adapter.layers(config, num_layers)
    return [adapter] * num_layers


def model_facts(resolved) -> ModelFacts:
    """Facts of a resolved model (qwenquant.model.loader.ResolvedModel): reads only headers and small files."""
    config = resolved.config
    tensors: dict[str, TensorInfo] = {}
    for f in resolved.weight_files:
        tensors.update(read_safetensors_header(f))
    n_layers = int(config["num_hidden_layers"])
    adapter = resolved.adapter
    linears, groups = [], []
    for i, layer in enumerate(_layer_adapters(adapter, config, n_layers)):
        by_local = {}
        for local in layer.linears:
            name = f"{adapter.layers_path}.{i}.{local}"
            t = tensors.get(name + ".weight")
            if t is not None and len(t.shape) == 2:
                by_local[local] = LinearInfo(name, int(t.shape[0]), int(t.shape[1]), i, local)
        linears += by_local.values()
        groups += [[by_local[n] for n in g if n in by_local] for g in layer.sequential_groups]
    groups = [g for g in groups if g]
    copied = sum(f.stat().st_size for f in Path(resolved.path).iterdir()
                 if f.is_file() and (f.name.startswith("tokenizer") or f.suffix in (".jinja", ".txt", ".model")
                                     or f.name in ("generation_config.json", "config.json")))
    return ModelFacts(
        reference=resolved.reference, path=str(resolved.path),
        architecture=(config.get("architectures") or ["?"])[0], config=config, num_layers=n_layers,
        hidden=int(config["hidden_size"]), vocab=int(config["vocab_size"]),
        tied=bool(config.get("tie_word_embeddings", False)),
        max_positions=int(config.get("max_position_embeddings", 2048)), tensors=tensors, linears=linears,
        source_bytes=sum(Path(f).stat().st_size for f in resolved.weight_files), copied_files_bytes=copied,
        groups=groups,
    )


# -- sizes of the run ---------------------------------------------------------------------------------------------


@dataclass
class RunShape:
    """The token counts a run processes."""

    calib_tokens: int  # num_samples x seq_len (0 when no stage needs calibration data)
    seq_len: int
    window: int  # evaluation window (capped at max positions)
    ppl_windows: int
    kl_windows: int
    text_tokens: int  # evaluation text, estimated
    text_note: str = ""

    @property
    def kl_tokens(self) -> int:
        return self.kl_windows * self.window


def run_shape(recipe, facts: ModelFacts, text_tokens: int, needs_calibration: bool, text_note: str = "") -> RunShape:
    """Windows and tokens as qwenquant.run.run_recipe computes them."""
    ev = recipe.eval
    window = min(ev.window, facts.max_positions)
    n_text = max(text_tokens // window, 1)
    ppl = (min(ev.max_windows, n_text) if ev.max_windows else n_text) if ev.perplexity else 0
    kl = min(max(1, math.ceil(ev.kl_tokens / window)), n_text)
    calib = recipe.calibration.num_samples * recipe.calibration.seq_len if needs_calibration else 0
    return RunShape(calib, recipe.calibration.seq_len, window, ppl, kl, text_tokens, text_note)


def eval_tokens(eval_text: str, tokenizer_dir: str | Path) -> tuple[int, str]:
    """Tokens of the evaluation text: exact for short texts, else measured on its first 200k characters and
    scaled to its length (within ~1%); WikiText-2 not found locally is assumed at its known length."""
    from qwenquant.eval.perplexity import find_wikitext2_test

    chars, sample = None, None
    if eval_text == "wikitext2":
        path = find_wikitext2_test()
        if path is None:
            chars = WIKITEXT2_TEST_CHARS
            note = "WikiText-2 test not found locally (the run loads it from the hub): its token count is assumed"
        else:
            text = "\n\n".join(path.read_text(encoding="utf-8").split("\n"))
            chars, sample, note = len(text), text[:200_000], ""
    else:
        path = Path(eval_text).expanduser()
        if not path.is_file():
            raise BadInputError(f"--eval-text {eval_text}: no such file")
        text = path.read_text(encoding="utf-8", errors="replace")
        chars, sample, note = len(text), text[:200_000], ""
    if sample is None:
        return int(chars / 4.3), note
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        n = len(tok(sample, add_special_tokens=False)["input_ids"])
    except Exception:  # no usable tokenizer: the typical English ratio
        return int(chars / 4.3), "tokenizer not loadable: evaluation tokens assumed at 4.3 characters per token"
    if len(sample) == chars:  # the whole text: exact
        return n, note
    return int(n * chars / max(len(sample), 1)), note


# -- output size ----------------------------------------------------------------------------------------------------


def kept_linears(recipe, facts: ModelFacts) -> tuple[set[str], str]:
    """Linears a mixed_precision stage keeps in the source dtype (an estimate for an unresolved count)."""
    stage = recipe.stage("mixed_precision")
    if stage is None:
        return set(), ""
    if stage.keep is not None:
        return set(stage.keep), ""
    if stage.keep_sensitive == "auto":
        return set(), f"--keep-sensitive auto keeps 0 to {stage.max_keep} groups: sizes assume none"
    # which groups are most sensitive is measured in the run: take N groups in layer order (q/k/v, o, gate/up,
    # down, next layer, ...), i.e. a typical mix of group sizes
    groups = facts.groups or [[l] for l in facts.linears]
    kept = {l.name for g in groups[: stage.keep_sensitive] for l in g}
    return kept, (f"--keep-sensitive {stage.keep_sensitive}: which groups stay bf16 is measured in the run; "
                  "sizes assume a typical mix")


def linear_output_tensors(recipe, n: int, k: int, dtype_bytes: int) -> dict[str, int]:
    """Bytes of each tensor one quantized Linear [N, K] gets in the checkpoint (see README's format table)."""
    q = recipe.stage(recipe.quantizer)
    fmt = recipe.export.format
    if recipe.quantizer == "fp8":
        b = q.block_size
        blocks = math.ceil(n / b) * math.ceil(k / b)
        if fmt == "hf-fp8":
            return {"weight": n * k, "weight_scale_inv": 4 * blocks}
        scale = {"tensor": 1, "channel": n, "block": blocks}[q.weights] * dtype_bytes
        out = {"weight": n * k, "weight_scale": scale}
        if q.activations == "static":
            out["input_scale"] = dtype_bytes
        return out
    bits, g = q.bits, (k if q.group_size == -1 else q.group_size)
    groups = k // g
    if fmt == "compressed-tensors":
        out = {"weight_packed": 4 * n * math.ceil(k * bits / 32), "weight_scale": dtype_bytes * n * groups,
               "weight_shape": 16}
        if not q.symmetric:
            out["weight_zero_point"] = 4 * math.ceil(n * bits / 32) * groups
        return out
    per_word = 32 // bits if 32 % bits == 0 else 0
    if fmt == "gptq":
        return {"qweight": 4 * math.ceil(k / per_word) * n, "qzeros": 4 * groups * math.ceil(n / per_word),
                "scales": 2 * groups * n, "g_idx": 4 * k}
    return {"qweight": 4 * k * math.ceil(n / 8), "qzeros": 4 * groups * math.ceil(n / 8), "scales": 2 * groups * n}


def _header_bytes(entries: list[tuple[str, int, int]]) -> int:
    """Approximate safetensors header size for (name, ndim, bytes) entries (JSON with shapes and offsets)."""
    total = 8 + 32  # length prefix, {"__metadata__":{"format":"pt"}}
    offset = 0
    for name, ndim, nbytes in entries:
        total += len(name) + 44 + ndim * 6 + 2 * len(str(offset + nbytes))
        offset += nbytes
    return total + 8  # padding to 8 bytes


@dataclass
class OutputSize:
    """The checkpoint's safetensors bytes, split by kind."""

    safetensors_bytes: int
    quantized_bytes: int  # tensors of quantized Linears
    other_bytes: int  # embeddings, norms, lm_head, kept Linears (model dtype)
    header_bytes: int
    tensors: int
    files: int
    quantized_linears: int
    kept_linears: int
    folder_bytes: int  # + config, tokenizer, recipe, report, model card
    note: str = ""


def output_size(recipe, facts: ModelFacts) -> OutputSize:
    """Size of what write_checkpoint writes: quantized Linears per format, everything else in the model dtype,
    a tied lm_head written once (as the embedding)."""
    dt = MODEL_DTYPE_BYTES[recipe.model.dtype]
    kept, note = kept_linears(recipe, facts)
    quantized = {l.name: l for l in facts.linears if l.name not in kept}
    entries: list[tuple[str, int, int]] = []
    q_bytes = other = 0
    for name, t in facts.tensors.items():
        if facts.tied and name == "lm_head.weight":
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in quantized:
            l = quantized[module]
            for local, nbytes in linear_output_tensors(recipe, l.n, l.k, dt).items():
                entries.append((f"{module}.{local}", 2, nbytes))
                q_bytes += nbytes
        else:
            nbytes = t.numel * (dt if t.dtype in ("BF16", "F16", "F32", "F64") else DTYPE_BYTES.get(t.dtype, 2))
            entries.append((name, len(t.shape), nbytes))
            other += nbytes
    shard = recipe.export.max_shard_size_mb * 2**20
    files, current, groups = 1, 0, [[]]
    for e in entries:
        if groups[-1] and current + e[2] > shard:
            groups.append([])
            current = 0
            files += 1
        groups[-1].append(e)
        current += e[2]
    header = sum(_header_bytes(g) for g in groups)
    index = 0 if files == 1 else sum(len(e[0]) + 40 for e in entries)
    total = q_bytes + other + header
    run_files = 200_000  # recipe.yaml, qwenquant_report.json (per-layer reports), REPORT.md, README.md, configs
    return OutputSize(total, q_bytes, other, header, len(entries), files, len(quantized), len(kept),
                      total + index + facts.copied_files_bytes + run_files, note)


# -- memory ---------------------------------------------------------------------------------------------------------


@dataclass
class Traits:
    """How the installed pipeline holds its data (detected, so the estimate follows the code it runs with)."""

    journal: bool  # finished layers' records go to disk (qwenquant/journal.py); otherwise all held until export


def pipeline_traits() -> Traits:
    """Inspect the installed qwenquant: does run_sequential take a journal (records leave memory per layer)?"""
    try:
        from qwenquant.pipeline import run_sequential

        return Traits(journal="journal" in inspect.signature(run_sequential).parameters)
    except Exception:  # pragma: no cover - a broken install fails elsewhere
        return Traits(journal=False)


def record_bytes(recipe, n: int, k: int, dtype_bytes: int) -> int:
    """Host bytes of one QuantizedWeight (qwenquant/quant/records.py): fp8 codes 1 B/weight, INT codes int32."""
    q = recipe.stage(recipe.quantizer)
    if recipe.quantizer == "fp8":
        b = q.block_size
        scales = {"tensor": 1, "channel": n, "block": math.ceil(n / b) * math.ceil(k / b)}[q.weights]
        return n * k + scales * dtype_bytes
    groups = k // (k if q.group_size == -1 else q.group_size)
    g_idx = 4 * k if getattr(q, "actorder", "none") == "group" else 0
    return 4 * n * k + (dtype_bytes + 4) * n * groups + g_idx


def _stage_temp_bytes(recipe, facts: ModelFacts, shape: RunShape, dt: int) -> tuple[int, str]:
    """Largest transient of the recipe's per-layer stages (host when computing on CPU), and what it is."""
    biggest = max(facts.linears, key=lambda l: l.n * l.k) if facts.linears else LinearInfo("", 1, 1, 0, "")
    widest_k = max((l.k for l in facts.linears), default=1)
    layer_params = facts.layer_linear_params(0)
    # a calibration batch of 8 samples through the layer: MLP activations in the model dtype and float32 hooks
    batch = 8 * shape.seq_len * (max(l.n for l in facts.linears) if facts.linears else 1) * (3 * dt + 4)
    base = 3 * 4 * biggest.n * biggest.k  # float32 copies of the weight being quantized
    what = "float32 copies of the largest Linear"
    q = recipe.quantizer
    if q == "gptq":
        base += 5 * 4 * widest_k**2  # Hessian, its damped copy, Cholesky factors, inverse
        what = "GPTQ Hessian and Cholesky factors"
    elif q == "awq":
        t = min(8192, shape.calib_tokens)
        inputs = sum({l.local: l.k for l in facts.linears if l.layer == 0}.values())  # per distinct input width
        base += 4 * t * inputs + 2 * 4 * t * sum(l.n for l in facts.linears if l.layer == 0)
        what = "AWQ sampled inputs and search outputs"
    if recipe.stage("compensate") is not None:
        base += 4 * 4 * layer_params + dt * layer_params
        what += " + compensation's float32 layer copy and gradients"
    return base + batch, what


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


def memory_phases(recipe, facts: ModelFacts, shape: RunShape, out: OutputSize, base_rss: int, traits: Traits,
                  cuda: bool) -> list[Phase]:
    """What each phase of run_recipe holds at its peak (host and, when computing on CUDA, device)."""
    dt = MODEL_DTYPE_BYTES[recipe.model.dtype]
    V, W, T = facts.vocab, shape.window, shape.kl_tokens
    model = facts.params * dt
    logp = 2 * T * V  # next_token_logprobs keeps fp16 [windows, window, vocab] on the host
    # one forward: logits in the model dtype, their float32 copy and the float32 log-softmax
    fwd_temp = (dt + 4 + 4) * W * V
    kl = KL_FLOAT_COPIES * 4 * T * V
    mixed = recipe.stage("mixed_precision") is not None
    records_all = sum(record_bytes(recipe, l.n, l.k, dt) for l in facts.linears)
    per_layer = max((sum(record_bytes(recipe, l.n, l.k, dt) for l in facts.linears if l.layer == i)
                     for i in range(facts.num_layers)), default=0)
    records = per_layer if traits.journal and not mixed else records_all
    cache = 2 * shape.calib_tokens * facts.hidden * dt  # one layer's inputs and its propagated outputs
    temps, temps_what = _stage_temp_bytes(recipe, facts, shape, dt)
    lin = facts.linear_params
    biggest = max((l.n * l.k for l in facts.linears), default=0)
    export_pending = min(out.quantized_bytes, recipe.export.max_shard_size_mb * 2**20) + 3 * 4 * biggest
    rec_name = "records (one layer; the others in the journal)" if records != records_all else "records"
    # transformers memory-maps safetensors whose dtype is the model dtype: those weights are file-backed pages in
    # the RSS. A quantizer gives each Linear a new (dequantized) weight; the mapped original stays resident until
    # the kernel needs the memory (clean page cache: counted in RSS, reclaimable), so the RSS grows by the
    # quantized Linears' size during quantization.
    st_dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[recipe.model.dtype]
    float_dtypes = {t.dtype for t in facts.tensors.values() if t.dtype in ("BF16", "F16", "F32", "F64")}
    kept, _ = kept_linears(recipe, facts)
    copies = dt * sum(l.n * l.k for l in facts.linears if l.name not in kept) if float_dtypes == {st_dtype} else 0
    copies_name = "quantized weights (new copies; the mapped originals stay in the RSS)"
    # on CUDA the model moves to the device for evaluation and verification; the host keeps the rest
    on_host = {"process": base_rss} if cuda else {"process": base_rss, "model": model}
    fwd_host = {} if cuda else {"forward": fwd_temp}
    fwd_dev = {"model": model, "forward": fwd_temp} if cuda else {}
    # peak_device_bytes in the report is torch's max_memory_allocated: the CUDA context itself is not in it
    after = {copies_name: copies} if copies and not cuda else {}  # from the quantize phase on
    phases = [
        Phase("load", {"process": base_rss, "model": model}),
        Phase("eval_source", on_host | {"log-probs (source)": logp} | fwd_host, fwd_dev),
        Phase("quantize", {"process": base_rss, "model": model, "log-probs (source)": logp, rec_name: records,
                           "calibration activations": cache} | after | ({} if cuda else {temps_what: temps}),
              {"layer": facts.layer_linear_params(0) * dt, temps_what: temps} if cuda else {}),
        Phase("eval_quantized", on_host | after | {rec_name: records, "log-probs (source, quantized)": 2 * logp}
              | fwd_host, fwd_dev),
        Phase("export", {"process": base_rss, "model": model, rec_name: records,
                         "log-probs (source, quantized)": 2 * logp, "pending shard": export_pending} | after),
    ]
    if recipe.eval.verify:
        q = recipe.stage(recipe.quantizer)
        from qwenquant.eval.verify import reader_for

        reader = reader_for(recipe.export.format, recipe.quantizer, getattr(q, "symmetric", True))
        common = {"process": base_rss, "model": model, rec_name: records,
                  "log-probs (source, quantized)": 2 * logp} | after
        if reader == "transformers":
            # reloaded: its compressed tensors and the dense weights it computes with; then our float32 copies.
            # `del reloaded` does not free it at once (reference cycles wait for the garbage collector): measured
            # on a 0.6B model, it is still there while the KL statistics run
            reloaded = {"reloaded checkpoint": model + out.quantized_bytes}
            reload = reloaded | {"log-probs (checkpoint)": logp} | ({} if cuda else {"forward": fwd_temp})
            kl_part = reloaded | {"reloaded weights (float32)": 4 * lin, "log-probs (checkpoint)": logp,
                                  "KL statistics": kl}
            phases.append(Phase("verify", common | reload, {"reloaded checkpoint": model, "forward": fwd_temp}
                                if cuda else {}))
            phases.append(Phase("verify (KL)", common | kl_part))
        else:
            read = {"checkpoint tensors": out.safetensors_bytes, "read weights (float32)": 4 * lin,
                    "swapped weights": dt * lin, "log-probs (checkpoint)": logp}
            phases.append(Phase("verify", common | read | ({} if cuda else {"forward": fwd_temp}),
                                {"model": model, "forward": fwd_temp} if cuda else {}))
            phases.append(Phase("verify (KL)", common | {"checkpoint tensors": out.safetensors_bytes,
                                                         "read weights (float32)": 4 * lin,
                                                         "log-probs (checkpoint)": logp, "KL statistics": kl}))
    phases.append(Phase("report", {"process": base_rss, "model": model, rec_name: records,
                                   "log-probs (source, quantized)": 2 * logp, "KL statistics": kl} | after))
    for ph in phases:
        ph.reclaimable = ph.host.get(copies_name, 0)
    return phases


# -- time -----------------------------------------------------------------------------------------------------------


def _layer_input_widths(facts: ModelFacts, layer: int = 0) -> int:
    """Sum over a layer's Linears of their input width: elements the FP8 activation hooks quantize per token."""
    return sum(l.k for l in facts.linears if l.layer == layer)


def _moe_active_fraction(facts: ModelFacts) -> float:
    """Share of a layer's Linear weights a token passes through at inference (1 for dense models)."""
    cfg = facts.config
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    top_k = cfg.get("num_experts_per_tok")
    if not experts or not top_k:
        return 1.0
    total = facts.linear_params or 1
    expert = sum(l.n * l.k for l in facts.linears if ".experts." in l.name)
    return (total - expert + expert * top_k / experts) / total


def time_estimate(recipe, facts: ModelFacts, shape: RunShape, out: OutputSize, probe, traits: Traits) -> dict:
    """Seconds per stage, keyed like the report's timings_s (stages under "stages"), plus startup/report/total."""
    from qwenquant.recipe import stage_name

    L, V, W = facts.num_layers, facts.vocab, shape.window
    probe_layer = max(facts.layer_linear_params(0), 1)
    # the probe measured a dense layer built from the config; scale to this model's average layer
    avg_layer = facts.linear_params / max(L, 1)
    dense_ratio = avg_layer / probe_layer
    tok = probe.layer_s_per_token * dense_ratio  # calibration: every weight (MoE: every expert) sees every token
    tok_eval = tok * _moe_active_fraction(facts)
    act = probe.act_quant_s_per_element * _layer_input_widths(facts)  # per token per layer, quantized runs only

    calls = math.ceil(recipe.calibration.num_samples / CALIB_BATCH)  # forward calls per pass over the calibration set

    def layer_fwd(tokens: int, seq: int, quantized_acts: bool = False) -> float:
        """One decoder layer over the calibration set (batches of 8 samples)."""
        per_token = tok + probe.attn_s_per_token2 * seq + (act if quantized_acts else 0.0)
        return calls * probe.layer_s_per_call + tokens * per_token

    def model_fwd(quantized_acts: bool) -> float:  # one evaluation window, with its log-softmax
        per_layer = probe.layer_s_per_call + W * (tok_eval + probe.attn_s_per_token2 * W + (act if quantized_acts else 0.0))
        return L * per_layer + W * probe.lm_head_s_per_token + W * V * probe.logits_s_per_element

    windows = shape.ppl_windows + shape.kl_windows
    T, S = shape.calib_tokens, shape.seq_len
    fp32 = probe.fp32_gflops * 1e9
    n_weights = sum(l.n * l.k for l in facts.linears)
    n_linears = len(facts.linears)
    quant = n_weights * probe.quant_s_per_weight + n_linears * probe.quant_s_per_linear  # one pass of the quantizer
    stages: dict[str, float] = {}
    calibrated = T > 0
    if calibrated:
        stages["capture"] = 0.02 + T * facts.hidden * 2e-9
    for s in recipe.stages:
        name = stage_name(s)
        if name == "mixed_precision":
            stages[name] = 0.0
        elif name == "smooth":
            stages[name] = L * layer_fwd(T, S) + 0.2 * quant
        elif name == "fp8":
            t = quant
            if s.activations == "static":
                t += L * layer_fwd(T, S)
            if s.clip_search:  # forward for inputs, then ~9 candidate ratios per Linear on <= 4096 tokens
                t += L * layer_fwd(T, S) + 9 * (quant + 2 * min(T, 4096) * n_weights / fp32)
            stages[name] = t
        elif name == "rtn":
            stages[name] = quant
        elif name == "gptq":
            # per group of Linears sharing an input (q/k/v, o, gate/up, down): a Hessian over the calibration
            # tokens, one factorisation, one column loop over the stacked rows and the lazy block updates; the
            # observation forwards stop early and reuse attention outputs: about one layer forward in all
            groups = facts.groups or [[l] for l in facts.linears]
            t = L * layer_fwd(T, S) + quant
            for g in groups:
                k, rows = g[0].k, sum(l.n for l in g)
                t += 2 * T * k * k / fp32 + (1.3 * k**3 + rows * k * k) / fp32
                t += k * (probe.gptq_s_per_column + probe.gptq_s_per_column_row * rows)
            stages[name] = t
        elif name == "awq":
            ta = min(8192, T)
            mappings = [("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                        ("gate_up", ("mlp.gate_proj", "mlp.up_proj")), ("down", ("mlp.down_proj",))]
            if not s.norm_mappings:
                mappings = mappings[1:]
            cfg = facts.config
            if cfg.get("num_attention_heads") == cfg.get("num_key_value_heads"):  # v -> o only without GQA
                mappings.append(("o", ("self_attn.o_proj",)))
            search = 0.0
            by_local = {(l.layer, l.local): l for l in facts.linears}
            for i in range(L):
                for _, members in mappings:
                    ls = [by_local[(i, m)] for m in members if (i, m) in by_local]
                    search += s.n_grid * sum(2 * ta * l.n * l.k / fp32 + l.n * l.k * probe.quant_s_per_weight
                                             + probe.quant_s_per_linear for l in ls)
            clip = n_weights * probe.awq_clip_s_per_weight if s.clip else 0.0
            stages[name] = L * layer_fwd(T, S) + search + clip + quant
        elif name == "compensate":
            fwd32 = 2.5 * tok  # float32 functional_call forward vs the model dtype
            per_layer = (3 * s.samples + 3 * s.steps * s.batch_size) * S * (fwd32 + probe.attn_s_per_token2 * S)
            stages[name] = L * per_layer + s.steps * quant
    fp8 = recipe.stage("fp8")
    act_q = fp8 is not None and fp8.activations != "none"
    if calibrated:
        stages["propagate"] = L * layer_fwd(T, S, act_q)
    if traits.journal and recipe.stage("mixed_precision") is None:
        dt = MODEL_DTYPE_BYTES[recipe.model.dtype]
        journal_bytes = sum(record_bytes(recipe, l.n, l.k, dt) for l in facts.linears) + L * T * facts.hidden * dt
        stages["journal"] = journal_bytes / JOURNAL_BPS
    timings: dict = {
        "startup": STARTUP_S,
        "load": LOAD_S + facts.source_bytes / LOAD_BPS + facts.params * probe.isfinite_s_per_weight,
        "calibration_data": (0.1 + T * TOKENIZE_S_PER_TOKEN) if calibrated else 0.0,
        "eval_source": windows * model_fwd(False),
        "quantize": sum(stages.values()),
        "eval_quantized": windows * model_fwd(act_q),
        "export": 0.5 + n_weights * probe.export_s_per_weight + out.safetensors_bytes / DISK_WRITE_BPS,
    }
    if recipe.eval.verify:
        timings["verify"] = (LOAD_S + out.safetensors_bytes / DISK_READ_BPS + n_weights * probe.export_s_per_weight
                             + shape.kl_windows * model_fwd(act_q) + 2 * shape.kl_tokens * V * probe.kl_s_per_element
                             + n_weights * 4e-9)
    timings["report"] = shape.kl_tokens * V * probe.kl_s_per_element + facts.source_bytes / HASH_BPS + 0.3
    timings["stages"] = stages  # (mixed precision's sensitivity ranking and `auto` candidates are not modelled)
    timings["total"] = sum(v for k, v in timings.items() if isinstance(v, float))
    return timings


# -- availability -----------------------------------------------------------------------------------------------------


def available_host_bytes() -> tuple[int | None, str]:
    """(bytes available for a new process, where the number comes from): MemAvailable, or a lower cgroup limit."""
    avail, source = None, "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail, source = int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max" and (avail is None or int(limit) - used < avail):
            avail, source = int(limit) - used, "cgroup memory.max - memory.current"
    except (OSError, ValueError):
        pass
    return avail, source


def available_device_bytes(device) -> int | None:
    """Free memory of a CUDA device now (None for CPU)."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def free_disk_bytes(out: Path) -> tuple[int, Path]:
    """Free bytes on the filesystem that will hold --out (its first existing ancestor)."""
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    return shutil.disk_usage(parent).free, parent


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the estimate ---------------------------------------------------------------------------------------------------


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

    @property
    def ok(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return {"ok": self.ok, "dry_run": True} | asdict(self)

    def error_line(self) -> str:
        return "; ".join(self.reasons) + " (estimated by --dry-run; nothing was loaded or written)"


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f} GiB"


def build_estimate(recipe, facts: ModelFacts, shape: RunShape, probe, device, base_rss: int,
                   available_host: tuple[int | None, str], available_device: int | None,
                   disk_free: tuple[int, Path], traits: Traits) -> Estimate:
    """Combine sizes, memory phases and times into an Estimate and decide whether the run fits."""
    cuda = getattr(device, "type", "cpu") == "cuda"
    out = output_size(recipe, facts)
    phases = memory_phases(recipe, facts, shape, out, base_rss, traits, cuda)
    peak = max(phases, key=lambda p: p.host_total)
    need = max(p.host_total - p.reclaimable for p in phases)  # what must fit: RSS minus droppable page cache
    dev_peak = max(phases, key=lambda p: p.device_total) if cuda else None
    timings = time_estimate(recipe, facts, shape, out, probe, traits)
    dt = MODEL_DTYPE_BYTES[recipe.model.dtype]
    journal = 0
    if traits.journal and recipe.stage("mixed_precision") is None:
        journal = (sum(record_bytes(recipe, l.n, l.k, dt) for l in facts.linears)
                   + shape.calib_tokens * facts.hidden * dt + 2 * shape.kl_tokens * facts.vocab)
    disk_need = out.folder_bytes + journal
    host_avail, host_src = available_host
    reasons = []
    if host_avail is not None and need > host_avail:
        big = max(peak.host.items(), key=lambda kv: kv[1])
        reasons.append(f"estimated peak host memory {_gib(need)} (during {peak.name}; largest part: {big[0]} "
                       f"{_gib(big[1])}) exceeds the {_gib(host_avail)} available ({host_src})")
    if cuda and available_device is not None and dev_peak.device_total > available_device:
        reasons.append(f"estimated peak device memory {_gib(dev_peak.device_total)} (during {dev_peak.name}) exceeds "
                       f"the {_gib(available_device)} free on {device}")
    if disk_need > disk_free[0]:
        reasons.append(f"the output needs about {_gib(disk_need)} on disk but {disk_free[1]} has {_gib(disk_free[0])} free")
    notes = [n for n in (out.note, shape.text_note) if n]
    stage = recipe.stage("mixed_precision")
    if stage is not None and stage.keep is None:
        notes.append("mixed precision: measuring sensitivity (and each `auto` candidate run) is not in the time estimate")
    if recipe.stage("compensate") is not None or any(getattr(s, "clip_search", False) or getattr(s, "alpha_search", False)
                                                     for s in recipe.stages):
        notes.append("compensation / scale search times are rough (modelled from layer forwards, not probed)")
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
    q = recipe.stage(recipe.quantizer)
    scheme = recipe.quantizer
    if recipe.quantizer == "fp8":
        scheme += f" weights={q.weights} activations={q.activations}"
    else:
        scheme += f" w{q.bits} g{q.group_size} {'sym' if q.symmetric else 'asym'}"
    return Estimate(
        model={"reference": facts.reference, "path": facts.path, "architecture": facts.architecture,
               "num_layers": facts.num_layers, "parameters": facts.params, "source_bytes": facts.source_bytes,
               "dtype": recipe.model.dtype, "tied_embeddings": facts.tied, "vocab_size": facts.vocab},
        recipe={"stages": [type(s).__name__ for s in recipe.stages], "scheme": scheme,
                "format": recipe.export.format, "device": str(device)},
        run={"calibration_tokens": shape.calib_tokens, "seq_len": shape.seq_len, "eval_window": shape.window,
             "ppl_windows": shape.ppl_windows, "kl_tokens": shape.kl_tokens, "eval_text_tokens": shape.text_tokens,
             "verify": recipe.eval.verify, "records_in_journal": traits.journal and stage is None},
        sizes={"output_bytes": out.safetensors_bytes, "folder_bytes": out.folder_bytes,
               "quantized_tensor_bytes": out.quantized_bytes, "other_tensor_bytes": out.other_bytes,
               "header_bytes": out.header_bytes, "tensors": out.tensors, "files": out.files,
               "quantized_linears": out.quantized_linears, "kept_linears": out.kept_linears,
               "source_bytes": facts.source_bytes,
               "ratio": out.safetensors_bytes / facts.source_bytes if facts.source_bytes else None},
        memory={"peak_host_bytes": peak.host_total, "peak_host_phase": peak.name, "peak_host_breakdown": peak.host,
                "reclaimable_at_peak_bytes": peak.reclaimable, "needed_host_bytes": need,
                "host_phases": {p.name: p.host_total for p in phases},
                "available_host_bytes": host_avail, "available_host_source": host_src,
                "peak_device_bytes": dev_peak.device_total if cuda else None,
                "peak_device_phase": dev_peak.name if cuda else None,
                "peak_device_breakdown": dev_peak.device if cuda else None,
                "available_device_bytes": available_device, "device": str(device)},
        disk={"need_bytes": disk_need, "journal_bytes": journal, "free_bytes": disk_free[0], "path": str(disk_free[1])},
        timings_s=timings,
        fits={"host": host_avail is None or need <= host_avail,
              "device": (dev_peak.device_total <= available_device) if cuda and available_device is not None else None,
              "disk": disk_need <= disk_free[0]},
        reasons=reasons,
        notes=notes,
        probe=probe.to_dict(),
    )


def estimate_run(recipe, out: Path, overwrite: bool = False) -> Estimate:
    """The --dry-run of `run_recipe(recipe, out)`: the same checks before any work, then the estimate.

    Reads config.json, the safetensors headers and the tokenizer/evaluation text; writes nothing; downloads
    nothing (a hub id must be in the local cache)."""
    from qwenquant.export.writer import check_output_dir
    from qwenquant.mixed_precision import check_mixed_precision
    from qwenquant.model.loader import DTYPES, resolve_model
    from qwenquant.probe import run_probe
    from qwenquant.run import check_layout, check_not_source, needs_calibration, resolve_device

    out = Path(out)
    check_output_dir(out, overwrite)
    device = resolve_device(recipe.device)
    resolved = resolve_model(recipe.model.id, recipe.model.revision, download=False)
    check_not_source(out, resolved.path)
    check_layout(recipe, resolved.config)
    check_mixed_precision(recipe, resolved.adapter, resolved.config)
    facts = model_facts(resolved)
    if not facts.linears:
        raise BadInputError(f"--model {recipe.model.id}: no decoder Linear weights found in the safetensors headers")
    import compressed_tensors  # noqa: F401  (the run's imports, so the baseline RSS below includes them)
    import transformers.models.qwen3.modeling_qwen3  # noqa: F401

    base_rss = current_rss_bytes() + PROCESS_BASE_EXTRA
    text_tokens, note = eval_tokens(recipe.eval.eval_text, resolved.path)
    window = min(recipe.eval.window, facts.max_positions)
    if text_tokens < window and not note:  # counted exactly (a short text): the run would stop here
        raise BadInputError(f"evaluation text has {text_tokens} tokens, fewer than one window of {window}")
    shape = run_shape(recipe, facts, text_tokens, needs_calibration(recipe), note)
    probe = run_probe(facts.config, recipe, device, DTYPES[recipe.model.dtype], shape.calib_tokens or 2048,
                      shape.window, shape.seq_len)
    return build_estimate(recipe, facts, shape, probe, device, base_rss, available_host_bytes(),
                          available_device_bytes(device), free_disk_bytes(out), pipeline_traits())


# -- printing -------------------------------------------------------------------------------------------------------


def _secs(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def print_estimate(est: Estimate, console=None) -> None:
    """Rich tables for people: sizes, memory (with the peak phase's parts), disk, time per stage, verdict."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m, s, d, t = est.memory, est.sizes, est.disk, est.timings_s
    console.print(f"[bold]qwenquant --dry-run[/bold]: {est.model['reference']} ({est.model['architecture']}, "
                  f"{est.model['num_layers']} layers, {est.model['parameters'] / 1e9:.3f}B parameters, "
                  f"{est.model['dtype']}) -> {est.recipe['scheme']}, {est.recipe['format']}, on {est.recipe['device']}")
    table = Table(title="resources (estimated before loading any weight)", show_lines=False)
    table.add_column("what")
    table.add_column("estimate", justify="right")
    table.add_column("available / detail")
    mark = {True: "[green]fits[/green]", False: "[red]does not fit[/red]", None: ""}
    table.add_row("output safetensors", _gib(s["output_bytes"]),
                  f"{s['quantized_linears']} quantized Linears, {s['kept_linears']} kept; x{s['ratio']:.3f} of the source")
    reclaim = (f"; {_gib(m['reclaimable_at_peak_bytes'])} of it clean mapped weights the kernel can drop"
               if m["reclaimable_at_peak_bytes"] else "")
    table.add_row("peak host memory (RSS)", _gib(m["peak_host_bytes"]),
                  f"{_gib(m['available_host_bytes'])} {m['available_host_source']} {mark[est.fits['host']]}; "
                  f"during {m['peak_host_phase']}{reclaim}")
    for part, nbytes in sorted(m["peak_host_breakdown"].items(), key=lambda kv: -kv[1]):
        table.add_row(f"  {part}", _gib(nbytes), "")
    if m["peak_device_bytes"] is not None:
        table.add_row("peak device memory", _gib(m["peak_device_bytes"]),
                      f"{_gib(m['available_device_bytes'])} free {mark[est.fits['device']]}; during {m['peak_device_phase']}")
    else:
        table.add_row("peak device memory", "-", "computing on the CPU: device memory is host memory")
    table.add_row("disk", _gib(d["need_bytes"]), f"{_gib(d['free_bytes'])} free at {d['path']} {mark[est.fits['disk']]}")
    console.print(table)
    times = Table(title=f"time (calibrated by a {est.probe['seconds']:.1f} s probe, {est.probe['threads']} threads)")
    times.add_column("stage")
    times.add_column("estimate", justify="right")
    for k, v in t.items():
        if k == "stages":
            for sk, sv in v.items():
                times.add_row(f"  quantize: {sk}", _secs(sv))
        elif k != "total":
            times.add_row(k, _secs(v))
    times.add_row("[bold]total[/bold]", f"[bold]{_secs(t['total'])}[/bold]")
    console.print(times)
    for note in est.notes:
        console.print(f"note: {note}", highlight=False)
    if est.ok:
        console.print("[green]fits[/green]: run the same command without --dry-run")
    else:
        for r in est.reasons:
            console.print(f"[red]does not fit[/red]: {r}", highlight=False)


def fits_or_raise(est: Estimate) -> None:
    """Exit 5 with a one-line error when the run would not fit (the estimate is attached for --json)."""
    if not est.ok:
        err = ResourceError(est.error_line())
        err.details = est.to_dict()
        raise err
