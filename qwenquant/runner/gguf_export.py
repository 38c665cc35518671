"""`qwenquant export gguf DIR`: a GGUF file from a qwenquant INT output folder (its codes carried as they are) or
from a bf16 source (round-to-nearest, group 32, to the requested type), verified like a run's GGUF export
(qwenquant/eval/gguf_verify.py) and written atomically with its report.

Input folders: compressed-tensors pack-quantized, GPTQ v1 or AWQ GEMM checkpoints with group size 32 and
contiguous groups (their records are read back with the kernels' checkpoint reader), or an unquantized Qwen3
folder. K-quants (q4_k_m, q5_k_m, q6_k) come from llama.cpp's own quantizer on a bf16 folder, weighted by an
importance matrix from calibration text (qwenquant/runner/gguf_kquant.py). Verification measures KL against the bf16 model the checkpoint came from: the input itself for a bf16
source; for a quantized folder, `--source` or the source its qwenquant_report.json names.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenquant.device import resolve_device
from qwenquant.errors import BadInputError, VerificationError
from qwenquant.eval.gguf_verify import transformers_greedy, verify_gguf
from qwenquant.eval.perplexity import eval_windows, load_eval_text, next_token_logprobs
from qwenquant.eval.precision import evaluation_precision
from qwenquant.export.format_spec import UnstorableRecord
from qwenquant.export.gguf import FILE_NAME, write_gguf
from qwenquant.export.gguf_blocks import TYPE_OF, TYPES
from qwenquant.export.gguf_kquant import KQUANT_TYPES
from qwenquant.export.gguf_meta import arch_of, num_experts
from qwenquant.export.writer import atomic_output_dir, check_output_dir
from qwenquant.kernels.checkpoint_records import checkpoint_format, record_from_tensors
from qwenquant.model.moe import unfuse_model
from qwenquant.model.qwen3 import adapter_for, linear_shapes
from qwenquant.quant import intq
from qwenquant.recipe import CalibrationConfig
from qwenquant.reporting import environment_versions, report_header, write_atomic, write_json
from qwenquant.runner.export_input import REPORT_JSON, REPORT_MD, read_folder, source_folder
from qwenquant.runner.gguf_kquant import check_kquant_source, write_kquant

@dataclass
class GGUFExportRequest:
    folder: Path
    out: Path
    type: str | None = None  # q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | q4_k_m | q5_k_m | q6_k; None: the folder's codes'
    imatrix: bool = True  # K-quants: weight llama.cpp's quantizer by an importance matrix from `calibration`
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    source: Path | None = None  # the bf16 model a quantized folder came from (KL reference)
    eval_text: str = "wikitext2"
    window: int = 512
    kl_tokens: int = 2048
    verify: bool = True
    verify_max_kl: float = 0.5
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.type is not None and self.type.upper() not in (*TYPES, *KQUANT_TYPES):
            raise BadInputError(f"--type {self.type}: choose one of "
                                f"{', '.join(t.lower() for t in (*TYPES, *KQUANT_TYPES))}")
        for key in ("window", "kl_tokens"):
            if int(getattr(self, key)) <= 0:
                raise BadInputError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        if not self.verify_max_kl > 0:
            raise BadInputError(f"--verify-max-kl must be positive, got {self.verify_max_kl}")


def _linear_names(config: dict) -> list[str]:
    adapter = adapter_for((config.get("architectures") or [""])[0])
    if adapter is None:
        raise BadInputError(f"GGUF export supports Qwen3ForCausalLM, not {(config.get('architectures') or ['?'])[0]}")
    experts = range(num_experts(config))  # "*" stands for every expert (GGUF qwen3moe: every layer sparse)
    return [f"{adapter.layers_path}.{i}.{m}" for i in range(int(config["num_hidden_layers"]))
            for n in linear_shapes(config) for m in ([n.replace("*", str(e)) for e in experts] if "*" in n else [n])]


def records_and_items(config: dict, tensors: dict, qtype: str | None) -> tuple[dict, list, str]:
    """(records by Linear name, (state-dict key, tensor) items, how the codes were obtained)."""
    arch_of(config)  # Qwen3 dense only, refused before any work
    qconfig = config.get("quantization_config")
    try:
        fmt = checkpoint_format(qconfig)
    except ValueError as err:
        raise BadInputError(f"cannot read this checkpoint: {err}") from None
    names, records = _linear_names(config), {}
    if fmt == "bf16":
        bits, sym = next(k for k, t in TYPE_OF.items() if t == (qtype or "Q8_0"))
        for n in names:
            w = tensors[n + ".weight"]
            records[n] = intq.quantize_rtn(w.float(), bits, 32, sym, scale_dtype=w.dtype)
        how = f"round-to-nearest from the bf16 weights, {bits} bits, group 32, {'symmetric' if sym else 'asymmetric'}"
    else:
        for n in names:
            local = {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}
            try:
                rec = record_from_tensors(local, qconfig, n)
            except ValueError as err:
                raise BadInputError(f"cannot read {n}: {err}") from None
            if rec is not None and rec.kind != "int":
                raise BadInputError(f"{n} holds {rec.kind} weights; GGUF block types hold INT codes (gptq/awq/rtn "
                                    "outputs with --group-size 32)")
            if rec is not None:
                records[n] = rec
        how = f"codes read from the {fmt} checkpoint as they are"
    items, seen = [], set()
    for key, t in tensors.items():  # the folder's order; a quantized Linear's tensors become its one weight
        module = key.rsplit(".", 1)[0]
        if module not in records:
            items.append((key, t))
        elif module not in seen:
            seen.add(module)
            items.append((module + ".weight", None))
    return records, items, how


@torch.no_grad()
def _verify(request: GGUFExportRequest, path: Path, records: dict, quantized: bool, tokenizer,
            names: list[str]) -> dict:
    from transformers import AutoModelForCausalLM

    device = resolve_device(request.device)
    src = source_folder(request.folder, request.source, quantized)
    model = unfuse_model(AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval())  # experts by name
    text, _ = load_eval_text(request.eval_text)
    windows = eval_windows(tokenizer, text, request.window, math.ceil(request.kl_tokens / request.window))
    with evaluation_precision(model, device):
        model.to(device)
        src_logp = next_token_logprobs(model, windows, device)
    src_greedy = transformers_greedy(model, tokenizer, device)  # llama.cpp's answers are compared with these
    model.to(device)
    for n, rec in records.items():  # the model computes with our dequantized weights, as a run's model does
        lin = model.get_submodule(n)
        lin.weight.data = rec.dequantize(torch.float32).to(lin.weight.dtype).to(lin.weight.device)
    with evaluation_precision(model, device):
        q_logp = next_token_logprobs(model, windows, device)
    model.to("cpu")
    result = verify_gguf(path, model, names, tokenizer, windows, src_logp, q_logp, device,
                         request.verify_max_kl, src_greedy, requantized=request.type is not None
                         and request.type.upper() in KQUANT_TYPES)
    return result | {"source": str(src), "windows": {"text": request.eval_text, "window": request.window,
                                                     "windows": int(windows.shape[0])}}


def export_gguf(request: GGUFExportRequest, command: str = "", log=lambda msg: None) -> dict:
    """Write `request.out` (model.gguf + qwenquant_report.json + REPORT.md) atomically; raise VerificationError
    (exit 4, folder kept) when the file disagrees with the source beyond the threshold."""
    from transformers import AutoTokenizer

    started = time.time()
    folder = Path(request.folder)
    check_output_dir(request.out, request.overwrite)
    config, tensors = read_folder(folder)
    qtype = request.type.upper() if request.type else None
    kquant = qtype in KQUANT_TYPES
    if kquant:
        arch_of(config)
        check_kquant_source(config, qtype, request.imatrix)
        records, names = {}, [*_linear_names(config), "model.embed_tokens"]  # llama.cpp quantizes the table too
    else:
        records, items, how = records_and_items(config, tensors, qtype)
        names = list(records)
    quantized = bool(config.get("quantization_config"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    imatrix = None
    with atomic_output_dir(request.out, request.overwrite) as tmp:
        if kquant:
            written, how, imatrix = write_kquant(tmp / FILE_NAME, folder, config, tensors, tokenizer, qtype,
                                                 request.calibration if request.imatrix else None, log)
        else:
            log(f"writing {FILE_NAME} ({how})")
            try:
                written = write_gguf(tmp / FILE_NAME, config, tokenizer, items, records, qtype, name=folder.name)
            except (ValueError, UnstorableRecord) as err:
                raise BadInputError(f"GGUF export: {err}") from None
        verification = None
        if request.verify:
            log("verifying (gguf-py read-back, llama.cpp when installed)")
            verification = _verify(request, tmp / FILE_NAME, records, quantized, tokenizer, names)
        report = report_header(1, command=command, started=started, kind="export-gguf") | {
            "input": str(folder), "codes": how, "gguf": written, "importance_matrix": imatrix,
            "verification": verification,
            "sizes": {"input_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                      "output_bytes": (tmp / FILE_NAME).stat().st_size},
            "seconds": round(time.time() - started, 1), "environment": environment_versions()}
        write_json(tmp / REPORT_JSON, report)
        write_atomic(tmp / REPORT_MD, render(report))
    if verification is not None and not verification["passed"]:
        raise VerificationError(f"verification failed: {verification['reason']}; the folder {request.out} was "
                                "written with its report for inspection")
    return report


def render(report: dict) -> str:
    from qwenquant.report import runtime_lines

    g, v = report["gguf"], report["verification"]
    lines = [f"# GGUF export of {report['input']}", "", f"Created {report['created']} by qwenquant "
             f"{report['qwenquant_version']}: `{report['command']}`", "", f"Codes: {report['codes']}.",
             f"Tensors: {', '.join(f'{n} {t}' for t, n in g['tensor_types'].items())}"
             + (f"; float16 rounded {g['fp16_rounding']['mins_rounded']} of {g['fp16_rounding']['minima']} block "
                f"minima (max change {g['fp16_rounding']['max_min_deviation']:.3g})."
                if g["fp16_rounding"]["minima"] else "."),
             f"Size: {report['sizes']['output_bytes'] / 2**20:.1f} MiB (input {report['sizes']['input_bytes'] / 2**20:.1f} MiB).",
             "", "## Verification", ""]
    if v is None:
        lines.append("Skipped (--no-verify).")
    else:
        lines.append(f"{v['loader']}: **{'PASSED' if v['passed'] else 'FAILED: ' + v['reason']}** (source {v['source']}).")
        lines.append(f"- vs source: mean KL {v['vs_source']['mean_kl']:.5f} nats (threshold "
                     f"{v['threshold_mean_kl_vs_source']}), top-1 agreement {100 * v['vs_source']['top1_agreement']:.2f}%")
        lines += ["- " + line.strip() for line in runtime_lines(v["runtime"]) if line]
    return "\n".join(lines) + "\n"
