"""Accuracy at length: perplexity on long documents in a sweep of window lengths, and passkey retrieval
(`qwenquant.eval.passkey`), each with a bf16 or an FP8 KV cache.

Long documents: the text is split into articles at WikiText's top-level headings (" = Title = " rows; a text without
them is one article), consecutive articles are joined (rows with "\\n\\n", as the perplexity convention does) until
they hold `max(lengths)` tokens, and each such group gives the documents of exactly that many tokens it holds, the
first starting at an article start. For each window w of the sweep every document is cut into max/w non-overlapping windows, so all
window lengths predict (almost) the same tokens and differ only in how much context precedes them; the longest
window's per-token NLL is also reported by position (does the model use, or break on, far context).

KV cache: `bf16` runs the plain forward (no cache: bit for bit `perplexity.perplexity` on the same windows); `fp8`
runs each window through `kernels.kv_cache.make_static_cache(kv_dtype="fp8")`, so attention reads K/V stored as
float8_e4m3 with one scale per layer for K and one for V, taken from the checkpoint's calibrated scales when given
(`kv_scales`, from `checkpoint_kv_scales`: per layer or per KV head) or else from the window's prefill
absmax / 448 (uncalibrated).

Bad input: a length beyond the model's max_position_embeddings is refused before any weight loads (`check_lengths`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from qwenquant.errors import BadInputError
from qwenquant.eval import passkey
from qwenquant.eval.perplexity import _ppl_result, _window_nll, perplexity
from qwenquant.kernels.kv_cache import KV_DTYPES, make_static_cache

DEFAULT_DOCS = 4
MIN_LENGTH = 512
ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")
POSITION_BUCKETS = 8
HAYSTACK_CHARS_PER_TOKEN = 40


@dataclass(frozen=True)
class LongContextSettings:
    """What the long-context evaluation measures: window `lengths` (the longest is the document length), `docs`
    documents, passkey `depths` (fractions) x `trials` keys per length with `candidates` keys ranked, each KV cache
    setting in `kv_caches` (bf16, fp8), keys and haystacks from `seed`."""

    lengths: tuple[int, ...]
    docs: int = DEFAULT_DOCS
    depths: tuple[float, ...] = passkey.DEFAULT_DEPTHS
    trials: int = passkey.DEFAULT_TRIALS
    candidates: int = passkey.DEFAULT_CANDIDATES
    kv_caches: tuple[str, ...] = ("bf16",)
    seed: int = 0
    kv_scales: dict = field(default_factory=dict)  # {layer: (k_scale, v_scale)}: calibrated scales, else prefill's

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 64 for n in self.lengths):
            raise BadInputError(f"--context-lengths must be >= 64 tokens each, got {list(self.lengths)}")
        longest = max(self.lengths)
        if any(longest % n for n in self.lengths):
            raise BadInputError(f"--context-lengths {','.join(map(str, self.lengths))}: each must divide the longest "
                                f"({longest}), so every window covers the same documents; e.g. 512,1024,2048,4096")
        if self.docs < 1 or self.trials < 0 or self.candidates < 2:
            raise BadInputError("--long-docs must be >= 1, --passkey-trials >= 0 (0: no passkey test)")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise BadInputError(f"--passkey-depths are percentages 0-100, got {[100 * d for d in self.depths]}")
        bad = [k for k in self.kv_caches if k not in KV_DTYPES]
        if bad or not self.kv_caches:
            raise BadInputError(f"--kv-cache {','.join(bad) or '(empty)'}: use bf16, fp8 or bf16,fp8")


def default_lengths(max_positions: int) -> tuple[int, ...]:
    """512, 1024, ... up to the largest power of two within the model's max positions (and that maximum, when it
    is not a power of two, is not included: the sweep needs lengths dividing the longest)."""
    lengths, n = [], MIN_LENGTH
    while n <= max_positions:
        lengths.append(n)
        n *= 2
    return tuple(lengths) or (max_positions,)


def rope_summary(config: dict) -> dict:
    """{type, factor, original_max_position_embeddings} from transformers 5's rope_parameters (or rope_scaling)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return {"type": params.get("rope_type") or params.get("type") or "default", "factor": params.get("factor"),
            "original_max_position_embeddings": params.get("original_max_position_embeddings")}


