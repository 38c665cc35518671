"""Verify a written checkpoint: reload it, check every quantized weight bit for bit, compare next-token
distributions with the source.

Which reader verifies depends on the format, decided up front and stated in the report:
- transformers (the reference loader): compressed-tensors FP8, symmetric pack-quantized INT, hf-fp8.
- qwenquant's spec readers (each export format's `read_linear` in qwenquant/export/registry.py, written from
  docs/formats.md, not from our writers):
  gptq and awq (transformers needs gptqmodel for them), asymmetric pack-quantized (transformers 5.x with
  compressed-tensors 0.20 cannot load packed zero points: it allocates them unpacked and rejects the shapes), and
  compressed-tensors FP8 with block scales in an MoE model (transformers 5.23 dequantizes per-expert FP8 tensors
  while fusing the experts as `weight * weight_scale`, which only broadcasts per-tensor and per-channel scales).
A checkpoint with a KV-cache scheme (--kv-cache fp8) holds `k_scale` / `v_scale` on each attention module; transformers
5.25 loads such a checkpoint but ignores them (unexpected keys; no FP8 cache), so both readers run their forwards with
the FP8 cache simulated from the stored scales (qwenquant/kv_simulation.py), as the in-memory evaluation did, and the
stored scales must equal ours bit for bit.
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
from qwenquant.eval.precision import evaluation_precision
from qwenquant.export import hf_fp8
from qwenquant.export.registry import FORMATS
from qwenquant.kv_simulation import kv_cache_quantization
from qwenquant.model.moe import unfuse_model


def _effective_weight(module) -> torch.Tensor:
    """The weight a reloaded Linear computes with (dequantizing FP8 block storage if the loader kept it)."""
    w = module.weight
    if w.dtype == torch.float8_e4m3fn and hasattr(module, "weight_scale_inv"):

        block = getattr(module, "block_size", None) or (128, 128)
        return hf_fp8.read_linear({"weight": w, "weight_scale_inv": module.weight_scale_inv}, block[0])
    return w.float()


def read_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                tensors[key] = sf.get_tensor(key)
    return tensors


def read_kv_scales(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """attention module -> (k_scale, v_scale) as stored in the checkpoint's safetensors (empty without a KV scheme)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                module, _, local = key.rpartition(".")
                if local in ("k_scale", "v_scale"):
                    found.setdefault(module, {})[local] = sf.get_tensor(key)
    return {m: (d["k_scale"], d["v_scale"]) for m, d in found.items() if len(d) == 2}


def _kv_mismatches(ours: dict, stored: dict) -> list[str]:
    """Attention modules whose stored (k_scale, v_scale) are missing or differ from ours (dtype, shape, bits)."""
    bad = [n for n in ours if n not in stored or any(
        a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.cpu(), b) for a, b in zip(ours[n], stored[n]))]
    return bad + sorted(set(stored) - set(ours))


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
                      device, max_kl: float, kv_scales: dict | None = None) -> dict:
    """Check weights (exact), KV-cache scales (exact, `kv_scales`: ours) and mean next-token KL(source ||
    checkpoint) <= max_kl nats."""
    stored_kv = read_kv_scales(folder)
    if reader == "transformers":
        from transformers import AutoModelForCausalLM

        try:
            # the loader's own progress bars (compressed-tensors tqdm) would break --quiet/--json output
            with contextlib.redirect_stderr(io.StringIO()):
                reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
                reloaded.eval().to(device)
                with evaluation_precision(reloaded, device), kv_cache_quantization(reloaded, stored_kv):
                    logp = next_token_logprobs(reloaded, kl_windows, device)  # the first forward decompresses weights
        except Exception as err:  # a checkpoint the reference loader rejects fails verification
            return {"passed": False, "reason": f"transformers could not load the checkpoint ({type(err).__name__}: {err})",
                    "loader": "transformers"}

        unfuse_model(reloaded)  # MoE: transformers fused the per-expert tensors it loaded; compare expert by expert
        theirs = {n: _effective_weight(reloaded.get_submodule(n)) for n in names}
        del reloaded
        loader = "transformers.AutoModelForCausalLM"
    else:
        config = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
        read = FORMATS[fmt].read_linear
        tensors = read_checkpoint_tensors(folder)
        theirs = {}
        for n in names:
            local = {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}
            theirs[n] = read(local, config, n)
        with _swapped_weights(model, {n: theirs[n] for n in names}):
            model.to(device)
            with evaluation_precision(model, device), kv_cache_quantization(model, stored_kv):
                logp = next_token_logprobs(model, kl_windows, device)
            model.to("cpu")
        loader = f"qwenquant spec reader for {fmt} ({read.__module__}) in the source model"
    mismatched = _compare(model, names, theirs)
    problems = [(mismatched, "reloaded weights differ from ours"),
                (_kv_mismatches(kv_scales or {}, stored_kv), "stored KV-cache scales differ from ours or are missing")]
    extra = {"vs_quantized_in_memory": kl_stats(q_logp, logp)}
    if stored_kv:
        extra["kv_cache"] = {"scales_checked": len(stored_kv), "forward": "FP8 KV cache simulated from the stored "
                             "k_scale/v_scale (transformers ignores them on load)"}
    return verdict(loader, names, problems, kl_stats(src_logp, logp), max_kl, extra)


