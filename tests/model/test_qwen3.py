"""`checkpoint_shapes` (qwenquant/model/qwen3.py): every tensor of a checkpoint derived from config.json alone (the
dry run before download) equals what transformers saves, for a dense Qwen3, the trained fixture and a Qwen3-MoE with
a dense layer among sparse ones; `attention_bias` adds the attention Linears' biases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import build_tiny_moe
from qwenquant.model.qwen3 import checkpoint_shapes


def _saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            shapes |= {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
    return shapes


def _check(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert checkpoint_shapes(config) == _saved_shapes(folder)


def test_dense_tied(tiny_qwen3) -> None:
    _check(tiny_qwen3)


def test_trained_fixture(mini_model) -> None:
    _check(mini_model)


def test_moe_with_a_dense_layer(tmp_path) -> None:
    build_tiny_moe().save_pretrained(tmp_path)
    _check(tmp_path)
    shapes = checkpoint_shapes(json.loads((tmp_path / "config.json").read_text()))
    assert shapes["model.layers.0.mlp.gate.weight"] == (8, 128)  # the router
    assert "model.layers.1.mlp.gate_proj.weight" in shapes and "model.layers.1.mlp.gate.weight" not in shapes


def test_attention_bias_and_untied_head(tmp_path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, attention_bias=True, tie_word_embeddings=False)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path)
    _check(tmp_path)
    assert checkpoint_shapes(json.loads((tmp_path / "config.json").read_text()))["model.layers.1.self_attn.o_proj.bias"] == (64,)


def test_unsupported_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="not supported"):
        checkpoint_shapes({"architectures": ["LlamaForCausalLM"], "hidden_size": 8})