def check_lengths(lengths, config: dict, flag: str = "--context-lengths") -> None:
    """BadInputError when a length exceeds what the model's config allows (max_position_embeddings)."""
    cfg = config.get("text_config") or config
    limit = cfg.get("max_position_embeddings")
    if limit is None or max(lengths) <= limit:
        return
    rope = rope_summary(cfg)
    if rope["type"] == "yarn":
        fix = f"its YaRN factor {rope['factor']} allows {limit}; raise the factor and max_position_embeddings"
    else:
        fix = (f"extend it with YaRN in config.json (rope_parameters rope_type yarn, factor "
               f"{-(-max(lengths) // limit)}, original_max_position_embeddings {limit}; max_position_embeddings "
               f"{max(lengths)}) or pass lengths up to {limit}")
    raise BadInputError(f"{flag}: {max(lengths)} tokens exceed the model's max_position_embeddings {limit} "
                        f"(rope {rope['type']}); {fix}")


def articles(text: str) -> list[str]:
    """The text's articles: rows (split on the "\\n\\n" the convention joins them with) grouped at top-level
    WikiText headings; one article when there are none."""
    groups: list[list[str]] = []
    for row in text.split("\n\n"):
        if ARTICLE_HEADING.match(row) or not groups:
            groups.append([])
        groups[-1].append(row)
    return ["\n\n".join(g) for g in groups]


def long_documents(tokenizer, text: str, length: int, docs: int) -> torch.Tensor:
    """[n <= docs, length] token ids: consecutive articles joined until they hold `length` tokens (module doc)."""
    out, pending = [], []
    for article in articles(text):
        pending.append(article)
        ids = tokenizer("\n\n".join(pending), add_special_tokens=False)["input_ids"]
        if len(ids) >= length:  # as many documents as the group holds, the first at its start
            out += [torch.tensor(ids[i:i + length], dtype=torch.long) for i in range(0, len(ids) - length + 1, length)]
            pending = []
            if len(out) >= docs:
                break
    if not out:
        raise BadInputError(f"the evaluation text holds fewer than {length} tokens: too short for a {length}-token "
                            "document; pass a longer --eval-text or shorter --context-lengths")
    return torch.stack(out[:docs])


def checkpoint_kv_scales(folder) -> dict:
    """{layer: (k_scale, v_scale)} calibrated by `--kv-cache fp8` and stored in the folder (compressed-tensors
    kv_cache_scheme), as the FP8 cache takes them; empty when the checkpoint has none."""
    from qwenquant.eval.verify import read_kv_scales
    from qwenquant.kernels.checkpoint_records import kv_cache_scales

    stored = read_kv_scales(folder)
    return kv_cache_scales({f"{m}.{n}": t for m, (k, v) in stored.items() for n, t in (("k_scale", k), ("v_scale", v))})


def _cache_factory(model, kv_cache: str, kv_scales: dict) -> Callable[[int], object]:
    return lambda max_len: make_static_cache(model.config, max_len, kv_cache, kv_scales or None)


def _window_logits(model, row: torch.Tensor, device: torch.device, make_cache) -> torch.Tensor:
    ids = row.unsqueeze(0).to(device)
    if make_cache is None:
        return model(input_ids=ids, use_cache=False).logits[0]
    return model(input_ids=ids, cache=make_cache(row.numel()), use_cache=True).logits[0]


