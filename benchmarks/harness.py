"""Side-by-side evaluation of quantization variants against one bf16 source, in one process.

Used by ``benchmarks/fp8_variants.py`` (and meant for the other benchmark scripts)::

    from harness import Harness, add_harness_args, harness_from_args, write_results  # benchmarks/ on sys.path
    h = harness_from_args(args)                   # loads the source once, evaluates it once
    rows = [h.source_row()]
    rows.append(h.evaluate_variant("fp8 channel/dynamic", [FP8Stage("channel", "dynamic")], seed=0))
    write_results("my_bench", rows, {"note": "..."})

What is measured (the same for every row, so rows are comparable):

* perplexity: GPTQ-paper convention, ``qwenquant.eval.perplexity``: WikiText-2 *raw test* rows joined with
  "\\n\\n", tokenized once, cut into non-overlapping windows of ``min(2048, max_position_embeddings)`` tokens (the
  tail shorter than a window is dropped), ppl = exp(mean next-token NLL over all windows). By default every window
  of the test split (201 windows x 2048 = 411,648 tokens for qwen3-mini's 8192-token vocabulary).
* KL: mean / max per-token KL(source || variant) in nats and top-1 agreement of the next-token distributions, over
  the first ``kl_windows`` windows of the same text (default 8 x 2048 = 16,384 positions), with
  ``qwenquant.eval.perplexity.kl_stats``. The source log-probs are computed once and kept on CPU in float32
  (8 x 2048 x 8192 x 4 B = 512 MiB); a variant's KL is computed window by window during its pass. ``mean_kl`` is
  on float32 log-probs; ``mean_kl_fp16`` rounds both sides to fp16 first, as ``qwenquant.runner.run`` does (its
  ``next_token_logprobs`` stores fp16), which adds a small positive bias (the per-token clamp at 0 keeps the
  positive half of the rounding noise): +9e-5 nats on FP8 weight-only, +4e-5 on FP8 dynamic, on qwen3-mini.
* A variant is the source deep-copied, quantized with ``qwenquant.pipeline.run_sequential`` and
  the recipe's stage configs exactly as ``qwenquant.runner.run.run_recipe`` does it (same calibration builder, same
  sequential propagation), then evaluated with ``activation_quantization(model, state.activations)`` active, i.e.
  with FP8 input quantization simulated as the engine does it (dynamic per token / per group, or static per tensor).
  Nothing is written to disk; the weights the model computes with are the dequantized stored weights.

Wall times are per row: ``quant_wall_s`` = the sequential pipeline (calibration capture + stages + propagation),
``eval_wall_s`` = perplexity + KL forwards. ``peak_rss_bytes`` is the peak resident set size of the *whole process*
sampled every 20 ms while the row ran (it includes the source model and the stored source log-probs, ~0.3 GB);
``process_peak_rss_bytes`` is ``ru_maxrss`` so far (monotone over the run).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # allow `python benchmarks/xyz.py` from the repo root
    sys.path.insert(0, str(REPO))

from qwenquant import __version__ as QWENQUANT_VERSION  # noqa: E402
from qwenquant.calibration import load_calibration, samples_hash  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qwenquant.eval.perplexity import (  # noqa: E402
    PerplexityResult,
    eval_windows,
    kl_stats,
    load_eval_text,
    next_token_logprobs,
    perplexity,
)
from qwenquant.model.loader import load_model, resolve_model  # noqa: E402
from qwenquant.state import QuantState  # noqa: E402
from qwenquant.activations import activation_quantization  # noqa: E402
from qwenquant.pipeline import peak_host_bytes, run_sequential  # noqa: E402
from qwenquant.recipe import CalibrationConfig, ExportConfig, ModelConfig, Recipe  # noqa: E402
from qwenquant.stages.fp8 import FP8Stage  # noqa: E402
from qwenquant.stages.registry import stage_name  # noqa: E402
from qwenquant.stages.rtn import RTNStage  # noqa: E402


DEFAULT_MODEL = "/work/shared/models/qwen3-mini"
RESULTS_DIR = REPO / "benchmarks" / "results"
QUICK = {"ppl_windows": 8, "kl_windows": 2, "num_samples": 32}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _ppl_str(row: dict) -> str:
    full = f"ppl {row['ppl']:.4f} ({row['delta_ppl_pct']:+.3f}%), " if row.get("ppl") is not None else ""
    return full + f"ppl@KL-tokens {row['ppl_kl']:.4f} ({row['delta_ppl_kl_pct']:+.3f}%)"


class RSSSampler:
    """Peak RSS of this process (bytes) while the block runs, sampled from /proc every `interval` seconds."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: fall back to the monotone peak
            return peak_host_bytes()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def calibration_dependent(stages) -> bool:
    """True when the quantized weights/scales depend on the calibration samples (and so on the seed).

    FP8 with dynamic or no activation quantization and RTN are functions of the weights alone; smoothing, static
    activation scales, GPTQ and AWQ are not.
    """
    for s in stages:
        if isinstance(s, FP8Stage):
            if s.activations == "static":
                return True
        elif isinstance(s, RTNStage):
            continue
        else:
            return True
    return False


