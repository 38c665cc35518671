"""A checkpoint folder as `qwenquant eval` and `qwenquant bench` take it: checked and described before any weight
loads, then loaded in bf16 and measured (WikiText-2 perplexity, lm-eval tasks), computing in float32 on the CPU
(`qwenquant.eval.precision`).

A bf16 source, our compressed-tensors FP8/INT output or another tool's folder is loaded with
`AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)` (compressed-tensors folders decompress).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from qwenquant.errors import BadInputError
from qwenquant.eval.long_context import LongContextSettings, checkpoint_kv_scales, measure_long_context
from qwenquant.eval.perplexity import eval_windows, perplexity, windows_setting
from qwenquant.eval.precision import evaluation_precision
from qwenquant.eval.tasks import TaskPlan, run_tasks


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
    """{path, architecture, model_type, quantization {quant_method, format} | None, weight_bytes}."""
    q = config.get("quantization_config")
    quant = None
    if isinstance(q, dict):
        quant = {"quant_method": q.get("quant_method"), "format": q.get("format")}
    return {"path": str(path), "architecture": (config.get("architectures") or [None])[0],
            "model_type": config.get("model_type"), "quantization": quant,
            "weight_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors"))}


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def load_checkpoint(path: Path, flag: str, device: torch.device):
    """(model, tokenizer) loaded in bf16 (compressed-tensors folders decompress) and moved to `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only once a model is really loaded

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    except Exception as err:
        raise BadInputError(f"{flag} {path}: transformers could not load it "
                            f"({type(err).__name__}: {_first_line(err)})") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise BadInputError(f"{flag} {path}: no usable tokenizer in the folder "
                            f"({type(err).__name__}: {_first_line(err)})") from err
    model.to(device)
    model.eval()
    return model, tokenizer


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "max_position_embeddings", None)


@dataclass(frozen=True)
class MeasureSettings:
    """What `measure` runs on each checkpoint: perplexity over `ppl_text` (None: skipped) in windows of `window`
    tokens (capped at the model's max positions), and the tasks of `plan` (None: none)."""

    device: torch.device
    plan: TaskPlan | None
    limit: int | None
    batch_size: int
    ppl_text: str | None
    window: int
    max_windows: int | None  # None: every window of the text
    long_context: LongContextSettings | None = None  # None: no long-context evaluation
    long_text: str | None = None  # the text its documents and haystacks come from


def measure(path: Path, flag: str, settings: MeasureSettings, quiet: bool = False,
            log: Callable[[str], None] = lambda msg: None) -> dict:
    """Load one checkpoint and measure perplexity and tasks; the model is freed before returning.
    {perplexity: PerplexityResult dict | None, window, setting (`windows_setting`), tasks {name: metrics},
    timings_s}."""
    with contextlib.ExitStack() as stack:
        if quiet:  # transformers / compressed-tensors / lm-eval progress bars go to stderr
            stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
        return _measure(path, flag, settings, quiet, log)


def _measure(path: Path, flag: str, s: MeasureSettings, quiet: bool, log: Callable[[str], None]) -> dict:
    t0 = time.time()
    log(f"loading {path}")
    model, tokenizer = load_checkpoint(path, flag, s.device)
    timings = {"load": time.time() - t0}
    out: dict = {"perplexity": None, "window": None, "tasks": {}}
    try:
        if s.ppl_text is not None:
            t = time.time()
            cap = _max_positions(model)
            w = min(s.window, cap) if cap else s.window
            text_windows = eval_windows(tokenizer, s.ppl_text, w, None)
            windows = text_windows[: s.max_windows] if s.max_windows else text_windows
            log(f"perplexity over {windows.shape[0]} of {text_windows.shape[0]} windows of {w} tokens")
            with evaluation_precision(model, s.device):
                out["perplexity"] = perplexity(model, windows, s.device).to_dict()
            out["window"] = w
            out["setting"] = windows_setting(w, windows.shape[0], text_windows.shape[0])
            timings["perplexity"] = time.time() - t
        if s.long_context is not None:
            t = time.time()
            lc = s.long_context
            if "fp8" in lc.kv_caches:  # a checkpoint made with --kv-cache fp8 brings its calibrated scales
                lc = dataclasses.replace(lc, kv_scales=checkpoint_kv_scales(path))
            with evaluation_precision(model, s.device):
                out["long_context"] = measure_long_context(model, tokenizer, s.long_text, lc, s.device, log)
            timings["long_context"] = time.time() - t
        if s.plan is not None and s.plan.names:
            t = time.time()
            log(f"tasks {', '.join(s.plan.names)}" + (f" (limit {s.limit})" if s.limit else ""))
            out["tasks"] = run_tasks(model, tokenizer, s.plan, s.limit, s.batch_size, quiet=quiet)
            timings["tasks"] = time.time() - t
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out["timings_s"] = timings
    return out
