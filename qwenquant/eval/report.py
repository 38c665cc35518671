"""The eval report of `qwenquant eval`: perplexity and zero-shot multiple-choice accuracy of a checkpoint folder,
optionally against a baseline folder measured identically (deltas and recovery = acc / baseline acc).

`eval_report.json`, schema 1: the `qwenquant.reporting` header (schema_version, qwenquant_version, created,
command), model and baseline (`describe_checkpoint`), settings (dtype the weights load in, compute_dtype the forwards
run in: float32 on the CPU), perplexity {text, convention, window, windows, tokens, text_windows, whole_text (all of
the text's windows or a prefix), model, baseline, delta_ppl_pct, baseline_window (with a baseline)}, tasks {name:
{lm_eval_task, model, baseline, delta, recovery, recovery_norm}}, timings_s, environment. `EVAL.md` renders the same
for people.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from qwenquant.device import resolve_device
from qwenquant.errors import BadInputError
from qwenquant.eval.checkpoint import MeasureSettings, check_checkpoint_dir, describe_checkpoint, measure
from qwenquant.eval import passkey
from qwenquant.eval.long_context import DEFAULT_DOCS, LongContextSettings, check_lengths, default_lengths
from qwenquant.eval.long_context_report import long_context_lines, long_context_section, long_context_summary
from qwenquant.eval.perplexity import DEFAULT_WINDOWS, load_eval_text
from qwenquant.eval.precision import compute_dtype_name
from qwenquant.eval.tasks import DEFAULT_BATCH_SIZE, DEFAULT_TASKS, NUM_FEWSHOT, parse_task_list, resolve_tasks
from qwenquant.reporting import environment_versions, report_header, write_atomic, write_json
from qwenquant.validation import count_or_all

EVAL_SCHEMA_VERSION = 1
REPORT_JSON = "eval_report.json"
REPORT_MD = "EVAL.md"
PPL_CONVENTION = ("text tokenized once and split into non-overlapping windows (the short tail dropped), "
                  "perplexity = exp(mean next-token NLL over all windows): the GPTQ/AWQ papers' convention")
DEFAULT_TASK_LIST = ",".join(DEFAULT_TASKS)
METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class EvalRequest:
    """What `qwenquant eval` was asked to measure (its flags); bad numbers are one-line BadInputErrors."""

    model_dir: Path
    baseline: Path | None = None
    tasks: str = DEFAULT_TASK_LIST  # comma-separated names, or "none"
    limit: int | None = None
    eval_text: str = "wikitext2"
    window: int = 2048
    max_windows: int | str | None = DEFAULT_WINDOWS  # N, or "all" / None: the whole text
    ppl: bool = True
    include_path: Path | None = None
    tasks_dir: Path | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = "auto"
    out: Path | None = None
    long_context: bool = False
    context_lengths: str | None = None  # comma-separated; None: 512, 1024, ... up to the model's max positions
    passkey_depths: str = "10,50,90"  # percent
    passkey_trials: int = passkey.DEFAULT_TRIALS
    long_docs: int = DEFAULT_DOCS
    kv_cache: str = "bf16"  # bf16, fp8 or bf16,fp8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise BadInputError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise BadInputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.window < 2:
            raise BadInputError(f"--eval-window must be >= 2, got {self.window}")
        try:
            object.__setattr__(self, "max_windows", count_or_all("--eval-windows", self.max_windows))
        except ValueError as err:
            raise BadInputError(str(err)) from None


@dataclass(frozen=True)
class EvalJob:
    """A checked request: both folders described, tasks and text resolved, the device chosen."""

    model_dir: Path
    model_info: dict
    baseline: Path | None
    baseline_info: dict | None
    settings: MeasureSettings
    ppl_desc: str | None
    text_desc: str | None = None


def prepare_eval(request: EvalRequest) -> EvalJob:
    """Check everything the user typed before any weight is loaded (one-line BadInputErrors)."""
    model_dir = request.model_dir.expanduser()
    model_info = describe_checkpoint(model_dir, check_checkpoint_dir(model_dir, "MODEL_DIR"))
    baseline, baseline_info = request.baseline, None
    if baseline is not None:
        baseline = baseline.expanduser()
        baseline_info = describe_checkpoint(baseline, check_checkpoint_dir(baseline, "--baseline"))
    names = [] if request.tasks.strip().lower() == "none" else parse_task_list(request.tasks)
    if not names and not request.ppl and not request.long_context:
        raise BadInputError("nothing to measure: --tasks none with --no-ppl")
    long_settings = None
    if request.long_context:
        configs = [check_checkpoint_dir(model_dir, "MODEL_DIR")]
        if baseline is not None:
            configs.append(check_checkpoint_dir(baseline, "--baseline"))
        long_settings = long_context_settings(request, configs)
    plan = resolve_tasks(names, request.include_path, request.tasks_dir) if names else None
    text, text_desc = load_eval_text(request.eval_text) if request.ppl or request.long_context else (None, None)
    ppl_text, ppl_desc = (text, text_desc) if request.ppl else (None, None)
    device = resolve_device(request.device)
    out = request.out
    if out is not None and out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out}: exists and is not a directory")
    settings = MeasureSettings(device=device, plan=plan, limit=request.limit, batch_size=request.batch_size,
                               ppl_text=ppl_text, window=request.window, max_windows=request.max_windows,
                               long_context=long_settings, long_text=text if long_settings else None)
    return EvalJob(model_dir, model_info, baseline, baseline_info, settings, ppl_desc, text_desc)


def _int_list(flag: str, value: str) -> list[int]:
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise BadInputError(f"{flag} {value!r}: comma-separated whole numbers, e.g. 512,1024,2048,4096") from None
    if not values:
        raise BadInputError(f"{flag}: empty; pass comma-separated whole numbers")
    return values


def long_context_settings(request: EvalRequest, configs: list[dict]) -> LongContextSettings:
    """The checked long-context settings: lengths default to 512, 1024, ... up to the smallest max positions of the
    models measured; a length beyond a model's max_position_embeddings is a one-line error naming the fix."""
    if request.context_lengths:
        lengths = _int_list("--context-lengths", request.context_lengths)
    else:
        limits = [(c.get("text_config") or c).get("max_position_embeddings") for c in configs]
        limits = [n for n in limits if n]
        if not limits:
            raise BadInputError("config.json has no max_position_embeddings; pass --context-lengths")
        lengths = list(default_lengths(min(limits)))
    for c, flag in zip(configs, ("MODEL_DIR", "--baseline")):
        check_lengths(lengths, c, f"--context-lengths (for {flag})")
    depths = [d / 100.0 for d in _int_list("--passkey-depths", request.passkey_depths)]
    kv = tuple(k.strip() for k in request.kv_cache.split(",") if k.strip())
    return LongContextSettings(lengths=tuple(sorted(set(lengths))), docs=request.long_docs, depths=tuple(depths),
                               trials=request.passkey_trials, kv_caches=kv, seed=request.seed)


