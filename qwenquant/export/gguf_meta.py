"""GGUF metadata of a Qwen3 model: the hyper-parameters llama.cpp's `qwen3` loader reads and the tokenizer, so the
file runs with nothing beside it.

Keys (gguf-py's `Keys`, written through `GGUFWriter.add_*`): `qwen3.block_count`, `.context_length`
(max_position_embeddings), `.embedding_length`, `.feed_forward_length`, `.attention.head_count`, `.head_count_kv`,
`.attention.key_length` / `.value_length` (= head_dim: Qwen3's heads are not hidden / heads), `.rope.freq_base`,
`.attention.layer_norm_rms_epsilon`, and for YaRN `.rope.scaling.type/factor/original_context_length`.
Qwen3-MoE (`qwen3moe`): also `.expert_count`, `.expert_used_count` (top-k) and `.expert_feed_forward_length`
(moe_intermediate_size); llama.cpp's loader makes every layer sparse and renormalizes the top-k weights, so models
with dense layers (mlp_only_layers, decoder_sparse_step) or norm_topk_prob false are refused.
Tokenizer: `tokenizer.ggml.model = gpt2` (byte-level BPE), `.pre` (llama.cpp's pre-tokenizer regex family: `qwen2`
for Qwen's Split regex, `gpt-2` for a plain ByteLevel pre-tokenizer; anything else is refused, since llama.cpp would
split text differently), `.tokens` (by id; ids the tokenizer lacks below vocab_size become `[PADi]`, UNUSED),
`.token_type` (NORMAL, CONTROL for special added tokens, USER_DEFINED for other added ones), `.merges`, the
bos/eos/pad ids, `add_bos_token` as the tokenizer behaves, and `tokenizer.chat_template`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from qwenquant.errors import BadInputError
from qwenquant.model.qwen3 import adapter_for

QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
               "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe"}


def gguf_module():
    """The `gguf` package (llama.cpp's writer), imported when a GGUF is written."""
    try:
        import gguf
    except ImportError:
        raise BadInputError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


INSTALL_HINT = "pip install 'qwenquant[gguf]' (compiles llama.cpp through llama-cpp-python, ~10-20 min)"


def llama_cpp_module():
    """llama_cpp (llama-cpp-python: runs and K-quantizes GGUF files), or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def arch_of(config: dict) -> str:
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise BadInputError(f"GGUF export supports {', '.join(ARCHITECTURES)}, not {arch}; use --format "
                            "compressed-tensors")
    if ARCHITECTURES[arch] == "qwen3moe":
        _check_moe(config)
    return ARCHITECTURES[arch]


def _check_moe(config: dict) -> None:
    """llama.cpp's qwen3moe makes every layer sparse and renormalizes the top-k router weights."""
    n = int(config["num_hidden_layers"])
    dense = sorted(set(config.get("mlp_only_layers") or []) | {i for i in range(n) if (i + 1) % int(
        config.get("decoder_sparse_step") or 1)})
    if dense:
        raise BadInputError(f"GGUF qwen3moe has a sparse MLP in every layer, this model has dense layers {dense} "
                            "(mlp_only_layers / decoder_sparse_step); use --format compressed-tensors")
    if not config.get("norm_topk_prob", True):
        raise BadInputError("GGUF qwen3moe renormalizes the top-k router weights; this model has norm_topk_prob "
                            "false: use --format compressed-tensors")


def num_experts(config: dict) -> int:
    """Experts per sparse layer (0 for a dense model), from the config key model/qwen3.py names."""
    adapter = adapter_for((config.get("architectures") or [""])[0])
    return adapter.moe.num_experts(config) if adapter is not None and adapter.moe is not None else 0


def tensor_names(config: dict):
    """gguf-py's HF -> GGUF tensor name map for this model's architecture."""
    gguf = gguf_module()
    arch = {"qwen3": gguf.MODEL_ARCH.QWEN3, "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE}[arch_of(config)]
    return gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))


def _rope(config: dict) -> dict:
    """rope_theta and scaling from transformers 5's `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    source = params if params.get("rope_type") not in (None, "default") else scaling
    return {"theta": float(theta), "type": kind, "factor": source.get("factor"),
            "original": source.get("original_max_position_embeddings")}


def add_hparams(writer, config: dict, arch: str, name: str) -> None:
    """The hyper-parameters llama.cpp's qwen3 loader reads (module docstring)."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_name(name)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if arch == "qwen3moe":
        writer.add_expert_count(num_experts(config))
        writer.add_expert_used_count(int(config["num_experts_per_tok"]))
        writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    rope = _rope(config)
    writer.add_rope_freq_base(rope["theta"])
    if rope["type"] == "yarn":
        gguf = gguf_module()
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if rope["original"]:
            writer.add_rope_scaling_orig_ctx_len(int(rope["original"]))
    elif rope["type"] != "default":
        raise BadInputError(f"GGUF export writes default or YaRN RoPE; this model's rope_type is {rope['type']!r}")


def pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (module docstring); BadInputError when it has none."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split"
            and (steps[0].get("pattern") or {}).get("Regex") == QWEN2_SPLIT and steps[1].get("type") == "ByteLevel"):
        return "qwen2"
    raise BadInputError(f"GGUF export: llama.cpp has no pre-tokenizer known to match this tokenizer's "
                        f"({json.dumps(pre)[:120]}); only Qwen2/Qwen3's and GPT-2's byte-level BPE are written")


def add_tokenizer(writer, tokenizer, vocab_size: int, bos_id: int | None = None) -> dict:
    """Write the tokenizer (module docstring); `bos_id`: config.json's bos_token_id when the tokenizer names no
    BOS token (Qwen's); returns what was written (for the report)."""
    gguf = gguf_module()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        folder = Path(tmp)
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        if (spec.get("model") or {}).get("type") != "BPE":
            raise BadInputError("GGUF export writes byte-level BPE tokenizers (Qwen's); this one is "
                                f"{(spec.get('model') or {}).get('type')}")
        pre = pre_tokenizer(spec)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):  # gguf-py reads only some files
        special.chat_template = tokenizer.chat_template
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise BadInputError(f"tokenizer has {len(vocab)} tokens but the model's vocab_size is {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[tok] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if bos_id is not None and "bos" not in special.special_token_ids:
        special.special_token_ids["bos"] = int(bos_id)
    ids = tokenizer("x")["input_ids"]
    bos = special.special_token_ids.get("bos")
    special.add_special_token = {"bos": bool(ids) and bos is not None and ids[0] == bos, "eos": False}
    special.add_to_gguf(writer, quiet=True)
    return {"tokens": vocab_size, "merges": len(special.merges), "pre": pre, "special": special.special_token_ids,
            "chat_template": special.chat_template is not None}