def verdict(loader: str, names: list[str], problems: list[tuple[list[str], str]], vs_source: dict, max_kl: float,
             extra: dict) -> dict:
    """The verification result: failed on the first non-empty (names, what) problem, else on KL above `max_kl`."""
    reason = next((f"{len(bad)} {what} (first: {bad[0]})" for bad, what in problems if bad), "")
    if not reason and vs_source["mean_kl"] > max_kl:
        reason = f"mean KL vs source {vs_source['mean_kl']:.4g} > {max_kl} nats"
    return {"passed": not reason, "reason": reason, "loader": loader, "weights_checked": len(names),
            "weights_mismatched": problems[0][0], "vs_source": vs_source, **extra,
            "threshold_mean_kl_vs_source": max_kl}


@torch.no_grad()
def verify_offloaded(folder: Path, store, names: list[str], fmt: str, src_logp, q_logp, max_kl: float) -> dict:
    """--offload-dir: no full-model reload (transformers would load the whole model into RAM). Instead every tensor
    of the written checkpoint is read back one decoder layer at a time and compared bit for bit with the live
    (offloaded) model: each quantized Linear through our spec reader (`export/*.read_linear`) against the weight the
    model computes with, every other tensor (norms, embeddings, kept Linears) as stored. KL vs source is then the
    in-memory quantized model's (the checkpoint holds exactly its weights); the report's loader says so."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    read = FORMATS[fmt].read_linear
    index: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            index.update({k: f for k in sf.keys()})
    quantized = set(names)
    owner = {k: k.rsplit(".", 1)[0] for k in index}  # checkpoint tensor -> its module
    by_layer: dict[int | None, list[str]] = {}
    for k in index:
        by_layer.setdefault(store.layer_index(k), []).append(k)
    tied = bool(getattr(store.model.config, "tie_word_embeddings", False))
    expected = {k for k in store.model.state_dict() if not (tied and k == f"{store.adapter.lm_head}.weight")}
    mismatched: list[str] = []
    others_checked, others_mismatched = 0, []

    def read_keys(keys: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted({index[k] for k in keys}):
            with safe_open(str(f), framework="pt") as sf:
                out.update({k: sf.get_tensor(k) for k in keys if index[k] == f})
        return out

    def check(live: dict[str, torch.Tensor], keys: list[str], layer_names: list[str]) -> None:
        nonlocal others_checked
        stored = read_keys(keys)
        for n in layer_names:
            local = {k[len(n) + 1:]: v for k, v in stored.items() if owner[k] == n}
            ours = live[n + ".weight"].detach().cpu()
            theirs = read(local, config, n).to(ours.dtype) if local else None
            if theirs is None or ours.shape != theirs.shape or not torch.equal(ours, theirs):
                mismatched.append(n)
        for k in keys:
            if owner[k] in quantized:
                continue
            others_checked += 1
            ours = live.get(k)
            if ours is None or ours.dtype != stored[k].dtype or not torch.equal(ours.detach().cpu(), stored[k]):
                others_mismatched.append(k)
        missing = [k for k in live if k not in index and k.rsplit(".", 1)[0] not in quantized and k in expected]
        others_mismatched.extend(missing)

    resident = {k: v for k, v in store.model.state_dict().items() if store.layer_index(k) is None}
    check(resident, by_layer.get(None, []), sorted(n for n in quantized if store.layer_index(n) is None))
    for i in range(len(store.layers)):
        prefix = store.prefix(i)
        layer = store.materialize(i)
        try:
            live = {prefix + k: v for k, v in layer.state_dict().items()}
            check(live, by_layer.get(i, []), sorted(n for n in quantized if n.startswith(prefix)))
        finally:
            store.release(i, dirty=False)
    loader = (f"qwenquant spec reader for {fmt} ({read.__module__}), one decoder layer at a time, compared bit for "
              "bit with the live offloaded weights, every other tensor too (--offload-dir: no full-model reload; KL "
              "vs source is the in-memory quantized model's)")
    problems = [(mismatched, "stored weights read back differ from ours"),
                (others_mismatched, "stored tensors differ from ours or are missing")]
    return verdict(loader, names, problems, kl_stats(src_logp, q_logp), max_kl,
                    {"mode": "offload", "other_tensors_checked": others_checked,
                     "other_tensors_mismatched": others_mismatched, "vs_quantized_in_memory": kl_stats(q_logp, q_logp)})
