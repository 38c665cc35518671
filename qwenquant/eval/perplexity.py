"""Perplexity (GPTQ-paper convention) and next-token KL divergence between two models.

Convention: WikiText-2 raw rows joined with "\\n\\n", tokenized once, split into non-overlapping windows of
`window` tokens (the tail shorter than a window is dropped); perplexity = exp(mean token NLL over all windows).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from qwenquant.errors import BadInputError

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


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int
    windows: int
    window: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: torch.device, on_step: Callable[[], None] | None = None) -> PerplexityResult:
    """exp(mean NLL of next-token prediction) over non-overlapping windows."""
    total_nll, total_tokens = 0.0, 0
    for row in windows:
        logits = model(input_ids=row.unsqueeze(0).to(device), use_cache=False).logits[0, :-1].float()
        nll = F.cross_entropy(logits, row[1:].to(device), reduction="sum")
        total_nll += float(nll)
        total_tokens += row.numel() - 1
        if on_step:
            on_step()
    mean = total_nll / total_tokens
    return PerplexityResult(float(torch.exp(torch.tensor(mean))), mean, total_tokens, windows.shape[0], windows.shape[1])


@torch.no_grad()
def next_token_logprobs(model, windows: torch.Tensor, device: torch.device, store_dtype=torch.float16) -> torch.Tensor:
    """[n_windows, window, vocab] log-probabilities, kept on CPU in `store_dtype` to bound memory."""
    out = []
    for row in windows:
        logits = model(input_ids=row.unsqueeze(0).to(device), use_cache=False).logits[0].float()
        out.append(F.log_softmax(logits, dim=-1).to("cpu", store_dtype))
    return torch.stack(out)


def kl_stats(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Mean/max per-token KL(reference || other) in nats, and top-1 agreement, from log-probabilities."""
    p_log, q_log = reference.float(), other.float()
    # No per-token clamp: fp16 storage makes single tokens slightly negative, and clamping them would bias the
    # mean upwards (+11% on FP8 weight-only, measured in benchmarks/); the mean itself is clamped at 0.
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)  # [windows, tokens]
    top1 = (p_log.argmax(-1) == q_log.argmax(-1)).float().mean()
    return {"mean_kl": max(float(kl.mean()), 0.0), "max_kl": float(kl.max()), "top1_agreement": float(top1),
            "tokens": kl.numel()}