def evaluate(job: EvalJob, *, command: str, started: float, quiet: bool = False,
             log: Callable[[str], None] = lambda msg: None) -> dict:
    """Measure the model (then the baseline) and build the report dict."""
    measured = measure(job.model_dir, "MODEL_DIR", job.settings, quiet, log)
    base_measured = None
    if job.baseline is not None:
        base_measured = measure(job.baseline, "--baseline", job.settings, quiet, log)
    return build_report(job, command=command, measured=measured, base_measured=base_measured, started=started)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _diff(a, b):
    return None if a is None or b is None else a - b


def _perplexity_section(ppl_desc: str | None, measured: dict, base_measured: dict | None) -> dict | None:
    if measured["perplexity"] is None:
        return None
    ppl = {"text": ppl_desc, "convention": PPL_CONVENTION, "window": measured["window"],
           "windows": measured["perplexity"]["windows"], "tokens": measured["perplexity"]["tokens"],
           "text_windows": measured["setting"]["text_windows"], "whole_text": measured["setting"]["whole_text"],
           "model": measured["perplexity"], "baseline": None, "delta_ppl_pct": None}
    if base_measured is not None and base_measured["perplexity"] is not None:
        ppl["baseline"] = base_measured["perplexity"]
        ppl["baseline_window"] = base_measured["window"]
        r = _ratio(measured["perplexity"]["perplexity"], base_measured["perplexity"]["perplexity"])
        ppl["delta_ppl_pct"] = None if r is None else 100.0 * (r - 1.0)
    return ppl


def _task_entries(plan, measured: dict, base_measured: dict | None) -> dict:
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
    return tasks