@torch.no_grad()
def window_sweep(model, documents: torch.Tensor, lengths, device: torch.device, kv_cache: str = "bf16",
                 kv_scales: dict | None = None, on_step: Callable[[], None] | None = None) -> dict:
    """{str(w): PerplexityResult dict} for each window w (documents cut into w-token windows) and `by_position`:
    mean NLL of the longest window's tokens in POSITION_BUCKETS equal position ranges."""
    make_cache = None if kv_cache == "bf16" else _cache_factory(model, kv_cache, kv_scales or {})
    longest = documents.shape[1]
    out: dict = {}
    for w in sorted(lengths):
        windows = documents.reshape(-1, w)
        if make_cache is None and w != longest:
            out[str(w)] = perplexity(model, windows, device, on_step).to_dict()
            continue
        total, per_pos = 0.0, torch.zeros(w - 1)
        for row in windows:
            logits = _window_logits(model, row, device, make_cache)
            nll = F.cross_entropy(logits[:-1].float(), row[1:].to(logits.device), reduction="none").cpu()
            total += float(nll.sum()) if make_cache is not None else _window_nll(logits, row)
            per_pos += nll
            if on_step:
                on_step()
        out[str(w)] = _ppl_result(total, windows).to_dict()
        if w == longest:
            buckets = (per_pos / windows.shape[0]).tensor_split(POSITION_BUCKETS)
            edges = [0] + [int(x) for x in torch.tensor([b.numel() for b in buckets]).cumsum(0)]
            out["by_position"] = [{"from": edges[i] + 1, "to": edges[i + 1], "mean_nll": float(b.mean())}
                                  for i, b in enumerate(buckets)]
    return out


def sweep_steps(documents: torch.Tensor, lengths) -> int:
    return sum(documents.numel() // w for w in lengths)


def passkey_run(model, tokenizer, haystack: list[int], s: LongContextSettings, device: torch.device, kv_cache: str,
                on_step: Callable[[], None] | None = None) -> dict:
    """`passkey.summarize` of every prompt scored with `kv_cache`."""
    prompts = passkey.build_prompts(tokenizer, haystack, list(s.lengths), list(s.depths), s.trials, s.seed,
                                    s.candidates)
    make_cache = _cache_factory(model, kv_cache, s.kv_scales)
    scores = []
    for p in prompts:
        scores.append(passkey.score_prompt(model, p, device, make_cache))
        if on_step:
            on_step()
    return passkey.summarize(prompts, scores)


def measure_long_context(model, tokenizer, text: str, s: LongContextSettings, device: torch.device,
                         log: Callable[[str], None] = lambda msg: None,
                         on_step: Callable[[], None] | None = None) -> dict:
    """{settings, documents, by_kv_cache {bf16|fp8: {perplexity: `window_sweep`, passkey: summary | None}}}.
    The caller runs it inside `evaluation_precision` (float32 on the CPU)."""
    documents = long_documents(tokenizer, text, max(s.lengths), s.docs)
    if documents.shape[0] < s.docs:
        log(f"the text holds only {documents.shape[0]} documents of {max(s.lengths)} tokens (asked {s.docs})")
    # haystacks come from the first HAYSTACK_CHARS_PER_TOKEN x longest characters (about 10 prompts' worth of text)
    prefix = text[: HAYSTACK_CHARS_PER_TOKEN * max(s.lengths)]
    haystack = list(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if s.trials else []
    result = {"settings": {"lengths": list(s.lengths), "docs": s.docs, "depths": list(s.depths), "trials": s.trials,
                           "candidates": s.candidates, "seed": s.seed, "kv_caches": list(s.kv_caches),
                           "kv_scales": "calibrated (checkpoint)" if s.kv_scales else "prefill absmax / 448"},
              "rope": rope_summary(model.config.to_dict()),
              "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
              "documents": int(documents.shape[0]), "document_tokens": int(documents.shape[1]), "by_kv_cache": {}}
    for kv in s.kv_caches:
        log(f"long context, {kv} KV cache: perplexity over {documents.shape[0]} documents of "
            f"{documents.shape[1]} tokens at windows {', '.join(map(str, sorted(s.lengths)))}")
        entry = {"perplexity": window_sweep(model, documents, s.lengths, device, kv, s.kv_scales, on_step),
                 "passkey": None}
        if s.trials:
            log(f"passkey: {len(s.lengths) * len(s.depths) * s.trials} prompts")
            entry["passkey"] = passkey_run(model, tokenizer, haystack, s, device, kv, on_step)
        result["by_kv_cache"][kv] = entry
    return result
