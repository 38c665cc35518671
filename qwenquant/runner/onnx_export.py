"""`qwenquant export onnx DIR`: an ONNX model for onnxruntime (CPU, CUDA, DirectML, or the QDQ form NPU tool chains
take) from a qwenquant GPTQ/AWQ output folder (its codes carried into MatMulNBits) or from an unquantized Qwen3
folder (float32, or onnxruntime's own round-to-nearest), built by onnxruntime-genai's model builder
(qwenquant/export/onnx_build.py), verified in onnxruntime (qwenquant/eval/onnx_verify.py) and written atomically
with its report: a failed build leaves no output folder, a failed verification exits 4 with the folder kept.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenquant.device import resolve_device
from qwenquant.errors import BadInputError, VerificationError
from qwenquant.eval.onnx_verify import verify_onnx
from qwenquant.eval.perplexity import eval_windows, load_eval_text, next_token_logprobs
from qwenquant.eval.precision import evaluation_precision
from qwenquant.export import onnx_build
from qwenquant.export.writer import atomic_output_dir, check_output_dir
from qwenquant.kernels.checkpoint_records import record_from_tensors
from qwenquant.model.qwen3 import linear_shapes
from qwenquant.reporting import environment_versions, report_header, write_atomic, write_json
from qwenquant.runner.export_input import REPORT_JSON, REPORT_MD, read_folder, source_folder

BUILDER_LOG = "builder.log"


@dataclass
class ONNXExportRequest:
    folder: Path
    out: Path
    precision: str | None = None  # int4 | int8 | fp32; None: the folder's bits (int4 for an unquantized folder)
    ep: str = "cpu"  # cpu | cuda | dml: the execution provider the builder targets
    qdq: bool = False  # QuantizeLinear/DequantizeLinear + MatMul instead of MatMulNBits (NPU tool chains)
    group_size: int | None = None  # block of the builder's own quantizer (unquantized folder); None: 32
    accuracy_level: int | None = None  # MatMulNBits compute type 0-4; None: the builder's (4 = int8 on CPU)
    source: Path | None = None  # the bf16 model a quantized folder came from (KL reference)
    eval_text: str = "wikitext2"
    window: int = 512
    kl_tokens: int = 2048
    verify: bool = True
    verify_max_kl: float = 0.5
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in onnx_build.PRECISIONS:
            raise BadInputError(f"--precision {self.precision}: choose one of {', '.join(onnx_build.PRECISIONS)}")
        if self.ep not in onnx_build.EPS:
            raise BadInputError(f"--ep {self.ep}: choose one of {', '.join(onnx_build.EPS)}")
        for key in ("window", "kl_tokens"):
            if int(getattr(self, key)) <= 0:
                raise BadInputError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        if not self.verify_max_kl > 0:
            raise BadInputError(f"--verify-max-kl must be positive, got {self.verify_max_kl}")


def _linear_names(config: dict) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(int(config["num_hidden_layers"])) for n in linear_shapes(config)]


def our_weights(config: dict, tensors: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """{Linear: float32 (q - z) * s} from a GPTQ/AWQ folder's records (the kernels' checkpoint reader)."""
    qconfig, out = config["quantization_config"], {}
    for n in names:
        local = {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}
        try:
            rec = record_from_tensors(local, qconfig, n)
        except ValueError as err:
            raise BadInputError(f"cannot read {n}: {err}") from None
        if rec is not None and rec.g_idx is not None:
            raise BadInputError(f"{n}: act-order groups (g_idx) cannot go into MatMulNBits blocks; quantize with "
                                "--act-order static or none")
        if rec is not None:
            out[n] = rec.dequantize(torch.float32)
    return out


@torch.no_grad()
def _verify(request: ONNXExportRequest, tmp: Path, names: list[str], expected, quantized: bool, tokenizer,
            tensors: dict) -> dict:
    from transformers import AutoModelForCausalLM

    device = resolve_device(request.device)
    src = source_folder(request.folder, request.source, quantized)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    text, _ = load_eval_text(request.eval_text)
    windows = eval_windows(tokenizer, text, request.window, math.ceil(request.kl_tokens / request.window))
    with evaluation_precision(model, device):
        model.to(device)
        src_logp = next_token_logprobs(model, windows, device)
    if quantized:  # the folder's own float tensors (AWQ folds its scales into the norms), then its Linears swapped in
        params = dict(model.named_parameters())
        for key, t in tensors.items():
            if key in params and key.rsplit(".", 1)[0] not in expected:
                params[key].data = t.to(torch.float32).to(params[key].device)
    result = verify_onnx(tmp, model, names, expected, tokenizer, windows, src_logp, device, request.verify_max_kl,
                         onnx_build.builder_versions(), request.ep)
    model.to("cpu")
    return result | {"source": str(src), "windows": {"text": request.eval_text, "window": request.window,
                                                     "windows": int(windows.shape[0])}}


def export_onnx(request: ONNXExportRequest, command: str = "", log=lambda msg: None) -> dict:
    """Write `request.out` (model.onnx + data, genai_config.json, tokenizer, builder.log, qwenquant_report.json,
    REPORT.md) atomically; raise VerificationError (exit 4, folder kept) when onnxruntime disagrees with the
    source beyond the threshold."""
    from transformers import AutoTokenizer

    started = time.time()
    folder = Path(request.folder)
    check_output_dir(request.out, request.overwrite)
    config, tensors = read_folder(folder)
    plan = onnx_build.plan_build(config, request.precision, request.ep, request.qdq, request.group_size,
                                 request.accuracy_level)
    onnx_build.require_packages()
    names = _linear_names(config)
    expected = our_weights(config, tensors, names) if plan.quantized_input else None
    if request.verify and plan.quantized_input:
        source_folder(request.folder, request.source, True)  # refused before the build when there is no reference
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with atomic_output_dir(request.out, request.overwrite) as tmp:
        log(f"building {plan.precision}{' QDQ' if plan.qdq else ''} for {plan.ep} ({plan.codes})")
        onnx_build.run_builder(folder, tmp, plan, tmp / BUILDER_LOG)
        verification = None
        if request.verify:
            log("verifying in onnxruntime (weights read back, KL on held-out text, greedy chat prompts)")
            verification = _verify(request, tmp, names, expected, plan.quantized_input, tokenizer, tensors)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        report = report_header(1, command=command, started=started, kind="export-onnx") | {
            "input": str(folder), "codes": plan.codes,
            "onnx": {"precision": plan.precision, "execution_provider": plan.ep, "qdq": plan.qdq,
                     "builder_options": plan.options, "builder": "onnxruntime_genai.models.builder"},
            "verification": verification,
            "sizes": {"input_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                      "output_bytes": files.get("model.onnx", 0) + files.get("model.onnx.data", 0)},
            "seconds": round(time.time() - started, 1),
            "environment": environment_versions() | onnx_build.builder_versions()}
        write_json(tmp / REPORT_JSON, report)
        write_atomic(tmp / REPORT_MD, render(report))
    if verification is not None and not verification["passed"]:
        raise VerificationError(f"verification failed: {verification['reason']}; the folder {request.out} was "
                                "written with its report for inspection")
    return report


def render(report: dict) -> str:
    o, v = report["onnx"], report["verification"]
    lines = [f"# ONNX export of {report['input']}", "",
             f"Created {report['created']} by qwenquant {report['qwenquant_version']}: `{report['command']}`", "",
             f"Built by onnxruntime-genai's model builder {report['environment'].get('onnxruntime-genai')}: "
             f"{o['precision']}{' QDQ' if o['qdq'] else ''} for the {o['execution_provider']} execution provider "
             f"(options {json.dumps(o['builder_options'])}).", f"Weights: {report['codes']}.",
             f"Size: {report['sizes']['output_bytes'] / 2**20:.1f} MiB (input {report['sizes']['input_bytes'] / 2**20:.1f} MiB).",
             "", "## Verification", ""]
    if v is None:
        lines.append("Skipped (--no-verify).")
        return "\n".join(lines) + "\n"
    w, r = v["weights"], v["runtime"]
    dev = next((f"{k.replace('_', ' ')} {val:.3g}" for k, val in w.items() if k.startswith("max_abs")), "")
    lines += [f"{v['loader']}: **{'PASSED' if v['passed'] else 'FAILED: ' + v['reason']}** (source {v['source']}).",
              f"- weights: {w['checked']} Linears read back ({', '.join(w['stored_as'])}), compared with "
              f"{w['compared_with']}: {len(w['mismatched'])} differ; {dev}"]
    if not r["available"]:
        lines += [f"- the read-back weights in transformers vs source: mean KL "
                  f"{v['readback_in_transformers_vs_source']['mean_kl']:.5f}", f"- {r['reason']}"]
        return "\n".join(lines) + "\n"
    lines += [f"- onnxruntime vs source: mean KL {r['vs_source']['mean_kl']:.5f} nats (threshold "
              f"{v['threshold_mean_kl_vs_source']}), top-1 agreement {100 * r['vs_source']['top1_agreement']:.2f}% "
              f"on {r['vs_source']['tokens']} tokens",
              f"- the read-back weights in transformers vs source: mean KL "
              f"{v['readback_in_transformers_vs_source']['mean_kl']:.5f}; onnxruntime vs them: "
              f"{r['vs_readback_in_transformers']['mean_kl']:.2e} (the runtime's own arithmetic)",
              f"- greedy chat prompts (onnxruntime-genai vs transformers): {r['greedy']['prompts_identical']} of "
              f"{len(r['greedy']['prompts'])} identical, {100 * r['greedy']['token_agreement']:.1f}% of tokens "
              "before the first difference"]
    return "\n".join(lines) + "\n"