def describe_stages(stages) -> str:
    """`smooth(alpha=0.5) -> fp8(weights=channel, activations=dynamic, block_size=128)`."""
    import dataclasses

    parts = []
    for s in stages:
        fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(s).items())
        parts.append(f"{stage_name(s)}({fields})")
    return " -> ".join(parts)


def _export_format_for(stages) -> str:
    """A format the Recipe accepts for these stages (only used to validate the recipe, nothing is exported)."""
    names = [stage_name(s) for s in stages]
    if "fp8" in names:
        return "compressed-tensors"
    q = next(s for s in stages if stage_name(s) in ("rtn", "gptq", "awq"))
    return "gptq" if getattr(q, "actorder", "none") == "group" else "compressed-tensors"


def layer_weight_errors(state: QuantState) -> list[float]:
    """Mean relative Frobenius weight error ||W - W_hat|| / ||W|| per decoder layer, over the layer's Linears.

    W is the weight the quantizer saw, i.e. after smoothing when a smooth stage ran first.
    """
    out = []
    for rep in state.layer_reports:
        errs = []
        for stage_report in rep.values():
            if not isinstance(stage_report, dict):
                continue
            for v in stage_report.values():
                if isinstance(v, dict) and "weight_rel_error" in v:
                    errs.append(float(v["weight_rel_error"]))
        out.append(sum(errs) / len(errs) if errs else float("nan"))
    return out


def _combine_kl(per: list[dict]) -> dict:
    """Combine per-window `kl_stats` dicts (windows have equal length: the mean of means is the mean)."""
    n = len(per)
    return {
        "mean_kl": sum(p["mean_kl"] for p in per) / n,
        "max_kl": max(p["max_kl"] for p in per),
        "top1_agreement": sum(p["top1_agreement"] for p in per) / n,
        "tokens": sum(p["tokens"] for p in per),
    }


@torch.no_grad()
def forward_metrics(model, ppl_windows: torch.Tensor, n_ppl: int, kl_windows: torch.Tensor, device: torch.device,
                    src_logp: torch.Tensor | None = None):
    """One pass of forwards for everything a row needs.

    Returns (perplexity over the first `n_ppl` of `ppl_windows` or None, perplexity over `kl_windows`, X) where X is
    the float32 log-probs [kl_windows, window, vocab] when `src_logp` is None (the source pass), else a dict with
    the KL of this model from `src_logp`, computed window by window as it goes (nothing [T, vocab] is kept):
    `exact` = `kl_stats` on float32 log-probs, `fp16` = `kl_stats` on fp16-rounded log-probs, which is what
    `qwenquant.runner.run` reports (`next_token_logprobs` stores fp16; the per-token clamp at 0 then turns rounding noise
    into a small positive bias, ~1e-4 nats on this model).

    The perplexities are those of `qwenquant.eval.perplexity.perplexity()` (same slicing, float32 cross-entropy
    summed per window) and the fp16-rounded log-probs those of `next_token_logprobs()`, bit for bit (--self-check).
    The KL windows must be the first windows of `ppl_windows` (a full-test pass computes them on the way).
    """
    n_kl = int(kl_windows.shape[0])
    k = min(n_ppl, n_kl)
    if k and not torch.equal(ppl_windows[:k], kl_windows[:k]):
        raise ValueError("KL windows must be the first perplexity windows")
    windows = ppl_windows if n_ppl >= n_kl else kl_windows
    nll = {"ppl": 0.0, "kl": 0.0}
    tokens = {"ppl": 0, "kl": 0}
    logps, exact, fp16 = [], [], []
    for i in range(max(n_ppl, n_kl)):
        row = windows[i]
        logits = model(input_ids=row.unsqueeze(0).to(device), use_cache=False).logits[0].float()
        window_nll = float(F.cross_entropy(logits[:-1], row[1:].to(device), reduction="sum"))
        for key, limit in (("ppl", n_ppl), ("kl", n_kl)):
            if i < limit:
                nll[key] += window_nll
                tokens[key] += row.numel() - 1
        if i < n_kl:
            lp = F.log_softmax(logits, dim=-1).to("cpu")
            if src_logp is None:
                logps.append(lp)
            else:
                ref = src_logp[i : i + 1]
                exact.append(kl_stats(ref, lp.unsqueeze(0)))
                fp16.append(kl_stats(ref.half(), lp.half().unsqueeze(0)))

    def result(key: str, count: int) -> PerplexityResult | None:
        if not count:
            return None
        mean = nll[key] / tokens[key]
        return PerplexityResult(float(torch.exp(torch.tensor(mean))), mean, tokens[key], count, windows.shape[1])

    third = torch.stack(logps) if src_logp is None else {"exact": _combine_kl(exact), "fp16": _combine_kl(fp16)}
    return result("ppl", n_ppl), result("kl", n_kl), third


