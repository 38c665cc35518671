"""`qwenquant export gguf DIR --type q4_k_m|q5_k_m|q6_k`: the bf16 source written as a BF16 GGUF, an importance
matrix measured on calibration text (unless --no-imatrix), then llama.cpp's quantizer
(qwenquant/export/gguf_kquant.py). Only an unquantized folder can give a K-quant: our INT codes are on another grid,
and re-quantizing them would stack two roundings."""

from __future__ import annotations

import warnings

import torch

from qwenquant.calibration import load_calibration, samples_hash
from qwenquant.errors import BadInputError
from qwenquant.export.gguf import write_gguf
from qwenquant.export.gguf_imatrix import importance_matrix
from qwenquant.export.gguf_meta import num_experts
from qwenquant.export.gguf_kquant import llama_quantize, require_llama_cpp, tensor_types
from qwenquant.recipe import CalibrationConfig

SOURCE_FILE = ".source-bf16.gguf"


def check_kquant_source(config: dict, qtype: str, imatrix: bool) -> None:
    """Refuse a K-quant from an already quantized folder (the fix named), an importance matrix for Qwen3-MoE
    (its stacked experts' statistics are not collected yet), and any K-quant without llama-cpp-python."""
    q = config.get("quantization_config")
    if q:
        method = q.get("quant_method", "quantized")
        raise BadInputError(f"--type {qtype.lower()} is made by llama.cpp's quantizer from the bf16 model, and this "
                            f"folder already holds {method} weights: pass the bf16 source folder, or keep these codes "
                            "with --type q4_0/q4_1/q5_0/q5_1/q8_0")
    if imatrix and num_experts(config):
        raise BadInputError(f"--type {qtype.lower()}: the importance matrix of Qwen3-MoE experts is not implemented; "
                            "add --no-imatrix (llama.cpp's quantizer alone)")
    require_llama_cpp(qtype)


def write_kquant(path, folder, config: dict, tensors: dict, tokenizer, qtype: str,
                 calibration: CalibrationConfig | None, log) -> tuple[dict, str, dict | None]:
    """Write `path` as `qtype`; returns (what was written, how, the importance matrix's description or None)."""
    from transformers import AutoModelForCausalLM

    source = path.parent / SOURCE_FILE
    log("writing the bf16 source as GGUF for llama.cpp's quantizer")
    written = write_gguf(source, config, tokenizer, tensors.items(), {}, name=folder.name)
    imatrix, described = None, None
    if calibration is not None:
        c = calibration
        log(f"importance matrix: {c.num_samples} x {c.seq_len} calibration tokens ({c.dataset}, seed {c.seed})")
        calib = load_calibration(c.dataset, tokenizer, c.num_samples, c.seq_len, c.seed)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        imatrix = importance_matrix(model, calib)
        del model
        described = {"statistic": "mean x^2 per input column of every decoder Linear (llama-imatrix's)",
                     "dataset": c.dataset, "num_samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                     "seed": c.seed, "sha256_token_ids": samples_hash(calib), "tensors": len(imatrix)}
    log(f"quantizing to {qtype} with llama.cpp ({'with' if imatrix else 'without'} an importance matrix)")
    try:
        llama_quantize(source, path, qtype, imatrix, threads=torch.get_num_threads())
    finally:
        source.unlink(missing_ok=True)
    llama_cpp = require_llama_cpp(qtype)
    how = (f"llama.cpp's quantizer (llama_model_quantize, llama-cpp-python {llama_cpp.__version__}) from the bf16 "
           f"weights to {qtype}, " + (f"importance matrix from {described['num_samples']} x {described['seq_len']} "
                                      f"calibration tokens ({described['dataset']}, seed {described['seed']})"
                                      if described else "no importance matrix (--no-imatrix)"))
    written = written | {"tensor_types": tensor_types(path),
                         "fp16_rounding": {"mins_rounded": 0, "max_min_deviation": 0.0, "minima": 0}}
    base = qtype.split("_K")[0] + "_K"  # Q4_K_M -> Q4_K
    if not written["tensor_types"].get(base):
        warnings.warn(f"llama.cpp made no {base} tensor: K-quant super-blocks need rows of a multiple of 256 "
                      f"columns, so it fell back to other types ({', '.join(written['tensor_types'])})", stacklevel=2)
    return written, how, described
