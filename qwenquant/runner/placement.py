"""Where the model being quantized lives, behind one interface: all in host memory (`ResidentModel`), or with its
decoder layers on disk and materialized one at a time (`OffloadedModel`, --offload-dir, qwenquant/model/offload.py).

The run asks the same questions of both: evaluate (perplexity + next-token log-probs), hand the loop its layer store,
stream the state dict to the exporter, verify the written checkpoint, load a fresh copy of the source.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from qwenquant.activations import activation_quantization
from qwenquant.eval.layerwise import evaluate_layerwise
from qwenquant.eval.perplexity import evaluate_windows, union_windows
from qwenquant.eval.precision import evaluation_precision
from qwenquant.eval.verify import verify_checkpoint, verify_offloaded
from qwenquant.kv_simulation import kv_cache_quantization
from qwenquant.export.registry import FORMATS
from qwenquant.model.loader import load_model
from qwenquant.model.offload import load_offloaded
from qwenquant.progress import Reporter


class ResidentModel:
    """The whole model in host memory; moved to the compute device for evaluation."""

    layer_store = None  # the loop onloads one decoder layer at a time from host memory itself

    def __init__(self, resolved, dtype: str):
        self.resolved, self.dtype = resolved, dtype
        self.model, self.tokenizer = load_model(resolved, dtype)

    def load_source(self):
        """A fresh copy of the source model (mixed precision quantizes one per candidate)."""
        return load_model(self.resolved, self.dtype)[0]

    @torch.no_grad()
    def evaluate(self, model, windows, kl_windows, device, reporter: Reporter, label: str, act_specs=None,
                 kv_scales=None):
        """(perplexity over `windows` or None, log-probs over `kl_windows`), with activation quantization and an FP8
        KV cache (`kv_scales`, qwenquant/kv_simulation.py) if given; one forward per distinct window, in float32 on
        the CPU (qwenquant/eval/precision.py)."""
        with activation_quantization(model, act_specs) if act_specs else nullcontext(), \
                kv_cache_quantization(model, kv_scales or {}):
            model.to(device)
            try:
                n = union_windows(windows, kl_windows)[0].shape[0]
                what = "perplexity + KL" if windows is not None else "KL"
                with evaluation_precision(model, device), reporter.step(f"{what} ({label})", n) as advance:
                    return evaluate_windows(model, windows, kl_windows, device, on_step=advance)
            finally:
                model.to("cpu")

    def park(self, model) -> None:
        """Back to host memory after a step that moved the whole model to the compute device (lm-eval tasks)."""
        model.to("cpu")

    def state_dict_items(self, model):
        return model.state_dict().items()

    def verify(self, folder: Path, model, recipe, state, kl_windows, src_logp, q_logp, device) -> dict:
        """Reload the written folder (transformers or the format's spec reader) and compare with the live model."""
        reader = FORMATS[recipe.export.format].reload_with(recipe.record_kind, recipe.quantizer_config,
                                                           self.resolved.adapter.moe is not None)
        return verify_checkpoint(folder, model, list(state.records), reader, recipe.export.format, kl_windows,
                                 src_logp, q_logp, device, recipe.eval.verify_max_kl, state.kv_scales)


class OffloadedModel:
    """Embeddings, final norm and lm_head resident; decoder layers on disk in `folder`, one materialized at a time."""

    def __init__(self, resolved, dtype: str, folder: Path):
        self.resolved, self.folder = resolved, folder
        self.model, self.tokenizer, self.layer_store = load_offloaded(resolved, dtype, folder)

    def load_source(self):
        raise RuntimeError("an offloaded model is quantized once (preflight refuses mixed precision with it)")

    @torch.no_grad()
    def evaluate(self, model, windows, kl_windows, device, reporter: Reporter, label: str, act_specs=None,
                 kv_scales=None):
        """The same results as ResidentModel.evaluate, one decoder layer at a time over all windows (no FP8 KV
        cache: preflight refuses --kv-cache fp8 with --offload-dir)."""
        with activation_quantization(model, act_specs) if act_specs else nullcontext():
            with reporter.step(f"layer-streamed forward ({label})", len(self.layer_store.layers)) as advance:
                return evaluate_layerwise(model, self.layer_store, windows, kl_windows, device, on_layer=advance)

    def park(self, model) -> None:
        """Nothing to do: the decoder layers are on disk, the rest stays on the host."""

    def state_dict_items(self, model):
        return self.layer_store.state_dict_items()

    def verify(self, folder: Path, model, recipe, state, kl_windows, src_logp, q_logp, device) -> dict:
        """No full-model reload: every stored tensor against the live (offloaded) layers, bit for bit."""
        return verify_offloaded(folder, self.layer_store, list(state.records), recipe.export.format, src_logp, q_logp,
                                recipe.eval.verify_max_kl)