class Harness:
    """Loads the source once and evaluates it once; evaluates any number of variants identically."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        dtype: str = "bfloat16",
        eval_text: str = "wikitext2",
        window: int = 2048,
        ppl_windows: int | None = None,
        kl_windows: int = 8,
        calib_dataset: str = "builtin",
        num_samples: int = 128,
        seq_len: int = 512,
        device: str = "cpu",
        threads: int | None = 1,
        quick: bool = False,
        source_cache: str | Path | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.started = time.time()
        self.device = torch.device(device)
        self.dtype = dtype
        self.calib_dataset, self.num_samples, self.seq_len = calib_dataset, num_samples, seq_len
        self.quick = quick
        self._calib: dict[int, torch.Tensor] = {}
        self.code = code_state()  # at start: others may commit while a long run goes on

        t = time.perf_counter()
        self.resolved = resolve_model(model)
        self.source, self.tokenizer = load_model(self.resolved, dtype)
        self.source.to("cpu")
        self.load_s = time.perf_counter() - t
        _log(f"source {self.resolved.path} loaded in {self.load_s:.1f}s")

        max_pos = int(self.resolved.config.get("max_position_embeddings", window))
        self.window = min(window, max_pos)
        text, self.text_desc = load_eval_text(eval_text)
        all_windows = eval_windows(self.tokenizer, text, self.window, None)
        self.total_windows = int(all_windows.shape[0])
        self.ppl_windows = all_windows[:ppl_windows] if ppl_windows else all_windows
        self.kl_windows = all_windows[: max(1, kl_windows)]

        t = time.perf_counter()
        cache = self._source_cache_file(source_cache)
        if cache is not None and cache.is_file():
            saved = torch.load(cache)
            self.src_ppl, self.src_ppl_kl = PerplexityResult(**saved["ppl"]), PerplexityResult(**saved["ppl_kl"])
            self.src_logp, self.source_eval_s = saved["logp"], saved["eval_s"]
            _log(f"source evaluation read from {cache}")
        else:
            self.src_ppl, self.src_ppl_kl, self.src_logp = self._evaluate(self.source, None, reference=True)
            self.source_eval_s = time.perf_counter() - t
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"ppl": self.src_ppl.to_dict(), "ppl_kl": self.src_ppl_kl.to_dict(), "logp": self.src_logp,
                            "eval_s": self.source_eval_s}, cache)
        _log(
            f"source ppl {self.src_ppl.perplexity:.4f} on {self.ppl_windows.shape[0]}x{self.window} tokens, "
            f"{self.src_ppl_kl.perplexity:.4f} on the {self.kl_windows.numel()} KL tokens ({self.source_eval_s:.1f}s)"
        )

    def _source_cache_file(self, folder) -> Path | None:
        """Where the source's evaluation is cached: keyed by the weights (size, mtime), dtype, windows, threads."""
        if folder is None:
            return None
        import hashlib

        key = json.dumps([str(self.resolved.path), [(f.name, f.stat().st_size, f.stat().st_mtime) for f in
                          self.resolved.weight_files], self.dtype, self.text_desc, self.window,
                          int(self.ppl_windows.shape[0]), int(self.kl_windows.shape[0]), str(self.device),
                          torch.__version__])
        return Path(folder) / f"source-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    # -- evaluation ----------------------------------------------------------------------------------------------

    def _evaluate(self, model, act_specs, full_ppl: bool = True, reference: bool = False):
        """`forward_metrics` with activation hooks if given; the source pass (`reference`) keeps its log-probs."""
        ctx = activation_quantization(model, act_specs) if act_specs else nullcontext()
        n_ppl = int(self.ppl_windows.shape[0]) if full_ppl else 0
        model.to(self.device)
        try:
            with ctx:
                return forward_metrics(model, self.ppl_windows, n_ppl, self.kl_windows, self.device,
                                       None if reference else self.src_logp)
        finally:
            model.to("cpu")

    def _metrics(self, ppl, ppl_kl, kl: dict) -> dict:
        src, src_kl = self.src_ppl.perplexity, self.src_ppl_kl.perplexity
        exact, fp16 = kl["exact"], kl["fp16"]
        return {
            "ppl": ppl.perplexity if ppl else None,
            "delta_ppl_pct": 100.0 * (ppl.perplexity - src) / src if ppl else None,
            "ppl_tokens": ppl.tokens if ppl else 0,
            "ppl_kl": ppl_kl.perplexity,
            "delta_ppl_kl_pct": 100.0 * (ppl_kl.perplexity - src_kl) / src_kl,
            "mean_kl": exact["mean_kl"],
            "max_kl": exact["max_kl"],
            "top1": exact["top1_agreement"],
            "kl_tokens": exact["tokens"],
            "mean_kl_fp16": fp16["mean_kl"],
            "max_kl_fp16": fp16["max_kl"],
        }

    def calibration(self, seed: int) -> torch.Tensor:
        if seed not in self._calib:
            self._calib[seed] = load_calibration(self.calib_dataset, self.tokenizer, self.num_samples, self.seq_len, seed)
        return self._calib[seed]

    def source_row(self) -> dict:
        return {
            "variant": f"{self.dtype} source",
            "stages": "",
            "seed": None,
            "calib_dependent": False,
            "ppl": self.src_ppl.perplexity,
            "delta_ppl_pct": 0.0,
            "ppl_tokens": self.src_ppl.tokens,
            "ppl_kl": self.src_ppl_kl.perplexity,
            "delta_ppl_kl_pct": 0.0,
            "mean_kl": 0.0,
            "max_kl": 0.0,
            "top1": 1.0,
            "mean_kl_fp16": 0.0,
            "kl_tokens": int(self.kl_windows.numel()),
            "quant_wall_s": 0.0,
            "eval_wall_s": self.source_eval_s,
            "peak_rss_bytes": peak_host_bytes(),
            "process_peak_rss_bytes": peak_host_bytes(),
        }

    def recipe_for(self, stages, seed: int) -> Recipe:
        return Recipe(
            model=ModelConfig(id=str(self.resolved.path), dtype=self.dtype),
            calibration=CalibrationConfig(self.calib_dataset, self.num_samples, self.seq_len, seed),
            stages=list(stages),
            export=ExportConfig(format=_export_format_for(stages)),
            device=str(self.device),
        )

    def evaluate_variant(self, name: str, stages, seed: int = 0, tags: dict | None = None, full_ppl: bool = True) -> dict:
        """Quantize a deep copy of the source with `stages` (recipe stage configs, in order) calibrated with `seed`,
        evaluate it, and return one result row (see the module docstring).

        `full_ppl=False` skips the perplexity pass over all ppl windows (`ppl` is None): only the KL windows run,
        and `ppl_kl` (perplexity on the KL tokens, vs the source's on the same tokens) is the perplexity reported.
        """
        recipe = self.recipe_for(stages, seed)  # validates the stage combination
        calib = self.calibration(seed)
        model = copy.deepcopy(self.source)
        state = QuantState()
        with RSSSampler() as rss:
            t = time.perf_counter()
            run_sequential(model, self.resolved.adapter, calib, recipe.stages, self.device, state)
            quant_s = time.perf_counter() - t
            t = time.perf_counter()
            metrics = self._metrics(*self._evaluate(model, state.activations, full_ppl))
            eval_s = time.perf_counter() - t
        errs = layer_weight_errors(state)
        row = {
            "variant": name,
            "stages": describe_stages(stages),
            "seed": seed,
            "calib_dependent": calibration_dependent(stages),
            **(tags or {}),
            **metrics,
            "quant_wall_s": quant_s,
            "eval_wall_s": eval_s,
            "stage_s": {k: round(v, 3) for k, v in state.stage_seconds.items()},
            "peak_rss_bytes": rss.peak,
            "process_peak_rss_bytes": peak_host_bytes(),
            "weight_rel_error_mean": sum(errs) / len(errs) if errs else None,
            "weight_rel_error_per_layer": errs,
            "activation_modes": sorted({s.mode for s in state.activations.values()}),
            "calib_sha256": samples_hash(calib),
        }
        del model, state
        gc.collect()
        _log(
            f"{name} seed={seed}: {_ppl_str(row)}, KL {row['mean_kl']:.6f}, "
            f"top1 {row['top1']:.4f}, quant {quant_s:.1f}s, eval {eval_s:.1f}s"
        )
        return row

    def evaluate_external(self, name: str, model_dir: str | Path, act_specs: dict | None = None,
                          tags: dict | None = None, full_ppl: bool = True) -> dict:
        """Load a checkpoint folder with transformers (any format it can read, e.g. another tool's
        compressed-tensors output) and evaluate it exactly like a variant.

        Activation quantization is whatever the loader applies (compressed-tensors wraps the forward of quantized
        Linears and fake-quantizes their inputs when the scheme has input activations); `act_specs`
        ({linear name: qwenquant ActivationSpec}) adds qwenquant's simulation on top, for checkpoints whose loader
        does not. The row records what the loader attached (`loader_input_activations`).
        """
        from transformers import AutoModelForCausalLM

        model_dir = Path(model_dir)
        with RSSSampler() as rss:
            t = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, self.dtype))
            model.eval()
            load_s = time.perf_counter() - t
            t = time.perf_counter()
            metrics = self._metrics(*self._evaluate(model, act_specs, full_ppl))
            eval_s = time.perf_counter() - t
        loader_acts = set()
        for m in model.modules():
            scheme = getattr(m, "quantization_scheme", None)
            ia = getattr(scheme, "input_activations", None) if scheme is not None else None
            if ia is not None:
                loader_acts.add(f"{ia.type}{ia.num_bits} {ia.strategy} {'dynamic' if ia.dynamic else 'static'}")
        qcfg = json.loads((model_dir / "config.json").read_text()).get("quantization_config", {})
        row = {
            "variant": name,
            "stages": f"external: {model_dir}",
            "seed": None,
            "calib_dependent": None,
            **(tags or {}),
            **metrics,
            "quant_wall_s": None,
            "load_s": load_s,
            "eval_wall_s": eval_s,
            "peak_rss_bytes": rss.peak,
            "process_peak_rss_bytes": peak_host_bytes(),
            "quant_method": qcfg.get("quant_method"),
            "loader_input_activations": sorted(loader_acts),
            "qwenquant_act_specs": bool(act_specs),
        }
        del model
        gc.collect()
        _log(f"{name} (external): {_ppl_str(row)}, KL {row['mean_kl']:.6f}")
        return row

    # -- metadata ------------------------------------------------------------------------------------------------

    def meta(self) -> dict:
        n_ppl = int(self.ppl_windows.shape[0])
        return {
            "model": str(self.resolved.path),
            "model_dtype": self.dtype,
            "eval_text": self.text_desc,
            "eval_convention": (
                f"GPTQ convention: {self.text_desc}; tokenized once (no special tokens); non-overlapping windows of "
                f"{self.window} tokens (2048 capped at max_position_embeddings); tail shorter than a window dropped; "
                f"ppl = exp(mean next-token NLL). {n_ppl} of {self.total_windows} windows"
                + (" (FULL test split)" if n_ppl == self.total_windows else " (SUBSET: not the full test split)")
            ),
            "window": self.window,
            "ppl_windows": n_ppl,
            "ppl_windows_total": self.total_windows,
            "ppl_tokens": int(self.src_ppl.tokens),
            "kl_convention": "mean/max per-token KL(source || variant) in nats and top-1 agreement, first "
                             f"{self.kl_windows.shape[0]} windows, float32 log-probs (column 'KL fp16': both "
                             "rounded to fp16 first, as qwenquant's own reports do)",
            "kl_tokens": int(self.kl_windows.numel()),
            "calibration": {"dataset": self.calib_dataset, "num_samples": self.num_samples, "seq_len": self.seq_len,
                            "seeds_sha256": {str(k): samples_hash(v) for k, v in self._calib.items()}},
            "source": {"ppl": self.src_ppl.perplexity, "mean_nll": self.src_ppl.mean_nll, "load_s": self.load_s,
                       "eval_s": self.source_eval_s},
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "quick": self.quick,
            **self.code,
        }


