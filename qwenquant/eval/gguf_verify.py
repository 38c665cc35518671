"""Verify a written GGUF file: its weights read back with gguf-py, and the file run in llama.cpp.

1. Every tensor is read back with gguf-py (`gguf.quants.dequantize`, llama.cpp's reference dequantization, not our
   packing). Each quantized Linear is compared with the weight the quantized model computes with (in the model
   dtype): symmetric types (Q8_0, Q4_0, Q5_0) must be equal bit for bit; for Q4_1/Q5_1, whose minimum -z*s float16
   may round (qwenquant/export/gguf_blocks.py), differing Linears and the largest deviation are reported. K-quant
   tensors (made by llama.cpp's quantizer from the source, qwenquant/export/gguf_kquant.py) are counted; the model
   then computes with them as read back.
2. The model with the weights read back computes next-token log-probabilities on the run's KL windows: KL from the
   source (the check that holds without llama.cpp).
3. llama.cpp itself (`llama-cpp-python`, the optional extra `qwenquant[gguf]`): the file is loaded alone (its own
   tokenizer and hyper-parameters), evaluated on the same token windows with logits for every position, and
   compared with the source: mean per-token KL(source || llama.cpp), top-1 agreement; then a few prompts go
   through the file's chat template (rendered by transformers from the same template) and are decoded greedily by
   llama.cpp and by the model with the file's weights in transformers (float32): the report gives, per prompt,
   whether the texts are identical and how many tokens agree before the first difference (after it the two
   continue different texts), and that common prefix as a fraction of all generated tokens. llama.cpp's CPU dot
   products for the block types quantize the activations to 8-bit blocks (Q8_0/Q8_1), so its logits are not those
   of float arithmetic on the same weights: near-ties can flip a greedy token. The same comparison against the
   source model's own greedy continuations (computed before quantizing; `greedy_vs_source`) says how far the
   deployed file's answers drift from the model it came from. Without llama-cpp-python this step is skipped with a warning
   and the report says so (`runtime.available: false`); the verdict then rests on steps 1-2.
The verdict fails on a mismatched symmetric weight, else on the runtime's KL (or, without the runtime, step 2's)
above the threshold.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from qwenquant.eval.chat_prompts import GREEDY_TOKENS, PROMPTS, chat_ids, eos_ids
from qwenquant.eval.perplexity import kl_stats, next_token_logprobs
from qwenquant.eval.precision import evaluation_precision
from qwenquant.eval.verify import _swapped_weights, verdict
from qwenquant.export.gguf import read_tensors
from qwenquant.export.gguf_experts import expert_slot
from qwenquant.export.gguf_meta import INSTALL_HINT, llama_cpp_module, tensor_names  # noqa: F401 (re-exported)

EXACT_TYPES = ("Q8_0", "Q4_0", "Q5_0")
ASYMMETRIC_TYPES = ("Q4_1", "Q5_1")
def read_back(path: Path, model, names: list[str], n_layers: int, requantized: bool = False) -> tuple[dict, dict]:
    """({Linear name: weight read back from the file, in the model dtype}, weight check summary). `requantized`:
    llama.cpp's quantizer made every tensor from the source (K-quants, including its fallbacks to Q8_0 etc. for
    rows it cannot super-block), so none is compared with ours."""
    name_map = tensor_names(model.config.to_dict())
    stored = read_tensors(path)
    theirs, exact_bad, other_bad, by_llama, max_dev = {}, [], [], 0, 0.0
    for n in names:
        slot = expert_slot(n)  # an expert is one slice of its projection's stacked tensor
        key = slot[0] if slot else n + ".weight"
        qtype, values = stored[name_map.get_name(key, try_suffixes=(".weight",))]
        values = values[slot[1]] if slot else values
        ours = model.get_submodule(n).weight.detach().cpu()
        t = torch.from_numpy(values.copy()).to(ours.dtype)
        theirs[n] = t
        if requantized or qtype not in ASYMMETRIC_TYPES + EXACT_TYPES:  # llama.cpp quantized the source weight
            by_llama += 1
        elif not torch.equal(ours, t):
            (exact_bad if qtype in EXACT_TYPES else other_bad).append(n)
            max_dev = max(max_dev, float((ours.float() - t.float()).abs().max()))
    return theirs, {"exact_mismatched": exact_bad, "asymmetric_differing": len(other_bad),
                    "asymmetric_differing_first": other_bad[:3], "max_abs_deviation_model_dtype": max_dev,
                    "quantized_by_llama_cpp": by_llama}


def _llama(path: Path, n_ctx: int, llama_cpp):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                           n_threads=max(1, torch.get_num_threads()))


def runtime_logprobs(llm, windows: torch.Tensor) -> torch.Tensor:
    """[n_windows, window, vocab] log-probabilities from llama.cpp (logits of every position), float16 like ours."""
    out = []
    for row in windows:
        llm.reset()
        llm.eval(row.tolist())
        scores = torch.from_numpy(np.array(llm.scores[: row.numel()], dtype=np.float32))
        out.append(torch.log_softmax(scores, dim=-1).to(torch.float16))
    return torch.stack(out)


@torch.no_grad()
def transformers_greedy(model, tokenizer, device, prompts=PROMPTS, n_tokens: int = GREEDY_TOKENS) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (through the chat template) by `model` in transformers; the
    model goes back to the CPU afterwards."""
    out = []
    model.to(device)
    for prompt in prompts:
        ids = chat_ids(tokenizer, prompt)
        with evaluation_precision(model, device):
            gen = model.generate(torch.tensor([ids], device=device), max_new_tokens=n_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        out.append(gen[0, len(ids):].tolist())
    model.to("cpu")
    return out


def llama_greedy(llm, tokenizer, eos: set[int], prompts=PROMPTS, n_tokens: int = GREEDY_TOKENS) -> list[list[int]]:
    """The same continuations from llama.cpp; it stops at the model's end-of-sequence ids as transformers does."""
    out = []
    for prompt in prompts:
        llm.reset()
        theirs = []
        for tok in llm.generate(chat_ids(tokenizer, prompt), temp=0.0, top_k=1, reset=True):
            theirs.append(int(tok))
            if len(theirs) >= n_tokens or int(tok) in eos:
                break
        out.append(theirs)
    return out


def greedy_agreement(theirs: list[list[int]], ours: list[list[int]], tokenizer, reference: str,
                     prompts=PROMPTS) -> dict:
    """Per prompt: identical or not, tokens before the first difference (after it the two continue different
    texts: only the common prefix counts); overall, that prefix as a fraction of all generated tokens."""
    rows, same, total = [], 0, 0
    for prompt, a, b in zip(prompts, theirs, ours):
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same, total = same + prefix, total + max(len(a), len(b))
        rows.append({"prompt": prompt, "llama_cpp": tokenizer.decode(a), "transformers": tokenizer.decode(b),
                     "identical": a == b, "tokens_before_first_difference": prefix, "tokens": max(len(a), len(b))})
    return {"token_agreement": same / total if total else 0.0,
            "prompts_identical": sum(r["identical"] for r in rows), "prompts": rows, "reference": reference}


def run_in_llama_cpp(path: Path, model, tokenizer, windows, src_logp, device,
                     source_greedy: list[list[int]] | None = None) -> dict:
    """The runtime check (module docstring, step 3); `available: false` with a warning without llama-cpp-python.
    `source_greedy`: the source model's greedy continuations of PROMPTS (transformers_greedy before quantizing)."""
    llama_cpp = llama_cpp_module()
    if llama_cpp is None:
        reason = f"llama-cpp-python is not installed: the file was not run in llama.cpp; {INSTALL_HINT}"
        warnings.warn(reason, stacklevel=2)
        return {"available": False, "reason": reason}
    llm = _llama(path, int(windows.shape[1]), llama_cpp)
    try:
        logp = runtime_logprobs(llm, windows)
        theirs = llama_greedy(llm, tokenizer, eos_ids(model))
    finally:
        llm.close() if hasattr(llm, "close") else None
    greedy = greedy_agreement(theirs, transformers_greedy(model, tokenizer, device), tokenizer,
                              "the same weights in transformers (float32), greedy")
    out = {"available": True, "runtime": "llama.cpp via llama-cpp-python", "version": llama_cpp.__version__,
           "vs_source": kl_stats(src_logp, logp), "greedy": greedy}
    if source_greedy is not None:
        out["greedy_vs_source"] = greedy_agreement(theirs, source_greedy, tokenizer,
                                                   "the source model in transformers (float32), greedy")
    return out


@torch.no_grad()
def verify_gguf(path: Path, model, names: list[str], tokenizer, kl_windows, src_logp, q_logp, device,
                max_kl: float, source_greedy: list[list[int]] | None = None, requantized: bool = False) -> dict:
    """Steps 1-3 of the module docstring; the verification section of the report. `source_greedy`: the source
    model's greedy continuations (transformers_greedy), compared with llama.cpp's; `requantized`: see read_back."""
    n_layers = int(model.config.num_hidden_layers)
    theirs, weights = read_back(path, model, names, n_layers, requantized)
    with _swapped_weights(model, theirs):
        model.to(device)
        with evaluation_precision(model, device):
            logp = next_token_logprobs(model, kl_windows, device)
        model.to("cpu")
        runtime = run_in_llama_cpp(path, model, tokenizer, kl_windows, src_logp, device, source_greedy)
    reader = kl_stats(src_logp, logp)
    judged = runtime["vs_source"] if runtime["available"] else reader
    loader = ("llama.cpp " + runtime["version"] + " (llama-cpp-python) on the file alone; weights read back with gguf-py"
              if runtime["available"] else "gguf-py (weights read back into the source model); llama.cpp not run: "
              "llama-cpp-python is not installed")
    result = verdict(loader, names, [(weights["exact_mismatched"], "symmetric GGUF weights differ from ours")],
                     judged, max_kl, {"vs_quantized_in_memory": kl_stats(q_logp, logp), "weights": weights,
                                      "gguf_reader_vs_source": reader, "runtime": runtime})
    return result
