"""The model without its weights: the module tree on the meta device, built from config.json alone, plus the
small files a checkpoint carries beside its weights (generation config, tokenizer).

Used where a run must know the model's structure (state-dict order, Linear modules, tied embeddings) without holding
its weights: --offload-dir (qwenquant/model/offload.py) and the data-free streaming path (qwenquant/stream/)."""

from __future__ import annotations

import torch
from torch import nn

from qwenquant.errors import BadInputError
from qwenquant.model.loader import DTYPES
from qwenquant.model.moe import unfuse_experts


def meta_skeleton(resolved, dtype: str) -> nn.Module:
    """The model on the meta device in `dtype`, MoE experts split into one Linear per projection as on disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise BadInputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    try:
        config = AutoConfig.from_pretrained(resolved.path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    except Exception as err:
        raise BadInputError(f"--model {resolved.reference}: transformers could not build it ({err})") from err
    model.eval()
    if resolved.adapter.moe is not None:
        unfuse_experts(model, resolved.adapter)
    return model


def load_generation_config(path):
    """The generation config from_pretrained would attach (transformers' adjust_generation_fn)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path, _from_auto=True)
    except OSError:
        return GenerationConfig.from_pretrained(path, config_file_name="config.json", _from_auto=True,
                                                _from_model_config=True)


def load_tokenizer(resolved):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolved.path)
    except Exception as err:
        raise BadInputError(f"--model {resolved.reference}: tokenizer could not be loaded ({err})") from err
