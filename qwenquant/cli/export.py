"""`qwenquant export gguf DIR`: convert a qwenquant INT output folder (or a bf16 source) into a verified GGUF file
(qwenquant/runner/gguf_export.py); `qwenquant export onnx DIR`: an ONNX model verified in onnxruntime
(qwenquant/runner/onnx_export.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from qwenquant.cli import app
from qwenquant.cli.common import silence_libraries
from qwenquant.errors import BadInputError
from qwenquant.recipe import CalibrationConfig
from qwenquant.reporting import command_line
from qwenquant.runner.gguf_export import GGUFExportRequest, export_gguf
from qwenquant.runner.onnx_export import ONNXExportRequest, export_onnx

export_app = typer.Typer(help="Convert a checkpoint folder into another runtime's format.", no_args_is_help=True)
app.add_typer(export_app, name="export")

D = GGUFExportRequest  # each option's default is the request field's
C = CalibrationConfig()


@export_app.command("gguf")
def gguf_command(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="A qwenquant gptq/awq/rtn output with --group-size 32 "
                                           "(codes kept as they are), or a bf16 Qwen3 folder (round-to-nearest).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: model.gguf, qwenquant_report.json, REPORT.md.")],
    type: Annotated[Optional[str], typer.Option("--type", help="q8_0 | q4_0 | q4_1 | q5_0 | q5_1 (our codes), or "
                                                "q4_k_m | q5_k_m | q6_k (llama.cpp's quantizer, bf16 DIR only) "
                                                "[default: the type that holds the folder's codes; q8_0 for a bf16 "
                                                "folder].")] = D.type,
    no_imatrix: Annotated[bool, typer.Option("--no-imatrix", help="K-quants: no importance matrix from "
                                             "calibration activations.")] = False,
    calib: Annotated[str, typer.Option(help="K-quants' importance matrix: calibration text (as on the quantize "
                                       "commands).")] = C.dataset,
    num_samples: Annotated[int, typer.Option(help="Importance matrix: calibration samples.")] = C.num_samples,
    seq_len: Annotated[int, typer.Option(help="Importance matrix: tokens per calibration sample.")] = C.seq_len,
    seed: Annotated[int, typer.Option(help="Importance matrix: seed for calibration sampling.")] = C.seed,
    source: Annotated[Optional[Path], typer.Option(help="The bf16 model a quantized DIR came from (KL reference) "
                                                   "[default: the source its qwenquant_report.json names].")] = D.source,
    eval_text: Annotated[str, typer.Option(help="wikitext2 or a text file: the held-out text of the KL check.")] = D.eval_text,
    eval_window: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = D.window,
    kl_tokens: Annotated[int, typer.Option(help="Tokens on which KL and top-1 agreement are measured.")] = D.kl_tokens,
    verify_max_kl: Annotated[float, typer.Option(help="Exit 4 (folder kept) above this mean KL vs the source, nats.")] = D.verify_max_kl,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Write only: no read-back, no llama.cpp run.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (the transformers side of the check).")] = D.device,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Write a GGUF file (llama.cpp, Ollama, LM Studio) from a checkpoint folder and check it in llama.cpp."""
    silence_libraries()
    quiet = quiet or json_out
    try:
        calibration = CalibrationConfig(dataset=calib, num_samples=num_samples, seq_len=seq_len, seed=seed)
    except ValueError as err:
        raise BadInputError(str(err)) from None
    request = GGUFExportRequest(folder=folder, out=out, type=type, imatrix=not no_imatrix, calibration=calibration,
                                source=source, eval_text=eval_text,
                                window=eval_window, kl_tokens=kl_tokens, verify=not no_verify,
                                verify_max_kl=verify_max_kl, device=device, overwrite=overwrite)
    log = (lambda msg: None) if quiet else (lambda msg: print(f"qwenquant export gguf: {msg}", file=sys.stderr))
    report = export_gguf(request, command_line((ctx.obj or {}).get("argv", sys.argv[1:])), log)
    v = report["verification"]
    if json_out:
        print(json.dumps({"ok": True, "out": str(out), "gguf": report["gguf"]["tensor_types"],
                          "verification": None if v is None else {"passed": v["passed"], "vs_source": v["vs_source"],
                                                                  "runtime": v["runtime"].get("version")}}))
    elif not quiet:
        kl = "" if v is None else f", mean KL {v['vs_source']['mean_kl']:.5f} nats ({v['loader'].split(';')[0]})"
        print(f"wrote {out}/model.gguf{kl}; see {out}/REPORT.md", file=sys.stderr)


