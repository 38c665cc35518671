"""Synthetic passkey retrieval ("needle in a haystack") at several context lengths and depths.

A prompt of exactly `length` tokens is: H haystack tokens (a contiguous stretch of the evaluation text, from a
seeded offset) with the needle " The pass key is K. Remember it. K is the pass key." inserted after
round(depth x H) of them, then the question " What is the pass key? The pass key is". K is a 5-digit key. Tokenizers
merge digits differently (qwen3-mini's: " 12345" is " 1", "23", "45" but " 99999" is " ", "9999", "9"), so the
distractor keys are drawn until each answer " K" has as many tokens as the true key's: log-likelihoods summed over
the same number of tokens.

Two scores per prompt, because a tiny model rarely retrieves exactly and a score that is 0 everywhere says nothing:
- `exact`: greedy decoding reproduces " K": the argmax at each answer position, teacher-forced, is the key's token
  (greedy output equals the answer exactly when every teacher-forced argmax does);
- `rank`: the answer's log-likelihood (sum over its tokens) ranked among itself and `candidates - 1` distractor keys
  drawn with the same seed (0 = the true key is the most likely; chance of rank 0 is 1 / candidates).

Keys, distractors and haystack offsets depend only on (seed, length, trial), so every depth of one trial hides the
same key in the same text, and source and quantized model see identical prompts.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
KEY_DIGITS = 5
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
DEFAULT_TRIALS = 4
DEFAULT_CANDIDATES = 10


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: `ids` [length] (haystack with the needle at `needle_start`, then the question), the true key's
    answer tokens `answer` (space + digits) and every candidate's (`candidates[0]` is the true key)."""

    length: int
    depth: float
    trial: int
    key: str
    ids: list[int]
    needle_start: int
    needle: list[int]
    candidates: list[list[int]]

    @property
    def answer(self) -> list[int]:
        return self.candidates[0]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _keys(tokenizer, rng: random.Random, n: int) -> tuple[list[str], list[list[int]]]:
    """`n` distinct keys (the first is the true one) whose answers " K" all have the true answer's token count."""
    keys: list[str] = []
    answers: list[list[int]] = []
    for _ in range(100 * n + 1000):
        k = str(rng.randint(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS - 1))
        a = _encode(tokenizer, " " + k)
        if k not in keys and (not answers or len(a) == len(answers[0])):
            keys.append(k)
            answers.append(a)
            if len(keys) == n:
                return keys, answers
    raise ValueError(f"could not draw {n} keys tokenized to {len(answers[0])} tokens like the true key")


def build_prompts(tokenizer, haystack: list[int], lengths: list[int], depths: list[float], trials: int, seed: int,
                  candidates: int = DEFAULT_CANDIDATES) -> list[PasskeyPrompt]:
    """Every (length, depth, trial) prompt, deterministic in `seed` (module docstring). `haystack` is the token
    stream haystacks are cut from; ValueError when it or a length is too short to hold needle and question."""
    question = _encode(tokenizer, QUESTION)
    prompts = []
    for length in lengths:
        for trial in range(trials):
            rng = random.Random(f"passkey-{seed}-{length}-{trial}")
            keys, answers = _keys(tokenizer, rng, candidates)
            needle = _encode(tokenizer, NEEDLE.format(key=keys[0]))
            h = length - len(needle) - len(question)
            if h < 1:
                raise ValueError(f"context length {length} cannot hold the needle and question "
                                 f"({len(needle) + len(question)} tokens)")
            if len(haystack) < h:
                raise ValueError(f"the haystack text has {len(haystack)} tokens, fewer than {h}")
            start = rng.randint(0, len(haystack) - h)
            stack = haystack[start:start + h]
            for depth in depths:
                at = round(depth * h)
                ids = stack[:at] + needle + stack[at:] + question
                prompts.append(PasskeyPrompt(length, depth, trial, keys[0], ids, at, needle, answers))
    return prompts


def _forward(model, ids: torch.Tensor, cache):
    return model(input_ids=ids, cache=cache, use_cache=True).logits[0].float()


@torch.no_grad()
def score_prompt(model, prompt: PasskeyPrompt, device: torch.device, make_cache: Callable[[int], object]) -> dict:
    """{exact, rank, logp (the true key's digits), candidates}: one prefill of the prompt into a fresh cache from
    `make_cache(max_len)` (a bf16 or fp8 KV cache), then each candidate's answer fed from a copy of it."""
    cache = make_cache(prompt.length + len(prompt.answer))
    ids = torch.tensor([prompt.ids], dtype=torch.long, device=device)
    first = F.log_softmax(_forward(model, ids, cache)[-1], dim=-1)  # predicts each answer's first token
    logps, exact = [], False
    for i, cand in enumerate(prompt.candidates):
        c = torch.tensor([cand], dtype=torch.long, device=device)
        lp = float(first[cand[0]])
        argmax = first.argmax().view(1).cpu()
        if len(cand) > 1:
            rest = F.log_softmax(_forward(model, c[:, :-1], copy.deepcopy(cache)), dim=-1)  # [len - 1, vocab]
            lp += float(rest.gather(1, c[0, 1:, None]).sum())
            argmax = torch.cat([argmax, rest.argmax(-1).cpu()])
        logps.append(lp)
        if i == 0:
            exact = bool(torch.equal(argmax, c[0].cpu()))
    rank = sum(lp > logps[0] for lp in logps[1:])
    return {"exact": exact, "rank": int(rank), "logp": logps[0], "candidates": len(prompt.candidates)}


def summarize(prompts: list[PasskeyPrompt], scores: list[dict]) -> dict:
    """Accuracies by length x depth and overall: exact (greedy) and rank-0 (log-likelihood) accuracy, mean rank."""
    cells: dict[tuple[int, float], list[dict]] = {}
    for p, s in zip(prompts, scores):
        cells.setdefault((p.length, p.depth), []).append(s)

    def agg(rows: list[dict]) -> dict:
        n = len(rows)
        return {"n": n, "exact": sum(r["exact"] for r in rows) / n, "top1": sum(r["rank"] == 0 for r in rows) / n,
                "mean_rank": sum(r["rank"] for r in rows) / n, "mean_logp": sum(r["logp"] for r in rows) / n}

    by_cell = [{"length": k[0], "depth": k[1]} | agg(v) for k, v in sorted(cells.items())]
    by_length = {}
    for p, s in zip(prompts, scores):
        by_length.setdefault(p.length, []).append(s)
    return {"overall": agg(scores), "by_length": {str(k): agg(v) for k, v in sorted(by_length.items())},
            "cells": by_cell, "chance_top1": 1.0 / scores[0]["candidates"] if scores else None}
