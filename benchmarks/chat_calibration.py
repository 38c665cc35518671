#!/usr/bin/env python
"""Chat vs plain-text calibration (issue 15): does `--calib chat` lower KL on chat-formatted held-out text?

    python benchmarks/chat_calibration.py [--model ../shared/models/qwen3-mini] [--seeds 0,1] [--name chat_calibration]

For each method (W4A16 GPTQ g128, W4A16 AWQ g128, FP8 static activations + smoothing: the schemes whose result
depends on the calibration samples) and each calibration source (`builtin`: the shipped plain en/zh text;
`chat`: the shipped conversations through the model's chat template), 128 x 512 tokens, once per calibration seed,
the source is deep-copied, quantized in memory with `qwenquant.pipeline.run_sequential` exactly as a run does, and
compared with the source on two held-out sets:

* chat: the 96 held-out conversations of `calibration/build_chat.py --held-out` (WikiText-2 *test* paragraphs and the
  CMRC contexts qwen3-mini never saw; the same templated tasks as the shipped set, never the same paragraphs), each
  rendered through the chat template and run as its own sequence (cut at 512 tokens). Mean per-token KL(source ||
  quantized) over all positions, and separately over the answer tokens of assistant turns of thinking and of
  non-thinking conversations (where a thinking/non-thinking mix-up would show);
* plain: the first 8 x 512-token windows of WikiText-2 test (the usual text), to see what chat calibration costs
  there.

The spread between calibration seeds is the noise beside each difference. Prints the table (mean ± half the spread
over seeds) and writes benchmarks/results/<name>.json; the write-up is results/chat_calibration.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "calibration"))

from build_chat import build  # noqa: E402

from qwenquant.activations import activation_quantization  # noqa: E402
from qwenquant.calibration import load_calibration, samples_hash  # noqa: E402
from qwenquant.eval.perplexity import eval_windows, load_eval_text  # noqa: E402
from qwenquant.model.loader import load_model, resolve_model  # noqa: E402
from qwenquant.pipeline import run_sequential  # noqa: E402
from qwenquant.stages.awq import AWQStage  # noqa: E402
from qwenquant.stages.fp8 import FP8Stage  # noqa: E402
from qwenquant.stages.gptq import GPTQStage  # noqa: E402
from qwenquant.stages.smooth import SmoothStage  # noqa: E402
from qwenquant.state import QuantState  # noqa: E402

METHODS = {
    "W4A16 GPTQ g128": lambda: [GPTQStage()],
    "W4A16 AWQ g128": lambda: [AWQStage()],
    "FP8 static + smoothing": lambda: [SmoothStage(), FP8Stage(weights="tensor", activations="static")],
}
CALIBS = ("builtin", "chat")
SEQ = 512


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def chat_eval_set(tokenizer, shared: Path) -> list[dict]:
    """Each held-out conversation's ids [<= SEQ] and masks of its assistant-answer positions (predicting them)."""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assistant = tokenizer("assistant", add_special_tokens=False)["input_ids"]
    out = []
    for conv in build(shared, held_out=True):
        text = tokenizer.apply_chat_template(conv["messages"], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:SEQ]
        answer = torch.zeros(len(ids), dtype=torch.bool)
        i = 0
        while i < len(ids):
            if ids[i] == start and ids[i + 1: i + 1 + len(assistant)] == assistant:
                j = i + 1 + len(assistant)
                while j < len(ids) and ids[j] != end:
                    answer[j] = True
                    j += 1
                i = j
            i += 1
        out.append({"ids": torch.tensor(ids), "answer": answer, "thinking": conv["thinking"]})
    return out


@torch.no_grad()
def logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].float(), dim=-1)


def token_kl(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per position KL(ref || other) = sum_v p_ref (log p_ref - log p_other); [T, V] -> [T]."""
    return (ref.exp() * (ref - other)).sum(-1).clamp_min(0)


@torch.no_grad()
def measure(model, chat: list[dict], plain: torch.Tensor, src: dict, act) -> dict:
    with activation_quantization(model, act):
        kls = {"all": [], "answer_thinking": [], "answer_non_thinking": []}
        for conv, ref in zip(chat, src["chat"]):
            kl = token_kl(ref, logprobs(model, conv["ids"]))
            kls["all"].append(kl)
            key = "answer_thinking" if conv["thinking"] else "answer_non_thinking"
            kls[key].append(kl[conv["answer"]])
        plain_kl = torch.cat([token_kl(ref, logprobs(model, row)) for row, ref in zip(plain, src["plain"])])
    return {f"chat_kl_{k}": float(torch.cat(v).mean()) for k, v in kls.items()} | {"plain_kl": float(plain_kl.mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/qwen3-mini"))
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--name", default="chat_calibration")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    resolved = resolve_model(args.model)
    source, tok = load_model(resolved, "bfloat16")
    source.eval()
    chat = chat_eval_set(tok, args.shared)
    text, _ = load_eval_text("wikitext2")
    plain = eval_windows(tok, text, SEQ, None)[:8]
    src = {"chat": [logprobs(source, c["ids"]) for c in chat], "plain": [logprobs(source, r) for r in plain]}
    _log(f"held out: {len(chat)} conversations ({sum(c['ids'].numel() for c in chat)} tokens), "
         f"{plain.numel()} WikiText-2 tokens")
    rows = []
    for method in args.methods.split(","):
        for calib in CALIBS:
            for seed in seeds:
                ids = load_calibration(calib, tok, 128, 512, seed)
                model, state = copy.deepcopy(source), QuantState()
                t = time.perf_counter()
                run_sequential(model, resolved.adapter, ids, METHODS[method](), torch.device("cpu"), state)
                quant_s = time.perf_counter() - t
                row = {"method": method, "calib": calib, "seed": seed, "calib_sha256": samples_hash(ids),
                       "quant_s": round(quant_s, 1)} | measure(model, chat, plain, src, state.activations)
                _log(json.dumps(row))
                rows.append(row)
                del model
    write(rows, args, resolved)
    return 0


def _cell(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows]
    spread = max(vals) - min(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals) * 1e3:.3f} ± {spread / 2 * 1e3:.3f}"


def write(rows: list[dict], args, resolved) -> None:
    results = BENCH / "results"
    meta = {"model": str(resolved.path), "seeds": args.seeds, "calibration": "128 x 512 tokens",
            "held_out_chat": "calibration/build_chat.py --held-out: 96 conversations, each cut at 512 tokens",
            "plain": "WikiText-2 raw test, first 8 x 512-token windows", "torch_threads": 1,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (results / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    keys = ("chat_kl_all", "chat_kl_answer_thinking", "chat_kl_answer_non_thinking", "plain_kl")
    lines = ["| method | calibration | KL chat, all (1e-3) | KL thinking answers | KL non-thinking answers | "
             "KL WikiText-2 |", "|---|---|---:|---:|---:|---:|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        for calib in CALIBS:
            sel = [r for r in rows if r["method"] == method and r["calib"] == calib]
            if sel:
                lines.append(f"| {method} | {calib} | " + " | ".join(_cell(sel, k) for k in keys) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
