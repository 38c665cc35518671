"""One quantization run, start to finish: recipe in, checkpoint folder + report out."""

from __future__ import annotations

import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from qwenquant import __version__
from qwenquant.calibration import load_calibration, samples_hash
from qwenquant.errors import BadInputError, QualityGateError, VerificationError
from qwenquant.eval.verify import reader_for, verify_checkpoint
from qwenquant.eval.perplexity import eval_windows, kl_stats, load_eval_text, next_token_logprobs, perplexity
from qwenquant.export.checkpoint import write_checkpoint
from qwenquant.export.writer import atomic_output_dir, check_output_dir, partial_dir
from qwenquant.journal import JOURNAL_DIR, Journal, layers_done_in, read_journal, run_fingerprint
from qwenquant.export.model_card import render_model_card, source_license
from qwenquant.model.loader import file_sha256, load_model, resolve_model
from qwenquant.mixed_precision import check_mixed_precision, run_mixed_precision
from qwenquant.pipeline import QuantState, activation_quantization, peak_host_bytes, run_sequential
from qwenquant.progress import Reporter
from qwenquant.recipe import Recipe
from qwenquant.report import build_report, write_report
from qwenquant.search import resolve_searched
from qwenquant.stages import build_stages


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {spec}: no CUDA GPU is visible; use --device cpu")
    return torch.device(spec)


def needs_calibration(recipe: Recipe) -> bool:
    """Round-to-nearest alone uses no data; every other stage does."""
    from qwenquant.recipe import stage_name

    return any((stage_name(s) != "rtn" or s.clip_search) and not (stage_name(s) == "mixed_precision" and s.keep is not None)
               for s in recipe.stages)  # a resolved keep list needs no data; ranking groups does


def check_layout(recipe: Recipe, config: dict) -> None:
    """Refuse, before any work, shapes the chosen scheme or format cannot handle."""
    from qwenquant.model.qwen3 import linear_shapes

    stage = recipe.stage(recipe.quantizer)
    for name, (n, k) in linear_shapes(config).items():
        if recipe.quantizer == "fp8" and stage.weights == "block" and k % stage.block_size:
            raise BadInputError(f"{name} has {k} input features, not a multiple of --block-size {stage.block_size} "
                                "(block activations are grouped by it); use a divisor of it or --weights channel")
        if recipe.quantizer != "fp8":
            if stage.group_size != -1 and k % stage.group_size:
                raise BadInputError(f"{name} has {k} input features, not divisible by --group-size {stage.group_size}; "
                                    "use a divisor of it or -1 (per channel)")
            per_word = 32 // stage.bits if 32 % stage.bits == 0 else None
            if recipe.export.format in ("gptq", "awq") and n % 8:
                raise BadInputError(f"{name} has {n} output features; {recipe.export.format} packs 8 per int32, "
                                    "use --format compressed-tensors")
            if recipe.export.format == "gptq" and per_word and k % per_word:
                raise BadInputError(f"{name} has {k} input features; gptq packs {per_word} per int32 along them, "
                                    "use --format compressed-tensors")
            if recipe.export.format == "compressed-tensors":
                if (k * stage.bits) % 32:
                    raise BadInputError(f"{name}: {k} input features x {stage.bits} bits do not fill whole int32 words; "
                                        "use another --bits or --group-size")
                if not stage.symmetric and (n * stage.bits) % 32:
                    raise BadInputError(f"{name}: {n} output features x {stage.bits} bits cannot pack asymmetric zero "
                                        "points into int32 words; use --sym")


def check_not_source(out: Path, model_path: Path) -> None:
    """Never let --out (with --overwrite) replace or nest inside the source checkpoint."""
    o, m = out.resolve(), model_path.resolve()
    if o == m or m in o.parents or o in m.parents:
        raise BadInputError(f"--out {out} overlaps the source model folder {model_path}; choose another --out")


def _dir_bytes(files) -> int:
    return sum(Path(f).stat().st_size for f in files)


class _Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t

        return _Ctx()


