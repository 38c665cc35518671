"""Perplexity (GPTQ-paper convention) and next-token KL divergence between two models.

Convention: WikiText-2 raw rows joined with "\\n\\n", tokenized once, split into non-overlapping windows of
`window` tokens (the tail shorter than a window is dropped); perplexity = exp(mean token NLL over all windows).
A run measures the first DEFAULT_WINDOWS windows unless told `all`, and its report says which (`windows_setting`).
These functions compute in whatever dtype the model's forward does; their callers run them inside
`qwenquant.eval.precision.evaluation_precision` (float32 on the CPU).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from qwenquant.errors import BadInputError

# Perplexity windows an evaluation uses unless told otherwise: the first 4 (4 x 2048 = 8,188 predicted tokens) cost
# seconds per model on a CPU, the whole WikiText-2 test (201 windows for qwen3-mini) minutes; `all` (None) is the
# whole text. The recipe field eval.max_windows, --eval-windows and `qwenquant eval` take this default.
DEFAULT_WINDOWS = 4
WIKITEXT_CANDIDATES = ("../shared/data/wikitext2/wiki.test.raw", "../../shared/data/wikitext2/wiki.test.raw")


def find_wikitext2_test() -> Path | None:
    """WikiText-2 raw test: $QWENQUANT_WIKITEXT2, or ../shared beside the working dir or the repo."""
    env = os.environ.get("QWENQUANT_WIKITEXT2")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for base in (Path.cwd(), repo):
        for rel in WIKITEXT_CANDIDATES:
            p = (base / rel).resolve()
            if p.is_file():
                return p
    return None


def load_eval_text(spec: str) -> tuple[str, str]:
    """(text, description). `wikitext2` finds the raw test split locally, else loads it from the hub."""
    if spec == "wikitext2":
        path = find_wikitext2_test()
        if path is not None:
            rows = path.read_text(encoding="utf-8").split("\n")
            return "\n\n".join(rows), f"WikiText-2 raw test ({path.name}), rows joined with \\n\\n"
        try:
            from datasets import load_dataset

            ds = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
        except Exception as err:
            raise BadInputError(
                f"WikiText-2 test not found locally and not loadable from the hub ({type(err).__name__}); "
                "pass --eval-text FILE or --no-ppl"
            ) from err
        return "\n\n".join(ds["text"]), "WikiText-2 raw test (hub), rows joined with \\n\\n"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BadInputError(f"--eval-text {spec}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise BadInputError(f"--eval-text {spec}: file is empty")
    return text, f"{path.name} (as is)"


def eval_windows(tokenizer, text: str, window: int, max_windows: int | None) -> torch.Tensor:
    """[n_windows, window] token ids."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // window
    if n == 0:
        raise BadInputError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {window}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * window].view(n, window)


def windows_setting(window: int, windows: int, text_windows: int) -> dict:
    """How much of the text a perplexity measures, as reports state it: `windows` of `window` tokens
    (`ppl_tokens` predicted tokens), out of the `text_windows` the whole text has (`whole_text`: all of them)."""
    return {"window": window, "windows": windows, "ppl_tokens": windows * (window - 1), "text_windows": text_windows,
            "whole_text": windows == text_windows}


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int
    windows: int
    window: int

    def to_dict(self) -> dict:
        return asdict(self)


def _window_nll(logits: torch.Tensor, row: torch.Tensor) -> float:
    """Summed next-token NLL of one window from its logits [window, vocab] (float32 cross-entropy)."""
    return float(F.cross_entropy(logits[:-1].float(), row[1:].to(logits.device), reduction="sum"))


def _window_logprobs(logits: torch.Tensor, store_dtype: torch.dtype) -> torch.Tensor:
    """[window, vocab] log-probabilities on CPU in `store_dtype` (bounded memory for KL)."""
    return F.log_softmax(logits.float(), dim=-1).to("cpu", store_dtype)


def _forward_logits(model, row: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model(input_ids=row.unsqueeze(0).to(device), use_cache=False).logits[0]


def _ppl_result(total_nll: float, windows: torch.Tensor) -> PerplexityResult:
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    mean = total_nll / tokens
    return PerplexityResult(float(torch.exp(torch.tensor(mean))), mean, tokens, windows.shape[0], windows.shape[1])


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: torch.device, on_step: Callable[[], None] | None = None) -> PerplexityResult:
    """exp(mean NLL of next-token prediction) over non-overlapping windows."""
    total_nll = 0.0
    for row in windows:
        total_nll += _window_nll(_forward_logits(model, row, device), row)
        if on_step:
            on_step()
    return _ppl_result(total_nll, windows)


@torch.no_grad()
def next_token_logprobs(model, windows: torch.Tensor, device: torch.device, store_dtype=torch.float16) -> torch.Tensor:
    """[n_windows, window, vocab] log-probabilities, kept on CPU in `store_dtype` to bound memory."""
    return torch.stack([_window_logprobs(_forward_logits(model, row, device), store_dtype) for row in windows])


def union_windows(a: torch.Tensor | None, b: torch.Tensor) -> tuple[torch.Tensor, slice | None, slice]:
    """(windows covering both sets, rows of `a` in them, rows of `b` in them): the longer set alone when the
    shorter is its prefix (how a run picks its perplexity and KL windows), else both stacked."""
    if a is None:
        return b, None, slice(0, b.shape[0])
    na, nb = a.shape[0], b.shape[0]
    long, short = (a, b) if na >= nb else (b, a)
    if torch.equal(long[: short.shape[0]], short):
        return long, slice(0, na), slice(0, nb)
    return torch.cat([a, b]), slice(0, na), slice(na, na + nb)


@torch.no_grad()
def evaluate_windows(model, ppl_windows: torch.Tensor | None, kl_windows: torch.Tensor, device: torch.device,
                     on_step: Callable[[], None] | None = None) -> tuple[PerplexityResult | None, torch.Tensor]:
    """(`perplexity(model, ppl_windows)` or None, `next_token_logprobs(model, kl_windows)`), bit for bit, with one
    forward per distinct window (the KL windows are a prefix of the perplexity windows in a run). `on_step` is
    called after each forward."""
    windows, ppl_rows, kl_rows = union_windows(ppl_windows, kl_windows)
    total_nll, logp = 0.0, []
    for i, row in enumerate(windows):
        logits = _forward_logits(model, row, device)
        if ppl_rows is not None and ppl_rows.start <= i < ppl_rows.stop:
            total_nll += _window_nll(logits, row)
        if kl_rows.start <= i < kl_rows.stop:
            logp.append(_window_logprobs(logits, torch.float16))
        if on_step:
            on_step()
    return (_ppl_result(total_nll, ppl_windows) if ppl_windows is not None else None), torch.stack(logp)


def kl_stats(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Mean/max per-token KL(reference || other) in nats, and top-1 agreement, from log-probabilities."""
    p_log, q_log = reference.float(), other.float()
    # No per-token clamp: fp16 storage makes single tokens slightly negative, and clamping them would bias the
    # mean upwards (+11% on FP8 weight-only, measured in benchmarks/); the mean itself is clamped at 0.
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)  # [windows, tokens]
    top1 = (p_log.argmax(-1) == q_log.argmax(-1)).float().mean()
    return {"mean_kl": max(float(kl.mean()), 0.0), "max_kl": float(kl.max()), "top1_agreement": float(top1),
            "tokens": kl.numel()}