# -- results -------------------------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def code_state() -> dict:
    """The qwenquant code a run uses: git commit, whether qwenquant/ differs from it, and a sha256 over the
    qwenquant/**/*.py sources as they are on disk now (identifies the code even with uncommitted changes)."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted((REPO / "qwenquant").rglob("*.py")):
        digest.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    dirty = _git("status", "--porcelain", "--", "qwenquant")
    return {
        "qwenquant_git_commit": _git("rev-parse", "HEAD"),
        "qwenquant_tree_dirty": bool(dirty) if dirty is not None else None,
        "qwenquant_sources_sha256": digest.hexdigest(),
    }


def environment_meta() -> dict:
    import transformers

    try:
        import compressed_tensors

        ct = compressed_tensors.__version__
    except Exception:
        ct = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": affinity,
            "load_avg_at_write": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed_tensors": ct,
        "qwenquant_version": QWENQUANT_VERSION,
        **code_state(),  # at write time; Harness.meta() overrides it with the state at the start of the run
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if spec == "bytes":
        return f"{v / 2**20:.0f}"
    return format(v, spec)


DEFAULT_COLUMNS = (
    ("variant", "variant", "s"),
    ("seed", "seed", "s"),
    ("ppl", "ppl", ".4f"),
    ("delta_ppl_pct", "Δppl %", "+.3f"),
    ("delta_ppl_kl_pct", "Δppl@KL %", "+.3f"),
    ("mean_kl", "mean KL", ".3e"),
    ("mean_kl_fp16", "KL fp16", ".3e"),
    ("max_kl", "max KL", ".3f"),
    ("top1", "top-1", ".4f"),
    ("weight_rel_error_mean", "W err", ".4f"),
    ("quant_wall_s", "quant s", ".1f"),
    ("eval_wall_s", "eval s", ".1f"),
    ("peak_rss_bytes", "RSS MiB", "bytes"),
)


def markdown_table(rows: list[dict], columns=DEFAULT_COLUMNS) -> str:
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "|" + "|".join("---" if c[2] == "s" else "---:" for c in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, spec in columns:
            v = r.get(key)
            cells.append("-" if v is None else (str(v) if spec == "s" else _fmt(v, spec)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: list[dict], columns=DEFAULT_COLUMNS, title: str | None = None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown_table(rows, columns))
        return
    table = Table(title=title)
    for _, label, spec in columns:
        table.add_column(label, justify="left" if spec == "s" else "right")
    for r in rows:
        table.add_row(*("-" if r.get(k) is None else (str(r[k]) if s == "s" else _fmt(r[k], s)) for k, _, s in columns))
    Console(width=200).print(table)


def aggregate_seeds(rows: list[dict], key: str = "variant") -> list[dict]:
    """One row per `key`: mean over seeds of ppl / delta / KL / top-1, with the seed spread (max - min).

    Rows whose variant does not depend on calibration have one seed; their spread is None.
    """
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    out = []
    for name, rs in groups.items():
        agg = {k: v for k, v in rs[0].items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
        agg[key] = name
        agg["seeds"] = ",".join(str(r["seed"]) for r in rs) if rs[0].get("seed") is not None else "-"
        agg["n_seeds"] = len(rs)
        for m in ("ppl", "delta_ppl_pct", "ppl_kl", "delta_ppl_kl_pct", "mean_kl", "mean_kl_fp16", "max_kl", "top1",
                  "weight_rel_error_mean", "quant_wall_s", "eval_wall_s", "peak_rss_bytes"):
            vals = [r[m] for r in rs if r.get(m) is not None]
            if not vals:
                agg[m] = None
                continue
            agg[m] = sum(vals) / len(vals)
            agg[f"{m}_spread"] = (max(vals) - min(vals)) if len(vals) > 1 else None
        out.append(agg)
    return out


AGG_COLUMNS = (
    ("variant", "variant", "s"),
    ("seeds", "seeds", "s"),
    ("ppl", "ppl", ".4f"),
    ("delta_ppl_pct", "Δppl %", "+.3f"),
    ("delta_ppl_pct_spread", "± seeds", ".3f"),
    ("delta_ppl_kl_pct", "Δppl@KL %", "+.3f"),
    ("delta_ppl_kl_pct_spread", "± seeds", ".3f"),
    ("mean_kl", "mean KL", ".3e"),
    ("mean_kl_spread", "± seeds", ".1e"),
    ("mean_kl_fp16", "KL fp16", ".3e"),
    ("max_kl", "max KL", ".3f"),
    ("top1", "top-1", ".4f"),
    ("weight_rel_error_mean", "W err", ".4f"),
    ("quant_wall_s", "quant s", ".1f"),
    ("eval_wall_s", "eval s", ".1f"),
    ("peak_rss_bytes", "RSS MiB", "bytes"),
)


def write_results(name: str, rows: list[dict], meta: dict, out_dir: Path = RESULTS_DIR,
                  summary_md: str = "", print_rows: bool = True) -> tuple[Path, Path]:
    """Print the table and write `<out_dir>/<name>.json` (rows + meta) and `<name>.md`.

    The markdown has the per-variant table (mean over seeds, with the seed spread) and every raw row.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full_meta = environment_meta() | meta
    agg = aggregate_seeds(rows)
    if print_rows:
        print_table(agg, AGG_COLUMNS, title=f"{name} (mean over seeds; ± = max - min over seeds)")
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps({"meta": full_meta, "rows": rows}, indent=1, default=str) + "\n")
    m = full_meta
    lines = [
        f"# {name}",
        "",
        f"- date (UTC): {m['date_utc']}; machine: {m['machine']['platform']}, {m['machine']['cpu_count']} CPUs"
        f" ({m['machine']['cpus_usable']} usable), torch threads {m.get('torch_threads')}, gpu {m['machine']['gpu']}",
        f"- torch {m['torch']}, transformers {m['transformers']}, compressed-tensors {m['compressed_tensors']}, "
        f"qwenquant {m['qwenquant_version']} @ {m['qwenquant_git_commit']}"
        + (" (qwenquant/ had uncommitted changes)" if m.get("qwenquant_tree_dirty") else ""),
        f"- model: {m.get('model')} ({m.get('model_dtype')})",
        f"- perplexity: {m.get('eval_convention')}",
        f"- KL: {m.get('kl_convention')} = {m.get('kl_tokens')} tokens",
        f"- calibration: {m.get('calibration')}",
        f"- command: `{m['command']}`",
    ]
    for h in m.get("run_history") or []:
        lines.append("- run history: " + "; ".join(f"{k}: {v}" for k, v in h.items()))
    if m.get("total_wall_min_all_processes"):
        lines.append(f"- total wall (all processes): {m['total_wall_min_all_processes']} min")
    lines.append("")
    if summary_md:
        lines += [summary_md.rstrip(), ""]
    lines += [
        "## Per variant (mean over calibration seeds; `±` = max - min over the seeds)",
        "",
        markdown_table(agg, AGG_COLUMNS),
        "",
        "## Every row",
        "",
        markdown_table(rows),
        "",
    ]
    md_path = out_dir / f"{name}.md"
    md_path.write_text("\n".join(lines))
    _log(f"wrote {json_path} and {md_path}")
    return json_path, md_path