def build_report(job: EvalJob, *, command: str, measured: dict, base_measured: dict | None, started: float) -> dict:
    """The eval_report.json dict (see the module docstring)."""
    import lm_eval  # heavy: imported once tasks have run (or the report is built) only

    s = job.settings
    plan = s.plan
    lm_eval_version = getattr(lm_eval, "__version__", None)
    return report_header(EVAL_SCHEMA_VERSION, command=command, started=started) | {
        "model": job.model_info,
        "baseline": job.baseline_info,
        "settings": {
            "tasks": list(plan.names) if plan else [],
            "lm_eval_tasks": dict(plan.lm_names) if plan else {},
            "limit": s.limit,
            "num_fewshot": NUM_FEWSHOT,
            "batch_size": s.batch_size,
            "device": str(s.device),
            "dtype": "bfloat16",
            "compute_dtype": compute_dtype_name(s.device, torch.bfloat16),
            "softmax_dtype": "float32",
            "tasks_dir": str(plan.tasks_dir) if plan and plan.tasks_dir else None,
            "include_path": [str(p) for p in plan.include_path] if plan else [],
            "lm_eval_version": lm_eval_version,
        },
        "perplexity": _perplexity_section(job.ppl_desc, measured, base_measured),
        "long_context": long_context_section(job.text_desc, measured, base_measured),
        "tasks": _task_entries(plan, measured, base_measured),
        "timings_s": {"model": measured["timings_s"],
                      "baseline": None if base_measured is None else base_measured["timings_s"],
                      "total": time.time() - started},
        "environment": environment_versions() | {"lm_eval": lm_eval_version},
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
        "long_context": long_context_summary(report.get("long_context")),
        "tasks": tasks,
        "out": None if out is None else str(out),
    }


def _pm(v, se) -> str:
    if v is None:
        return "-"
    return f"{v:.4f} ± {se:.4f}" if se is not None else f"{v:.4f}"


def _f(v, fmt="{:+.4f}") -> str:
    return "-" if v is None else fmt.format(v)


def _perplexity_lines(ppl: dict) -> list[str]:
    lines = ["", "## Perplexity", "",
             f"{ppl['text']}; {ppl['convention']}; window {ppl['window']} tokens, {ppl['windows']} windows, "
             f"{ppl['tokens']} predicted tokens: " + ("the whole text." if ppl["whole_text"] else
                                                       f"the first {ppl['windows']} of its {ppl['text_windows']} "
                                                       "windows, not the whole text (`--eval-windows all`)."), "",
             "| model | perplexity | mean NLL |", "|---|---|---|",
             f"| model | {ppl['model']['perplexity']:.4f} | {ppl['model']['mean_nll']:.5f} |"]
    if ppl["baseline"] is not None:
        lines += [f"| baseline | {ppl['baseline']['perplexity']:.4f} | {ppl['baseline']['mean_nll']:.5f} |", "",
                  f"Change vs baseline: **{_f(ppl['delta_ppl_pct'], '{:+.3f}')}%**."]
    return lines


def _task_lines(r: dict) -> list[str]:
    s = r["settings"]
    lim = s["limit"]
    lines = ["", "## Tasks", "",
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
    return lines


def render_markdown(r: dict) -> str:
    """EVAL.md."""
    s = r["settings"]
    lines = [f"# qwenquant eval: {r['model']['path']}", "",
             f"Created {r['created']} by qwenquant {r['qwenquant_version']} (lm-eval {s['lm_eval_version']}) "
             f"on `{s['device']}`, weights loaded in {s['dtype']}, computed in {s['compute_dtype']}.", ""]
    q = r["model"]["quantization"]
    lines.append(f"- model: `{r['model']['path']}` ({r['model']['architecture']}, "
                 + (f"quantized: {q['quant_method']}" + (f"/{q['format']}" if q.get("format") else "") if q else "not quantized")
                 + ")")
    if r["baseline"] is not None:
        bq = r["baseline"]["quantization"]
        lines.append(f"- baseline: `{r['baseline']['path']}` ({r['baseline']['architecture']}, "
                     + (f"quantized: {bq['quant_method']}" if bq else "not quantized") + ")")
    lines.append(f"- command: `{r['command']}`")
    if r["perplexity"] is not None:
        lines += _perplexity_lines(r["perplexity"])
    if r.get("long_context"):
        lines += long_context_lines(r["long_context"])
    if r["tasks"]:
        lines += _task_lines(r)
    lines.append("")
    return "\n".join(lines)


def write_eval_report(folder: Path, report: dict) -> list[Path]:
    """eval_report.json and EVAL.md in `folder` (created if missing), each written atomically."""
    paths = [folder / REPORT_JSON, folder / REPORT_MD]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(paths[0], report, ensure_ascii=False)
        write_atomic(paths[1], render_markdown(report))
    except OSError as err:
        raise BadInputError(f"--out {folder}: cannot write the report ({err.strerror or err})") from err
    return paths
