"""`qwenquant eval MODEL_DIR`: perplexity and zero-shot multiple-choice accuracy of any checkpoint folder
(`qwenquant.eval.report`), optionally against a `--baseline` folder measured identically."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from qwenquant.cli import app
from qwenquant.cli.common import silence_libraries
from qwenquant.eval.report import (DEFAULT_TASK_LIST, REPORT_JSON, REPORT_MD, EvalRequest, evaluate, prepare_eval,
                                   render_markdown, summary, write_eval_report)
from qwenquant.eval.long_context import DEFAULT_DOCS
from qwenquant.eval.passkey import DEFAULT_TRIALS
from qwenquant.eval.perplexity import DEFAULT_WINDOWS
from qwenquant.eval.tasks import DEFAULT_BATCH_SIZE, MAX_BATCH_TOKENS
from qwenquant.reporting import command_line
from qwenquant.validation import count_text


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"qwenquant eval: {msg}", file=sys.stderr, flush=True)


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Argument(metavar="MODEL_DIR", help="Checkpoint folder: bf16 source, qwenquant output or another tool's.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated: hellaswag, piqa, arc_easy, winogrande, ceval (local data), "
                                            "other lm-eval task names (need the hub), or none.")] = DEFAULT_TASK_LIST,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N documents of each task.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="Reference folder (e.g. the bf16 source) measured identically; adds deltas and recovery.")] = None,
    eval_text: Annotated[str, typer.Option(help="wikitext2 (WikiText-2 raw test) or a text file for perplexity.")] = "wikitext2",
    eval_window: Annotated[int, typer.Option(help="Tokens per perplexity window (capped at the model's max positions).")] = 2048,
    eval_windows: Annotated[str, typer.Option(metavar="N|all", help="Perplexity on the first N windows of the text, "
                                              "or all of them (all).")] = count_text(DEFAULT_WINDOWS),
    no_ppl: Annotated[bool, typer.Option("--no-ppl", help="Skip perplexity.")] = False,
    include_path: Annotated[Optional[Path], typer.Option(help="Folder of extra lm-eval task YAMLs.")] = None,
    tasks_dir: Annotated[Optional[Path], typer.Option(help="Local task data [default: $QWENQUANT_TASKS_DIR or ../shared/data/tasks].")] = None,
    batch_size: Annotated[int, typer.Option(help="Log-likelihood requests per forward (at most "
                                          f"{MAX_BATCH_TOKENS} padded tokens).")] = DEFAULT_BATCH_SIZE,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=f"Write {REPORT_JSON} and {REPORT_MD} into this folder.")] = None,
    long_context: Annotated[bool, typer.Option("--long-context", help="Also measure at length: perplexity on long "
                                               "documents per window length, and passkey retrieval.")] = False,
    context_lengths: Annotated[Optional[str], typer.Option(help="Window lengths for --long-context, e.g. "
                                                           "512,1024,2048,4096 [default: 512 doubling up to the "
                                                           "model's max positions].")] = None,
    passkey_depths: Annotated[str, typer.Option(help="Needle depths in percent of the context.")] = "10,50,90",
    passkey_trials: Annotated[int, typer.Option(help="Passkey keys per length (0: no passkey test).")] = DEFAULT_TRIALS,
    long_docs: Annotated[int, typer.Option(help="Long documents for the window sweep.")] = DEFAULT_DOCS,
    kv_cache: Annotated[str, typer.Option("--kv-cache", help="KV cache for --long-context: bf16, fp8 or bf16,fp8 "
                                          "(K/V stored as float8_e4m3, one scale per layer).")] = "bf16",
    seed: Annotated[int, typer.Option(help="Seed of the passkey keys and haystacks.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Measure perplexity and zero-shot task accuracy of a checkpoint folder (optionally against a baseline)."""
    started = time.time()
    quiet = quiet or json_out
    silence_libraries()
    request = EvalRequest(model_dir=model_dir, baseline=baseline, tasks=tasks, limit=limit, eval_text=eval_text,
                          window=eval_window, max_windows=eval_windows, ppl=not no_ppl, include_path=include_path,
                          tasks_dir=tasks_dir, batch_size=batch_size, device=device, out=out,
                          long_context=long_context, context_lengths=context_lengths, passkey_depths=passkey_depths,
                          passkey_trials=passkey_trials, long_docs=long_docs, kv_cache=kv_cache, seed=seed)
    job = prepare_eval(request)  # everything the user typed is checked before any weight is loaded
    command = command_line((ctx.obj or {}).get("argv", sys.argv[1:]))
    report = evaluate(job, command=command, started=started, quiet=quiet, log=lambda msg: _say(quiet, msg))
    if out is not None:
        write_eval_report(out, report)
    if json_out:
        print(json.dumps(summary(report, out)))
    else:
        md = render_markdown(report)
        body = md.split("\n", 2)[2] if md.startswith("# ") else md
        print(body.rstrip())
        if out is not None:
            _say(quiet, f"wrote {out / REPORT_JSON} and {out / REPORT_MD}")