# -- command line ----------------------------------------------------------------------------------------------------


def add_harness_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("harness")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--eval-text", default="wikitext2")
    g.add_argument("--window", type=int, default=2048, help="window length (capped at max_position_embeddings)")
    g.add_argument("--ppl-windows", type=int, default=None, help="perplexity windows (default: all = full test)")
    g.add_argument("--kl-windows", type=int, default=8, help="windows for KL (default 8 = 16k tokens)")
    g.add_argument("--calib", default="builtin")
    g.add_argument("--num-samples", type=int, default=128)
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core box 2 threads ran ~4x slower)")
    g.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['ppl_windows']} ppl windows, {QUICK['kl_windows']} KL windows, "
                        f"{QUICK['num_samples']} calibration samples")
    g.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    g.add_argument("--source-cache", default=None,
                   help="folder to cache the source evaluation in (e.g. /tmp/qq-harness): a resumed run reuses it")


def harness_from_args(args: argparse.Namespace) -> Harness:
    ppl_w, kl_w, ns = args.ppl_windows, args.kl_windows, args.num_samples
    if args.quick:
        ppl_w, kl_w, ns = QUICK["ppl_windows"], QUICK["kl_windows"], QUICK["num_samples"]
    return Harness(args.model, eval_text=args.eval_text, window=args.window, ppl_windows=ppl_w, kl_windows=kl_w,
                   calib_dataset=args.calib, num_samples=ns, seq_len=args.seq_len, device=args.device,
                   threads=args.threads, quick=args.quick, source_cache=args.source_cache)


