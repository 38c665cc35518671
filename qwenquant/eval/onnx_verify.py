"""Verify a written ONNX model in onnxruntime against the source model in transformers.

1. Weights: every Linear is read back from model.onnx through the operator specs (qwenquant/export/onnx_read.py).
   For a GPTQ/AWQ input each must equal our dequantized weight, (q - z) * s from the checkpoint's codes, bit for
   bit in float32 (the builder re-derives the codes from a float16 dequantization: this proves they survived);
   for the builder's own quantizer there is nothing of ours to equal, and the report gives its largest deviation
   from the source weights.
2. The source model in transformers (float32) with the read-back weights computes next-token log-probabilities on
   the KL windows: KL from the source of the weights alone.
3. onnxruntime itself: the model.onnx runs in a plain `InferenceSession` (the provider it was built for, empty KV cache,
   the whole window in one call) on the same windows: mean per-token KL(source || onnxruntime), top-1 agreement,
   and KL(read-back weights in transformers || onnxruntime), the runtime's own arithmetic (MatMulNBits at
   accuracy level 4, the CPU default, quantizes activations to int8 blocks). Then onnxruntime-genai's generator
   (the API applications use, CPU provider) decodes a few prompts greedily through the chat template, beside the
   same weights in transformers (float32): identical prompts and tokens agreeing before the first difference.
A cuda/dml build runs only where this onnxruntime has that provider (the builder fuses Qwen3's q/k norms into
GroupQueryAttention for them, which the CPU provider refuses); elsewhere step 3 is skipped with a warning and the
report says so (`runtime.available: false`).
The verdict fails on a mismatched weight (step 1), else on the onnxruntime KL (without the runtime, step 2's) above
the threshold.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from qwenquant.eval.chat_prompts import GREEDY_TOKENS, PROMPTS, chat_ids
from qwenquant.eval.perplexity import kl_stats, next_token_logprobs
from qwenquant.eval.precision import evaluation_precision
from qwenquant.eval.verify import _swapped_weights, verdict
from qwenquant.export.onnx_read import read_linears

MODEL_FILE = "model.onnx"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider"}


def provider_for(ep: str) -> str | None:
    """The onnxruntime execution provider that runs a model built for `ep`, None when this install lacks it (a
    cuda/dml build fuses Qwen3's q/k norms into GroupQueryAttention, which the CPU provider refuses)."""
    import onnxruntime as ort

    return PROVIDERS[ep] if PROVIDERS[ep] in ort.get_available_providers() else None


def _session(folder: Path, provider: str = "CPUExecutionProvider", threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(Path(folder) / MODEL_FILE), opts, providers=[provider])


def _feed(session, ids: np.ndarray, config: dict) -> dict:
    """Inputs for one forward over `ids` [1, T] with an empty KV cache [1, kv heads, 0, head size]."""
    heads = int(config["num_key_value_heads"])
    dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    feed = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feed[inp.name] = ids
        elif inp.name == "attention_mask":
            feed[inp.name] = np.ones_like(ids)
        elif inp.name == "position_ids":
            feed[inp.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        elif inp.name.startswith("past_key_values"):
            feed[inp.name] = np.zeros((ids.shape[0], heads, 0, dim), dtype=dtypes.get(inp.type, np.float32))
        else:
            raise ValueError(f"model.onnx input {inp.name!r} is not one a decoder takes")
    return feed


def runtime_logprobs(folder: Path, windows: torch.Tensor, config: dict,
                     provider: str = "CPUExecutionProvider") -> torch.Tensor:
    """[n_windows, window, vocab] log-probabilities from onnxruntime, float16 like ours."""
    session = _session(folder, provider, threads=max(1, torch.get_num_threads()))
    out = []
    for row in windows:
        logits = session.run(["logits"], _feed(session, row[None].numpy().astype(np.int64), config))[0][0]
        out.append(torch.log_softmax(torch.from_numpy(logits).float(), dim=-1).to(torch.float16))
    return torch.stack(out)


def genai_model(folder: Path, ep: str = "cpu"):
    """An onnxruntime-genai Model on the provider the model was built for (cpu: provider entries cleared)."""
    import onnxruntime_genai as og

    cfg = og.Config(str(folder))
    if ep == "cpu":
        cfg.clear_providers()
    return og.Model(cfg)


def genai_greedy(og_model, ids: list[int], n_tokens: int, eos: set[int]) -> tuple[list[int], float]:
    """(greedy tokens after `ids`, seconds spent after the prompt) from onnxruntime-genai's generator."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(ids) + n_tokens, do_sample=False)
    gen = og.Generator(og_model, params)
    gen.append_tokens(ids)
    out, started = [], time.perf_counter()
    while not gen.is_done() and len(out) < n_tokens:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
        if out[-1] in eos:
            break
    return out, time.perf_counter() - started


@torch.no_grad()
def greedy_agreement(og_model, model, tokenizer, device, prompts=PROMPTS, n_tokens: int = GREEDY_TOKENS) -> dict:
    """Greedy decoding of each prompt (chat template) by onnxruntime-genai and by `model` in transformers."""
    rows, same, total = [], 0, 0
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    for prompt in prompts:
        ids = chat_ids(tokenizer, prompt)
        theirs, _ = genai_greedy(og_model, ids, n_tokens, eos)
        with evaluation_precision(model, device):
            gen = model.generate(torch.tensor([ids], device=device), max_new_tokens=n_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        ours = gen[0, len(ids):].tolist()
        prefix = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        same, total = same + prefix, total + max(len(ours), len(theirs))
        rows.append({"prompt": prompt, "onnxruntime_genai": tokenizer.decode(theirs),
                     "transformers": tokenizer.decode(ours), "identical": ours == theirs,
                     "tokens_before_first_difference": prefix, "tokens": max(len(ours), len(theirs))})
    return {"token_agreement": same / total if total else 0.0,
            "prompts_identical": sum(r["identical"] for r in rows), "prompts": rows,
            "reference": "the read-back weights in transformers (float32), greedy"}


def check_weights(theirs: dict[str, torch.Tensor], expected: dict[str, torch.Tensor] | None, model,
                  names: list[str]) -> dict:
    """Step 1: Linears missing or differing from `expected` (None: the builder's own codes, deviation reported)."""
    missing = [n for n in names if n not in theirs]
    mismatched, max_dev = [], 0.0
    for n in names:
        if n not in theirs:
            continue
        ref = expected[n] if expected is not None else model.get_submodule(n).weight.detach().float()
        if expected is not None and not torch.equal(ref, theirs[n]):
            mismatched.append(n)
        max_dev = max(max_dev, float((ref - theirs[n]).abs().max()))
    key = "max_abs_deviation_from_ours" if expected is not None else "max_abs_deviation_from_source"
    return {"missing": missing, "mismatched": mismatched, key: max_dev, "checked": len(names) - len(missing),
            "compared_with": "our dequantized weights, bit for bit (float32)" if expected is not None else
            "nothing of ours: the builder quantized them"}


def run_in_onnxruntime(folder: Path, model, tokenizer, windows, src_logp, readback_logp, device, ep: str,
                       versions: dict) -> dict:
    """Step 3 of the module docstring; `available: false` with a warning where this install cannot run an `ep`
    build (the verdict then rests on steps 1-2)."""
    provider = provider_for(ep)
    if provider is None:
        reason = (f"a model built for --ep {ep} needs onnxruntime's {PROVIDERS[ep]} (onnxruntime-gpu on a CUDA "
                  "machine, onnxruntime-directml on Windows), which this install lacks: it was not run")
        warnings.warn(reason, stacklevel=2)
        return {"available": False, "reason": reason}
    ort_logp = runtime_logprobs(folder, windows, model.config.to_dict(), provider)
    return {"available": True, "runtime": f"onnxruntime (InferenceSession, {provider})",
            "version": versions.get("onnxruntime"), "genai_version": versions.get("onnxruntime-genai"),
            "vs_source": kl_stats(src_logp, ort_logp), "vs_readback_in_transformers": kl_stats(readback_logp,
                                                                                                ort_logp),
            "greedy": greedy_agreement(genai_model(folder, ep), model, tokenizer, device)}


@torch.no_grad()
def verify_onnx(folder: Path, model, names: list[str], expected: dict[str, torch.Tensor] | None, tokenizer,
                windows: torch.Tensor, src_logp: torch.Tensor, device, max_kl: float, versions: dict,
                ep: str = "cpu") -> dict:
    """Steps 1-3 of the module docstring on the float32 source `model`; the verification section of the report."""
    theirs, kinds = read_linears(Path(folder) / MODEL_FILE, model.config.to_dict())
    weights = check_weights(theirs, expected, model, names)
    weights["stored_as"] = sorted({kinds[n] for n in names if n in kinds})
    with _swapped_weights(model, {n: theirs[n] for n in names if n in theirs}):
        with evaluation_precision(model, device):
            readback_logp = next_token_logprobs(model, windows, device)
        runtime = run_in_onnxruntime(folder, model, tokenizer, windows, src_logp, readback_logp, device, ep,
                                     versions)
    readback = kl_stats(src_logp, readback_logp)
    if runtime["available"]:
        loader = (f"onnxruntime {versions.get('onnxruntime')} on model.onnx ({ep}); greedy through "
                  f"onnxruntime-genai {versions.get('onnxruntime-genai')}; weights read back from the ONNX initializers")
    else:
        loader = (f"weights read back from the ONNX initializers into the source model in transformers; onnxruntime "
                  f"not run: this install has no {PROVIDERS[ep]}")
    problems = [(weights["mismatched"], "ONNX weights differ from ours"),
                (weights["missing"], "Linears not found in model.onnx")]
    return verdict(loader, names, problems, runtime["vs_source"] if runtime["available"] else readback, max_kl,
                   {"weights": weights, "readback_in_transformers_vs_source": readback, "runtime": runtime})
