"""Verify a written checkpoint: reload it, check every quantized weight bit for bit, compare next-token
distributions with the source.

Which reader verifies depends on the format, decided up front and stated in the report:
- transformers (the reference loader): compressed-tensors FP8, symmetric pack-quantized INT, hf-fp8.
- qwenquant's spec readers (`export/*.read_linear`, written from docs/formats.md, not from our writers):
  gptq and awq (transformers needs gptqmodel for them), asymmetric pack-quantized (transformers 5.x with
  compressed-tensors 0.20 cannot load packed zero points: it allocates them unpacked and rejects the shapes), and
  compressed-tensors FP8 with block scales in an MoE model (transformers 5.23 dequantizes per-expert FP8 tensors
  while fusing the experts as `weight * weight_scale`, which only broadcasts per-tensor and per-channel scales).
MoE checkpoints hold per-expert tensors (`mlp.experts.E.gate_proj...`); transformers fuses them at load, and the
reloaded model is split again (qwenquant/model/moe.py) to compare expert by expert.
"""

from __future__ import annotations

import contextlib
import io
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from qwenquant.eval.perplexity import kl_stats, next_token_logprobs

FORMAT_READERS = {"compressed-tensors": "ct_packed", "gptq": "gptq_v1", "awq": "awq_gemm"}


def reader_for(fmt: str, quantizer: str, symmetric: bool, fp8_block_experts: bool = False) -> str:
    """'transformers' or 'spec-reader' for this format and scheme (`fp8_block_experts`: an MoE model's experts
    get FP8 block scales)."""
    if quantizer == "fp8" and fmt == "compressed-tensors" and fp8_block_experts:
        return "spec-reader"
    if quantizer == "fp8" or (fmt == "compressed-tensors" and symmetric):
        return "transformers"
    return "spec-reader"


def _effective_weight(module) -> torch.Tensor:
    """The weight a reloaded Linear computes with (dequantizing FP8 block storage if the loader kept it)."""
    w = module.weight
    if w.dtype == torch.float8_e4m3fn and hasattr(module, "weight_scale_inv"):
        from qwenquant.export.hf_fp8 import read_linear

        block = getattr(module, "block_size", None) or (128, 128)
        return read_linear({"weight": w, "weight_scale_inv": module.weight_scale_inv}, block[0])
    return w.float()


def read_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                tensors[key] = sf.get_tensor(key)
    return tensors


@contextmanager
def _swapped_weights(model, weights: dict[str, torch.Tensor]):
    """Temporarily give the named Linears the given weights."""
    saved = {}
    try:
        for name, w in weights.items():
            lin = model.get_submodule(name)
            saved[name] = lin.weight.data
            lin.weight.data = w.to(lin.weight.dtype).to(lin.weight.device)
        yield model
    finally:
        for name, w in saved.items():
            model.get_submodule(name).weight.data = w


def _compare(model, names, theirs: dict[str, torch.Tensor]) -> list[str]:
    """Names whose reloaded weight, in the model dtype the engine computes with, differs from ours."""
    mismatched = []
    for name in names:
        ours = model.get_submodule(name).weight.detach().cpu()
        t = theirs[name].cpu().to(ours.dtype)
        if ours.shape != t.shape or not torch.equal(ours, t):
            mismatched.append(name)
    return mismatched


@torch.no_grad()
def verify_checkpoint(folder: Path, model, names: list[str], reader: str, fmt: str, kl_windows, src_logp, q_logp,
                      device, max_kl: float) -> dict:
    """Check weights (exact) and mean next-token KL(source || checkpoint) <= max_kl nats."""
    if reader == "transformers":
        from transformers import AutoModelForCausalLM

        try:
            # the loader's own progress bars (compressed-tensors tqdm) would break --quiet/--json output
            with contextlib.redirect_stderr(io.StringIO()):
                reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
                reloaded.eval().to(device)
                logp = next_token_logprobs(reloaded, kl_windows, device)  # the first forward decompresses weights
        except Exception as err:  # a checkpoint the reference loader rejects fails verification
            return {"passed": False, "reason": f"transformers could not load the checkpoint ({type(err).__name__}: {err})",
                    "loader": "transformers"}
        from qwenquant.model.moe import unfuse_model

        unfuse_model(reloaded)  # MoE: transformers fused the per-expert tensors it loaded; compare expert by expert
        theirs = {n: _effective_weight(reloaded.get_submodule(n)) for n in names}
        del reloaded
        loader = "transformers.AutoModelForCausalLM"
    else:
        config = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
        name = "compressed_tensors" if config.get("format") == "float-quantized" else FORMAT_READERS[fmt]
        module = __import__(f"qwenquant.export.{name}", fromlist=["read_linear"])
        tensors = read_checkpoint_tensors(folder)
        theirs = {}
        for n in names:
            local = {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}
            theirs[n] = module.read_linear(local, config)
        with _swapped_weights(model, {n: theirs[n] for n in names}):
            model.to(device)
            logp = next_token_logprobs(model, kl_windows, device)
            model.to("cpu")
        loader = f"qwenquant spec reader for {fmt} ({module.__name__}.read_linear) in the source model"
    mismatched = _compare(model, names, theirs)
    vs_source = kl_stats(src_logp, logp)
    reason = ""
    if mismatched:
        reason = f"{len(mismatched)} reloaded weights differ from ours (first: {mismatched[0]})"
    elif vs_source["mean_kl"] > max_kl:
        reason = f"mean KL vs source {vs_source['mean_kl']:.4g} > {max_kl} nats"
    return {
        "passed": not reason,
        "reason": reason,
        "loader": loader,
        "weights_checked": len(names),
        "weights_mismatched": mismatched,
        "vs_source": vs_source,
        "vs_quantized_in_memory": kl_stats(q_logp, logp),
        "threshold_mean_kl_vs_source": max_kl,
    }