def save_partial(path: Path, rows: Iterable[dict]) -> None:
    """Rewrite a partial-results file after each row, so a long run can be resumed (`load_partial`)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(list(rows), indent=1, default=str))
    tmp.replace(path)


def load_partial(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


# -- self-check ------------------------------------------------------------------------------------------------------


def self_check(model: str = DEFAULT_MODEL) -> int:
    """Checks the harness against the library on a few windows (a couple of minutes on CPU):
    1. `forward_metrics` == `perplexity()` + `next_token_logprobs()` bit for bit;
    2. `evaluate_variant` (in memory) == `evaluate_external` of the same recipe written by `qwenquant.runner.run.run_recipe`
       and reloaded with transformers (compressed-tensors), within bf16 tolerance.
    """
    import tempfile

    from qwenquant.recipe import EvalConfig

    torch.set_num_threads(1)
    h = Harness(model, ppl_windows=3, kl_windows=2, num_samples=16, seq_len=256)
    ok = True
    m = h.source
    ref_ppl = perplexity(m, h.ppl_windows, h.device)
    ref_logp = next_token_logprobs(m, h.kl_windows, h.device)
    same = ref_ppl.perplexity == h.src_ppl.perplexity and torch.equal(ref_logp, h.src_logp.half())
    print(f"forward_metrics == perplexity() + next_token_logprobs(): {same} "
          f"({ref_ppl.perplexity!r} vs {h.src_ppl.perplexity!r})")
    ok &= same
    for acts in ("dynamic", "static"):
        stages = [FP8Stage("channel", acts)]
        mem = h.evaluate_variant(f"in-memory channel/{acts}", stages, seed=0)
        # the fp16 KL column is what qwenquant.runner.run reports: recompute it with the library functions
        q, st = copy.deepcopy(h.source), QuantState()
        run_sequential(q, h.resolved.adapter, h.calibration(0), h.recipe_for(stages, 0).stages, h.device, st)
        with activation_quantization(q, st.activations):
            lib = kl_stats(ref_logp, next_token_logprobs(q, h.kl_windows, h.device))
        same = math.isclose(lib["mean_kl"], mem["mean_kl_fp16"], rel_tol=1e-6)
        print(f"channel/{acts}: fp16 KL column {mem['mean_kl_fp16']!r} vs library {lib['mean_kl']!r} -> {same}; "
              f"float32 KL {mem['mean_kl']:.6f}")
        ok &= same
        recipe = h.recipe_for(stages, 0)
        recipe.eval = EvalConfig(max_windows=1, kl_tokens=2048, verify=False)
        from qwenquant.runner.options import RunOptions
        from qwenquant.runner.run import run_recipe

        with tempfile.TemporaryDirectory() as tmp:
            run_recipe(recipe, RunOptions(Path(tmp) / "ckpt"))
            ext = h.evaluate_external(f"reloaded channel/{acts}", Path(tmp) / "ckpt")
        close = abs(mem["mean_kl"] - ext["mean_kl"]) <= 0.05 * mem["mean_kl"] + 1e-5
        print(f"channel/{acts}: in-memory KL {mem['mean_kl']:.6f} ppl {mem['ppl']:.4f} | reloaded KL "
              f"{ext['mean_kl']:.6f} ppl {ext['ppl']:.4f} loader acts {ext['loader_input_activations']} -> "
              f"{'OK' if close else 'MISMATCH'}")
        ok &= close
    print("self-check", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="benchmark harness; run with --self-check to test it")
    ap.add_argument("--self-check", action="store_true")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    a = ap.parse_args()
    sys.exit(self_check(a.model) if a.self_check else ap.print_help() or 0)
