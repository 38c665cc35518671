"""The chat prompts every runtime check generates from greedily (transformers, llama.cpp, onnxruntime-genai), and
how they become token ids: through the model's own chat template, as a user's request would."""

from __future__ import annotations

PROMPTS = ("Write one sentence about the sea.", "What is 12 plus 7?", "Name three colours.")
GREEDY_TOKENS = 24


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt` as one user turn with the generation prompt appended."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def eos_ids(model) -> set[int]:
    """The model's end-of-sequence ids (its generation config may hold one or several)."""
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
