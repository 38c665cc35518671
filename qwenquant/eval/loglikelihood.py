"""lm-eval log-likelihood requests in few, full forwards: `BatchedLM` is lm-eval's `HFLM` with its
`_loglikelihood_tokens` replaced; tokenization, prompts, generation and scoring stay lm-eval's.

What a request is: lm-eval turns each (context, continuation) pair into token ids; its log-likelihood is the sum of
the log-probabilities of the continuation tokens after the context, and `is_greedy` says whether each of them is the
argmax. A model input is `(context + continuation)[-(max_length + 1):][:-1]`, as HFLM builds it.

How they are batched (HFLM 0.4.13 ran fixed groups of `batch_size` rows, each forward taking a log-softmax over
every position of the batch and the whole vocabulary):
- requests with the same input run once: every choice of a task whose continuations are one token (C-Eval's " A"
  to " D") shares one input;
- the distinct inputs, longest first, are cut into batches of at most `max_batch_tokens` padded tokens (`qwenquant.eval.tasks.MAX_BATCH_TOKENS`) and
  `batch_size` rows; one forward per batch, right-padded without an attention mask as HFLM does (a causal model's
  logits at a position do not depend on the tokens after it);
- the forward returns logits only from the first continuation position of the batch on (`logits_to_keep`), and the
  log-softmax (float32) runs only on each request's continuation positions.
The numbers equal HFLM's one-request-at-a-time path within float noise (batched matmuls sum in another order; tests/
eval/test_loglikelihood.py); on the CPU the forwards compute in float32 (`qwenquant.eval.precision`, applied around
the whole lm-eval run by `qwenquant.eval.tasks.run_tasks`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm



def token_batches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[range]:
    """Consecutive index ranges over `lengths` (sorted longest first) whose padded size, rows x first length,
    stays within `max_tokens` and `max_rows` (a single row longer than `max_tokens` is a batch of its own)."""
    batches, start = [], 0
    while start < len(lengths):
        end = start + 1
        while end < len(lengths) and end - start < max_rows and (end - start + 1) * lengths[start] <= max_tokens:
            end += 1
        batches.append(range(start, end))
        start = end
    return batches


class BatchedLM(HFLM):
    """HFLM whose log-likelihood requests run in token-budgeted batches (see the module doc): at most
    `max_batch_tokens` padded tokens and `batch_size` requests per forward."""

    def __init__(self, *args, max_batch_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_batch_tokens = max_batch_tokens

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        del override_bs  # batches are cut by max_batch_tokens and batch_size
        inputs = [self._input(ctx, cont) for _key, ctx, cont in requests]
        users: dict[tuple[int, ...], list[int]] = {}
        for i, tokens in enumerate(inputs):
            users.setdefault(tokens, []).append(i)
        distinct = sorted(users, key=lambda t: (-len(t), t))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        for batch in token_batches([len(t) for t in distinct], self.max_batch_tokens, self.batch_size):
            rows = [distinct[i] for i in batch]
            conts = [[requests[q][2] for q in users[t]] for t in rows]
            for r, scores in enumerate(self._score_batch(rows, conts)):
                for q, answer in zip(users[rows[r]], scores):
                    results[q] = answer
                    if requests[q][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[q][0], answer)
                    bar.update(1)
        bar.close()
        return results

    def _input(self, ctx: list[int], cont: list[int]) -> tuple[int, ...]:
        if not ctx or not cont:
            raise ValueError("a log-likelihood request needs a non-empty context and continuation")
        if len(cont) > self.max_length:
            raise ValueError(f"continuation of {len(cont)} tokens is longer than the model's {self.max_length}")
        return tuple((ctx + cont)[-(self.max_length + 1):][:-1])

    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[int, ...]], conts: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
        """One forward over `rows` (right-padded); for each row, (log-likelihood, is_greedy) of each continuation."""
        width = len(rows[0])
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for r, tokens in enumerate(rows):
            ids[r, : len(tokens)] = torch.tensor(tokens)
        first = min(len(t) - max(len(c) for c in cs) for t, cs in zip(rows, conts))
        keep = width - first  # logits of positions first .. width-1
        logits = self.model(input_ids=ids.to(self.device), logits_to_keep=keep).logits
        out = []
        for r, (tokens, cs) in enumerate(zip(rows, conts)):
            scores = []
            for cont in cs:
                start = len(tokens) - len(cont) - first
                logp = F.log_softmax(logits[r, start : start + len(cont)], dim=-1, dtype=torch.float32)
                target = torch.tensor(cont, device=logp.device)
                scores.append((float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
            out.append(scores)
        return out