@torch.no_grad()
def _evaluate(model, windows, kl_windows, device, reporter: Reporter, label: str, act_specs=None, store=None):
    """Perplexity over `windows` and log-probs over `kl_windows` (with activation quantization if given); with a
    `store` (--offload-dir) one decoder layer at a time over all windows, with the same results."""
    ctx = activation_quantization(model, act_specs) if act_specs else nullcontext()
    with ctx:
        if store is not None:
            from qwenquant.eval.layerwise import evaluate_layerwise

            with reporter.step(f"layer-streamed forward ({label})", len(store.layers)) as advance:
                return evaluate_layerwise(model, store, windows, kl_windows, device, on_layer=advance)
        ppl = None
        if windows is not None:
            with reporter.step(f"perplexity ({label})", windows.shape[0]) as advance:
                ppl = perplexity(model, windows, device, on_step=advance)
        logp = next_token_logprobs(model, kl_windows, device)
    return ppl, logp


def check_offload(recipe: Recipe) -> None:
    """Refuse, before any work, what --offload-dir cannot do: anything that needs the whole model in memory."""
    if recipe.eval.tasks:
        raise BadInputError("--tasks needs the whole model in memory (lm-eval); with --offload-dir drop --tasks "
                            "(and --min-task-recovery), or run without --offload-dir")
    if recipe.stage("mixed_precision") is not None:
        raise BadInputError("mixed precision (--keep-sensitive) ranks and re-quantizes the whole model in memory; "
                            "with --offload-dir drop it, or run without --offload-dir")


def _place(model, device, store) -> None:
    """model.to(device); with --offload-dir (a `store`) the decoder layers are on disk and move one at a time."""
    if store is None:
        model.to(device)


def run_recipe(recipe: Recipe, out: Path, overwrite: bool = False, reporter: Reporter | None = None, command: str = "",
               resume: bool = False, offload_dir: Path | None = None) -> dict:
    """Quantize per the recipe, write `out` atomically, verify it, and return the report dict.

    Raises VerificationError (after writing the folder and its report) when the reloaded checkpoint disagrees
    with the source beyond the stated threshold. `offload_dir` (--offload-dir): decoder layers not in use stay on
    disk in a work folder under it (qwenquant/model/offload.py), removed at the end; a resource setting like the
    device, not part of the recipe.
    """
    if offload_dir is None:
        return _run_recipe(recipe, out, overwrite, reporter, command, resume)
    from qwenquant.model.offload import check_offload_dir, offload_session

    check_output_dir(Path(out), overwrite)
    check_offload(recipe)
    local = Path(recipe.model.id).expanduser()
    check_offload_dir(Path(offload_dir), Path(out), local if local.is_dir() else None)
    with offload_session(Path(offload_dir), Path(out)) as folder:
        return _run_recipe(recipe, out, overwrite, reporter, command, resume, offload_folder=folder)


