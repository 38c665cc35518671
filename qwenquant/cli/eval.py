"""`qwenquant eval MODEL_DIR`: perplexity and zero-shot multiple-choice accuracy of any checkpoint folder.

A bf16 source, our compressed-tensors FP8/INT output or another tool's folder is loaded with
`AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)` and measured with WikiText-2 perplexity
(qwenquant.eval.perplexity, GPTQ convention) and lm-eval tasks (qwenquant.eval.tasks, local data). With
`--baseline DIR` the baseline is measured identically and the report adds deltas and recovery (acc / baseline acc).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from qwenquant.cli import app
from qwenquant.errors import BadInputError

EVAL_SCHEMA_VERSION = 1
REPORT_JSON = "eval_report.json"
REPORT_MD = "EVAL.md"
PPL_CONVENTION = ("text tokenized once and split into non-overlapping windows (the short tail dropped), "
                  "perplexity = exp(mean next-token NLL over all windows): the GPTQ/AWQ papers' convention")
DEFAULT_TASKS = "hellaswag,piqa,arc_easy,winogrande,ceval"
METRICS = ("acc", "acc_norm")


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"qwenquant eval: {msg}", file=sys.stderr, flush=True)


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInputError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise BadInputError(f"--device {device}: not a device ({err})") from err
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    raise BadInputError(f"--device {device}: use auto, cpu, cuda or cuda:N")


def check_checkpoint_dir(path: Path, flag: str) -> dict:
    """config.json of a checkpoint folder, or a one-line BadInputError."""
    if not path.exists():
        raise BadInputError(f"{flag} {path}: no such directory")
    if not path.is_dir():
        raise BadInputError(f"{flag} {path}: not a directory; pass a model folder")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise BadInputError(f"{flag} {path}: no config.json; point it at a Hugging Face model folder "
                            "(config.json, *.safetensors, tokenizer files)")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(f"{flag} {path}: config.json is unreadable ({type(err).__name__})") from err
    if not isinstance(config, dict):
        raise BadInputError(f"{flag} {path}: config.json is not a JSON object")
    return config


def describe_checkpoint(path: Path, config: dict) -> dict:
    q = config.get("quantization_config")
    quant = None
    if isinstance(q, dict):
        quant = {"quant_method": q.get("quant_method"), "format": q.get("format")}
    return {"path": str(path), "architecture": (config.get("architectures") or [None])[0],
            "model_type": config.get("model_type"), "quantization": quant,
            "weight_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors"))}


def load_checkpoint(path: Path, flag: str, device):
    """(model, tokenizer) loaded in bf16 (compressed-tensors folders decompress) and moved to `device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise BadInputError(f"{flag} {path}: transformers could not load it ({type(err).__name__}: {first})") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise BadInputError(f"{flag} {path}: no usable tokenizer in the folder ({type(err).__name__}: {first})") from err
    model.to(device)
    model.eval()
    return model, tokenizer


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "max_position_embeddings", None)


def measure(path: Path, flag: str, device, plan, limit, batch_size, ppl_text, window, max_windows, quiet) -> dict:
    """Load one checkpoint and measure perplexity and tasks; the model is freed before returning."""
    with contextlib.ExitStack() as stack:
        if quiet:  # transformers / compressed-tensors / lm-eval progress bars go to stderr
            stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
        return _measure(path, flag, device, plan, limit, batch_size, ppl_text, window, max_windows, quiet)


def _measure(path: Path, flag: str, device, plan, limit, batch_size, ppl_text, window, max_windows, quiet) -> dict:
    import torch

    from qwenquant.eval.perplexity import eval_windows, perplexity
    from qwenquant.eval.tasks import run_tasks

    t0 = time.time()
    _say(quiet, f"loading {path}")
    model, tokenizer = load_checkpoint(path, flag, device)
    timings = {"load": time.time() - t0}
    out: dict = {"perplexity": None, "window": None, "tasks": {}}
    try:
        if ppl_text is not None:
            t = time.time()
            cap = _max_positions(model)
            w = min(window, cap) if cap else window
            windows = eval_windows(tokenizer, ppl_text, w, max_windows)
            _say(quiet, f"perplexity over {windows.shape[0]} windows of {w} tokens")
            out["perplexity"] = perplexity(model, windows, device).to_dict()
            out["window"] = w
            timings["perplexity"] = time.time() - t
        if plan is not None and plan.names:
            t = time.time()
            _say(quiet, f"tasks {', '.join(plan.names)}" + (f" (limit {limit})" if limit else ""))
            out["tasks"] = run_tasks(model, tokenizer, plan, limit, batch_size, quiet=quiet)
            timings["tasks"] = time.time() - t
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out["timings_s"] = timings
    return out


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _diff(a, b):
    return None if a is None or b is None else a - b


def build_report(*, command, model_info, baseline_info, plan, limit, batch_size, device, ppl_desc, measured,
                 base_measured, started) -> dict:
    import lm_eval

    from qwenquant import __version__
    from qwenquant.eval.tasks import NUM_FEWSHOT
    from qwenquant.report import _versions

    ppl = None
    if measured["perplexity"] is not None:
        ppl = {"text": ppl_desc, "convention": PPL_CONVENTION, "window": measured["window"],
               "windows": measured["perplexity"]["windows"], "tokens": measured["perplexity"]["tokens"],
               "model": measured["perplexity"], "baseline": None, "delta_ppl_pct": None}
        if base_measured is not None and base_measured["perplexity"] is not None:
            ppl["baseline"] = base_measured["perplexity"]
            ppl["baseline_window"] = base_measured["window"]
            r = _ratio(measured["perplexity"]["perplexity"], base_measured["perplexity"]["perplexity"])
            ppl["delta_ppl_pct"] = None if r is None else 100.0 * (r - 1.0)
    tasks = {}
    for name, m in measured["tasks"].items():
        entry = {"lm_eval_task": plan.lm_names.get(name, name), "model": m, "baseline": None, "delta": None,
                 "recovery": None, "recovery_norm": None}
        b = None if base_measured is None else base_measured["tasks"].get(name)
        if b is not None:
            entry["baseline"] = b
            entry["delta"] = {k: _diff(m.get(k), b.get(k)) for k in METRICS}
            entry["recovery"] = _ratio(m.get("acc"), b.get("acc"))
            entry["recovery_norm"] = _ratio(m.get("acc_norm"), b.get("acc_norm"))
        tasks[name] = entry
    return {
        "schema_version": EVAL_SCHEMA_VERSION,
        "qwenquant_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": command,
        "model": model_info,
        "baseline": baseline_info,
        "settings": {
            "tasks": list(plan.names) if plan else [],
            "lm_eval_tasks": dict(plan.lm_names) if plan else {},
            "limit": limit,
            "num_fewshot": NUM_FEWSHOT,
            "batch_size": batch_size,
            "device": str(device),
            "dtype": "bfloat16",
            "softmax_dtype": "float32",
            "tasks_dir": str(plan.tasks_dir) if plan and plan.tasks_dir else None,
            "include_path": [str(p) for p in plan.include_path] if plan else [],
            "lm_eval_version": getattr(lm_eval, "__version__", None),
        },
        "perplexity": ppl,
        "tasks": tasks,
        "timings_s": {"model": measured["timings_s"],
                      "baseline": None if base_measured is None else base_measured["timings_s"],
                      "total": time.time() - started},
        "environment": _versions() | {"lm_eval": getattr(lm_eval, "__version__", None)},
    }


def summary(report: dict, out: Path | None) -> dict:
    """The flat JSON printed on stdout with --json."""
    ppl = report["perplexity"]
    tasks = {}
    for name, t in report["tasks"].items():
        row = dict(t["model"])
        if t["baseline"] is not None:
            row |= {f"baseline_{k}": v for k, v in t["baseline"].items() if k != "n"}
            row |= {f"delta_{k}": v for k, v in t["delta"].items()}
            row |= {"recovery": t["recovery"], "recovery_norm": t["recovery_norm"]}
        tasks[name] = row
    return {
        "ok": True,
        "model": report["model"]["path"],
        "baseline": None if report["baseline"] is None else report["baseline"]["path"],
        "perplexity": None if ppl is None else ppl["model"]["perplexity"],
        "baseline_perplexity": None if ppl is None or ppl["baseline"] is None else ppl["baseline"]["perplexity"],
        "delta_ppl_pct": None if ppl is None else ppl["delta_ppl_pct"],
        "window": None if ppl is None else ppl["window"],
        "limit": report["settings"]["limit"],
        "tasks": tasks,
        "out": None if out is None else str(out),
    }


def _pm(v, se) -> str:
    if v is None:
        return "-"
    return f"{v:.4f} ± {se:.4f}" if se is not None else f"{v:.4f}"


def _f(v, fmt="{:+.4f}") -> str:
    return "-" if v is None else fmt.format(v)


def render_markdown(r: dict) -> str:
    s = r["settings"]
    lines = [f"# qwenquant eval: {r['model']['path']}", "",
             f"Created {r['created']} by qwenquant {r['qwenquant_version']} (lm-eval {s['lm_eval_version']}) "
             f"on `{s['device']}`, weights loaded in {s['dtype']}.", ""]
    q = r["model"]["quantization"]
    lines.append(f"- model: `{r['model']['path']}` ({r['model']['architecture']}, "
                 + (f"quantized: {q['quant_method']}" + (f"/{q['format']}" if q.get("format") else "") if q else "not quantized")
                 + ")")
    if r["baseline"] is not None:
        bq = r["baseline"]["quantization"]
        lines.append(f"- baseline: `{r['baseline']['path']}` ({r['baseline']['architecture']}, "
                     + (f"quantized: {bq['quant_method']}" if bq else "not quantized") + ")")
    lines.append(f"- command: `{r['command']}`")
    ppl = r["perplexity"]
    if ppl is not None:
        lines += ["", "## Perplexity", "",
                  f"{ppl['text']}; {ppl['convention']}; window {ppl['window']} tokens, {ppl['windows']} windows, "
                  f"{ppl['tokens']} predicted tokens.", "",
                  "| model | perplexity | mean NLL |", "|---|---|---|",
                  f"| model | {ppl['model']['perplexity']:.4f} | {ppl['model']['mean_nll']:.5f} |"]
        if ppl["baseline"] is not None:
            lines += [f"| baseline | {ppl['baseline']['perplexity']:.4f} | {ppl['baseline']['mean_nll']:.5f} |", "",
                      f"Change vs baseline: **{_f(ppl['delta_ppl_pct'], '{:+.3f}')}%**."]
    if r["tasks"]:
        lim = s["limit"]
        lines += ["", "## Tasks", "",
                  f"{s['num_fewshot']}-shot multiple choice through lm-eval (log-likelihood of each choice); "
                  + (f"first {lim} documents per task (C-Eval interleaved by subject). " if lim else "all documents. ")
                  + "± is the standard error of the mean over documents.", ""]
        with_base = r["baseline"] is not None
        if with_base:
            lines += ["| task | n | baseline acc | acc | Δ acc | recovery | baseline acc_norm | acc_norm | Δ acc_norm | recovery (norm) |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
        else:
            lines += ["| task | n | acc | acc_norm |", "|---|---|---|---|"]
        for name, t in r["tasks"].items():
            m = t["model"]
            if with_base and t["baseline"] is not None:
                b, d = t["baseline"], t["delta"]
                lines.append(
                    f"| {name} | {m['n']} | {_pm(b['acc'], b['acc_stderr'])} | {_pm(m['acc'], m['acc_stderr'])} | "
                    f"{_f(d['acc'])} | {_f(t['recovery'], '{:.4f}')} | {_pm(b['acc_norm'], b['acc_norm_stderr'])} | "
                    f"{_pm(m['acc_norm'], m['acc_norm_stderr'])} | {_f(d['acc_norm'])} | {_f(t['recovery_norm'], '{:.4f}')} |")
            else:
                lines.append(f"| {name} | {m['n']} | {_pm(m['acc'], m['acc_stderr'])} | "
                             f"{_pm(m['acc_norm'], m['acc_norm_stderr'])} |" + (" - | - | - | - | - | - |" if with_base else ""))
        lines += ["", "acc_norm scores each choice by its log-likelihood divided by its length in characters; `-` where "
                  "the task does not define it (WinoGrande). "
                  + ("Recovery = acc / baseline acc. " if with_base else "")
                  + "Differences within about two standard errors are not significant."]
    lines.append("")
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(folder: Path, report: dict) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / REPORT_JSON, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        _write_atomic(folder / REPORT_MD, render_markdown(report))
    except OSError as err:
        raise BadInputError(f"--out {folder}: cannot write the report ({err.strerror or err})") from err


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Argument(metavar="MODEL_DIR", help="Checkpoint folder: bf16 source, qwenquant output or another tool's.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated: hellaswag, piqa, arc_easy, winogrande, ceval (local data), "
                                            "other lm-eval task names (need the hub), or none.")] = DEFAULT_TASKS,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N documents of each task.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="Reference folder (e.g. the bf16 source) measured identically; adds deltas and recovery.")] = None,
    eval_text: Annotated[str, typer.Option(help="wikitext2 (WikiText-2 raw test) or a text file for perplexity.")] = "wikitext2",
    eval_window: Annotated[int, typer.Option(help="Tokens per perplexity window (capped at the model's max positions).")] = 2048,
    eval_windows: Annotated[Optional[int], typer.Option(help="Perplexity on only the first N windows.")] = None,
    no_ppl: Annotated[bool, typer.Option("--no-ppl", help="Skip perplexity.")] = False,
    include_path: Annotated[Optional[Path], typer.Option(help="Folder of extra lm-eval task YAMLs.")] = None,
    tasks_dir: Annotated[Optional[Path], typer.Option(help="Local task data [default: $QWENQUANT_TASKS_DIR or ../shared/data/tasks].")] = None,
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size.")] = 8,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=f"Write {REPORT_JSON} and {REPORT_MD} into this folder.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Measure perplexity and zero-shot task accuracy of a checkpoint folder (optionally against a baseline)."""
    from qwenquant.cli.common import silence_libraries
    from qwenquant.eval.perplexity import load_eval_text
    from qwenquant.eval.tasks import parse_task_list, resolve_tasks

    started = time.time()
    quiet = quiet or json_out
    silence_libraries()
    # everything the user typed is checked before any weight is loaded
    if limit is not None and limit < 1:
        raise BadInputError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1, got {batch_size}")
    if eval_window < 2:
        raise BadInputError(f"--eval-window must be >= 2, got {eval_window}")
    if eval_windows is not None and eval_windows < 1:
        raise BadInputError(f"--eval-windows must be >= 1, got {eval_windows}")
    model_dir = model_dir.expanduser()
    model_info = describe_checkpoint(model_dir, check_checkpoint_dir(model_dir, "MODEL_DIR"))
    baseline_info = None
    if baseline is not None:
        baseline = baseline.expanduser()
        baseline_info = describe_checkpoint(baseline, check_checkpoint_dir(baseline, "--baseline"))
    names = [] if tasks.strip().lower() == "none" else parse_task_list(tasks)
    if not names and no_ppl:
        raise BadInputError("nothing to measure: --tasks none with --no-ppl")
    plan = resolve_tasks(names, include_path, tasks_dir) if names else None
    ppl_text, ppl_desc = (None, None) if no_ppl else load_eval_text(eval_text)
    dev = resolve_device(device)
    if out is not None and out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out}: exists and is not a directory")

    args = dict(device=dev, plan=plan, limit=limit, batch_size=batch_size, ppl_text=ppl_text, window=eval_window,
                max_windows=eval_windows, quiet=quiet)
    measured = measure(model_dir, "MODEL_DIR", **args)
    base_measured = measure(baseline, "--baseline", **args) if baseline is not None else None

    argv = (ctx.obj or {}).get("argv", sys.argv[1:])
    command = "qwenquant " + " ".join(shlex.quote(a) for a in argv)
    report = build_report(command=command, model_info=model_info, baseline_info=baseline_info, plan=plan,
                          limit=limit, batch_size=batch_size, device=dev, ppl_desc=ppl_desc, measured=measured,
                          base_measured=base_measured, started=started)
    if out is not None:
        write_outputs(out, report)
    if json_out:
        print(json.dumps(summary(report, out)))
    else:
        md = render_markdown(report)
        body = md.split("\n", 2)[2] if md.startswith("# ") else md
        print(body.rstrip())
        if out is not None:
            _say(quiet, f"wrote {out / REPORT_JSON} and {out / REPORT_MD}")