O = ONNXExportRequest  # each option's default is the request field's


@export_app.command("onnx")
def onnx_command(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="A qwenquant --format gptq/awq output (its codes go "
                                           "into MatMulNBits as they are), or an unquantized Qwen3 folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: model.onnx(.data), genai_config.json, "
                                      "tokenizer, qwenquant_report.json, REPORT.md.")],
    precision: Annotated[Optional[str], typer.Option(help="int4 | int8 | fp32 [default: the folder's bits; int4 "
                                                     "(onnxruntime's own RTN) for an unquantized folder].")] = O.precision,
    ep: Annotated[str, typer.Option("--ep", help="Execution provider the model is built for: cpu | cuda | dml.")] = O.ep,
    qdq: Annotated[bool, typer.Option("--qdq", help="DequantizeLinear + MatMul instead of MatMulNBits (the form "
                                      "NPU tool chains take; int4 only).")] = O.qdq,
    group_size: Annotated[Optional[int], typer.Option(help="Block size of onnxruntime's own quantizer, for an "
                                                      "unquantized folder [default: 32].")] = O.group_size,
    accuracy_level: Annotated[Optional[int], typer.Option(help="MatMulNBits compute type 0-4 [default: the "
                                                          "builder's: 4 (int8 activations) on cpu].")] = O.accuracy_level,
    source: Annotated[Optional[Path], typer.Option(help="The bf16 model a quantized DIR came from (KL reference) "
                                                   "[default: the source its qwenquant_report.json names].")] = O.source,
    eval_text: Annotated[str, typer.Option(help="wikitext2 or a text file: the held-out text of the KL check.")] = O.eval_text,
    eval_window: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = O.window,
    kl_tokens: Annotated[int, typer.Option(help="Tokens on which KL and top-1 agreement are measured.")] = O.kl_tokens,
    verify_max_kl: Annotated[float, typer.Option(help="Exit 4 (folder kept) above this mean KL vs the source, nats.")] = O.verify_max_kl,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Build only: no read-back, no onnxruntime run.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (the transformers side of the check).")] = O.device,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Build an ONNX model (onnxruntime, onnxruntime-genai; CPU, CUDA, DirectML, QDQ) and check it in onnxruntime."""
    silence_libraries()
    quiet = quiet or json_out
    request = ONNXExportRequest(folder=folder, out=out, precision=precision, ep=ep, qdq=qdq, group_size=group_size,
                                accuracy_level=accuracy_level, source=source, eval_text=eval_text, window=eval_window,
                                kl_tokens=kl_tokens, verify=not no_verify, verify_max_kl=verify_max_kl,
                                device=device, overwrite=overwrite)
    log = (lambda msg: None) if quiet else (lambda msg: print(f"qwenquant export onnx: {msg}", file=sys.stderr))
    report = export_onnx(request, command_line((ctx.obj or {}).get("argv", sys.argv[1:])), log)
    v = report["verification"]
    if json_out:
        print(json.dumps({"ok": True, "out": str(out), "onnx": report["onnx"],
                          "verification": None if v is None else {"passed": v["passed"], "vs_source": v["vs_source"],
                                                                  "runtime": v["runtime"].get("version")}}))
    elif not quiet:
        kl = "" if v is None else f", mean KL {v['vs_source']['mean_kl']:.5f} nats ({v['loader'].split(';')[0]})"
        print(f"wrote {out}/model.onnx{kl}; see {out}/REPORT.md", file=sys.stderr)