def _run_recipe(recipe: Recipe, out: Path, overwrite: bool = False, reporter: Reporter | None = None, command: str = "",
                resume: bool = False, offload_folder: Path | None = None) -> dict:
    """`run_recipe`; with `offload_folder` the model is loaded with its decoder layers on disk there."""
    reporter = reporter or Reporter(quiet=True)
    timer = _Timer()
    started = time.time()
    out = Path(out)
    check_output_dir(out, overwrite)  # fail fast, before any heavy work
    device = resolve_device(recipe.device)

    with timer("load"):
        resolved = resolve_model(recipe.model.id, recipe.model.revision)
        check_not_source(out, resolved.path)
        check_layout(recipe, resolved.config)
        check_mixed_precision(recipe, resolved.adapter, resolved.config)
        reporter.log(f"model {recipe.model.id} -> {resolved.path} ({resolved.config['architectures'][0]})")
        store = None  # with --offload-dir: the LayerStore that materializes one decoder layer at a time
        if offload_folder is None:
            model, tokenizer = load_model(resolved, recipe.model.dtype)
        else:
            from qwenquant.model.offload import load_offloaded

            model, tokenizer, store = load_offloaded(resolved, recipe.model.dtype, offload_folder)
    calib = None
    if needs_calibration(recipe):
        with timer("calibration_data"):
            calib = load_calibration(recipe.calibration.dataset, tokenizer, recipe.calibration.num_samples,
                                     recipe.calibration.seq_len, recipe.calibration.seed)

    # Source evaluation happens before the pipeline changes the model in place.
    ev = recipe.eval
    max_pos = int(resolved.config.get("max_position_embeddings", ev.window))
    window = min(ev.window, max_pos)
    text, text_desc = load_eval_text(ev.eval_text)
    all_windows = eval_windows(tokenizer, text, window, None)
    ppl_windows = all_windows[: ev.max_windows] if ev.max_windows else all_windows
    kl_windows = all_windows[: max(1, math.ceil(ev.kl_tokens / window))]
    mixed = recipe.stage("mixed_precision") is not None
    if resume and mixed:
        raise BadInputError("--resume is not supported for mixed-precision (--keep-sensitive) runs; run without --resume")

    fingerprint = run_fingerprint(recipe.to_yaml(), resolved.weight_files)
    if resume and not mixed:  # refuse a mismatched resume before the output folder code could touch its progress
        layers_done_in(partial_dir(out), fingerprint)

    with atomic_output_dir(out, overwrite, resume=resume, keep_on_interrupt=_has_progress) as tmp:
        # the journal keeps finished layers on disk (bounded memory, --resume); mixed precision may quantize the
        # model several times, so it keeps its records in memory
        journal = None if mixed else Journal(tmp, fingerprint)
        done = journal.layers_done() if journal is not None else 0
        if resume:
            reporter.log(f"resuming after {done} finished decoder layers" if done else "nothing to resume; starting")
        saved = journal.load_source_eval() if journal is not None else None
        if saved is not None:
            src_ppl, src_logp, src_tasks = saved["ppl"], saved["logp"], saved["tasks"]
        else:
            _place(model, device, store)
            with timer("eval_source"):
                src_ppl, src_logp = _evaluate(model, ppl_windows if ev.perplexity else None, kl_windows, device,
                                              reporter, "source", store=store)
                src_tasks = _evaluate_tasks(model, tokenizer, ev, device, reporter, "source")
            _place(model, "cpu", store)
            if journal is not None:
                journal.save_source_eval({"ppl": src_ppl, "logp": src_logp, "tasks": src_tasks})

        def quantize_and_evaluate(recipe: Recipe, model) -> tuple:
            state = QuantState()
            if journal is not None:
                state.records = journal.records
            stages = build_stages(recipe)
            n_layers = len(model.get_submodule(resolved.adapter.layers_path))
            with timer("quantize"):
                with reporter.step(f"quantize ({' -> '.join(n for n, _ in stages)})", n_layers) as advance:
                    run_sequential(model, resolved.adapter, calib, stages, device, state,
                                   on_layer_done=lambda i, n: advance(), journal=journal, layer_store=store)

            _place(model, device, store)
            with timer("eval_quantized"):
                q_ppl, q_logp = _evaluate(
                    model, ppl_windows if ev.perplexity else None, kl_windows, device, reporter, "quantized", state.activations,
                    store=store,
                )
            _place(model, "cpu", store)
            return state, q_ppl, q_logp

        mixed_report = None
        if not mixed:
            state, q_ppl, q_logp = quantize_and_evaluate(recipe, model)
        else:  # resolves the keep list (measuring sensitivity if asked; auto tries candidates) -> resolved recipe
            outcome = run_mixed_precision(recipe, model, resolved.adapter, calib, device, reporter, src_ppl,
                                          quantize_and_evaluate, lambda: load_model(resolved, recipe.model.dtype)[0])
            recipe, model, (state, q_ppl, q_logp), mixed_report = outcome.recipe, outcome.model, outcome.result, outcome.report
        recipe = resolve_searched(recipe, state)  # scale search choices go into recipe.yaml and the report
        with timer("eval_tasks_quantized"), activation_quantization(model, state.activations):
            q_tasks = _evaluate_tasks(model, tokenizer, ev, device, reporter, "quantized")
        _place(model, "cpu", store)

        verification = None
        with timer("export"):
            try:
                written = write_checkpoint(tmp, model, tokenizer, recipe, state, resolved.adapter.always_ignore,
                                           layer_store=store)
            except ValueError as err:  # a layout the format cannot store, found per tensor (e.g. GPTQ v1 zero point 0)
                raise BadInputError(f"export to {recipe.export.format} failed: {err}") from err
            (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        if ev.verify and store is not None:  # no full-model reload: every stored tensor vs the live layers
            with timer("verify"):
                from qwenquant.eval.verify import verify_offloaded

                verification = verify_offloaded(tmp, store, list(state.records), recipe.export.format, src_logp,
                                                q_logp, ev.verify_max_kl)
        elif ev.verify:
            with timer("verify"):
                q = recipe.stage(recipe.quantizer)
                reader = reader_for(recipe.export.format, recipe.quantizer, getattr(q, "symmetric", True),
                                    resolved.adapter.moe is not None and getattr(q, "weights", None) == "block")
                verification = verify_checkpoint(tmp, model, list(state.records), reader, recipe.export.format,
                                                 kl_windows, src_logp, q_logp, device, ev.verify_max_kl)
        report = build_report(
            recipe=recipe,
            resolved=resolved,
            command=command,
            version=__version__,
            calib_hash=samples_hash(calib) if calib is not None else None,
            calib_tokens=int(calib.numel()) if calib is not None else 0,
            eval_desc={"text": text_desc, "window": window, "windows": int(ppl_windows.shape[0]),
                       "kl_tokens": int(kl_windows.numel())},
            src_ppl=src_ppl,
            q_ppl=q_ppl,
            kl=kl_stats(src_logp, q_logp),
            state=state,
            timings=dict(timer.seconds) | {"stages": state.stage_seconds},
            source_bytes=_dir_bytes(resolved.weight_files),
            output_bytes=_dir_bytes(tmp / f for f in written["files"]),
            peak_host=peak_host_bytes(),
            device=device,
            verification=verification,
            started=started,
        )
        if src_tasks is not None:
            report["evaluation"]["tasks"] = merge_task_results(src_tasks, q_tasks, ev.task_limit)
        report["gates"] = check_gates(report, ev)
        if mixed_report is not None:
            report["mixed_precision"] = mixed_report
        report["model"]["files_sha256"] = {f.name: file_sha256(f) for f in resolved.weight_files}
        if store is not None:  # decoder layers were kept on disk (a resource setting, not part of the recipe)
            report["memory"]["offload_dir"] = str(offload_folder.parent)
        if done:
            report["resumed_after_layers"] = done
        shutil.rmtree(tmp / JOURNAL_DIR, ignore_errors=True)  # scratch of this run, not part of the checkpoint
        write_report(tmp, report)
        (tmp / "README.md").write_text(render_model_card(report, source_license(resolved.path)))
    if verification is not None and not verification["passed"]:
        raise VerificationError(
            f"verification failed: {verification['reason']}; the folder {out} was written with its report for inspection"
        )
    failed = [g for g in report["gates"] if not g["passed"]]
    if failed:
        raise QualityGateError(f"quality gate failed: {failed[0]['description']}; the folder {out} and its report were written")
    return report


def _has_progress(tmp: Path) -> bool:
    """Whether an interrupted run's temporary folder holds finished layers worth resuming."""
    meta = read_journal(tmp)
    return meta is not None and meta.get("layers_done", 0) > 0


def _evaluate_tasks(model, tokenizer, ev, device, reporter: Reporter, label: str) -> dict | None:
    """Zero-shot task accuracy through lm-eval (None when the recipe names no tasks)."""
    if not ev.tasks:
        return None
    from qwenquant.eval.tasks import evaluate_tasks

    reporter.log(f"tasks ({label}): {', '.join(ev.tasks)}")
    return evaluate_tasks(model, tokenizer, list(ev.tasks), ev.task_limit, 8, device)


def merge_task_results(source: dict, quantized: dict, limit: int | None) -> dict:
    """Per task: source and quantized accuracy with standard errors, and recovery = quantized / source."""
    out = {}
    for task, src in source.items():
        q = quantized[task]
        recovery = 100.0 * q["acc"] / src["acc"] if src.get("acc") else None
        out[task] = {"source": src, "quantized": q, "recovery_pct": recovery, "limit": limit}
    return out


def check_gates(report: dict, ev) -> list[dict]:
    """Quality gates from the recipe, evaluated on the measured report."""
    gates = []
    tasks = report["evaluation"].get("tasks")
    if ev.min_task_recovery_pct is not None and tasks:
        worst_task, worst = min(((t, r["recovery_pct"]) for t, r in tasks.items()), key=lambda x: x[1])
        gates.append({"gate": "min_task_recovery_pct", "limit": ev.min_task_recovery_pct, "measured": worst,
                      "passed": worst >= ev.min_task_recovery_pct,
                      "description": f"{worst_task} recovers {worst:.2f}% of the source accuracy vs limit "
                                     f"{ev.min_task_recovery_pct}%"})
    if ev.max_ppl_increase_pct is not None:
        delta = report["evaluation"]["delta_ppl_pct"]
        gates.append({"gate": "max_ppl_increase_pct", "limit": ev.max_ppl_increase_pct, "measured": delta,
                      "passed": delta <= ev.max_ppl_increase_pct,
                      "description": f"perplexity increase {delta:+.3f}% vs limit {ev.max_ppl_increase_pct}%"})
    return gates
