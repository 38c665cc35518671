"""One quantization run, start to finish: recipe in, checkpoint folder + report out.

`run_recipe` reads top to bottom as the run's phases: resolve (checks before any weight is loaded), load, calibrate,
evaluate the source, quantize + evaluate (through the mixed-precision driver when the recipe has that stage),
export, verify, report. Where the model lives (memory or --offload-dir) is a `placement`
(qwenquant/runner/placement.py); finished layers go to the run journal (qwenquant/journal.py).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenquant import __version__
from qwenquant.activations import activation_quantization
from qwenquant.calibration import load_calibration, samples_hash
from qwenquant.device import resolve_device
from qwenquant.distributed import World, join_world, local_device
from qwenquant.errors import BadInputError, QualityGateError, VerificationError
from qwenquant.eval.gguf_verify import transformers_greedy, verify_gguf
from qwenquant.eval.perplexity import eval_windows, kl_stats, load_eval_text, windows_setting
from qwenquant.eval.precision import compute_dtype_name
from qwenquant.export.checkpoint import write_checkpoint
from qwenquant.export.format_spec import UnstorableRecord
from qwenquant.export.model_card import render_model_card, source_license
from qwenquant.export.registry import FORMATS
from qwenquant.export.writer import atomic_output_dir, check_output_dir, partial_dir
from qwenquant.gates import check_gates, merge_task_results
from qwenquant.journal import JOURNAL_DIR, Journal, read_journal, run_fingerprint
from qwenquant.model.loader import file_sha256, resolve_model
from qwenquant.model.offload import check_offload_dir, offload_session
from qwenquant.kv_simulation import kv_cache_quantization
from qwenquant.pipeline import peak_host_bytes, run_sequential
from qwenquant.preflight import check_layout, check_mixed_precision, check_not_source, check_offload, needs_calibration
from qwenquant.progress import Reporter
from qwenquant.recipe import Recipe
from qwenquant.report import build_report, evaluation_section, write_report
from qwenquant.runner.mixed import run_mixed_precision
from qwenquant.runner.options import RunOptions
from qwenquant.runner.outcome import Quantized
from qwenquant.runner.placement import OffloadedModel, ResidentModel
from qwenquant.runner.ranks import check_ranks, check_resume, check_shardable, ranks_section, share_journal
from qwenquant.runner.stream import run_streamed
from qwenquant.runner.tasks import evaluate_recipe_tasks
from qwenquant.stages.registry import spec_of
from qwenquant.stream.eligibility import streaming_blockers, streams
from qwenquant.state import QuantState


@dataclass
class EvalWindows:
    ppl: torch.Tensor | None  # perplexity windows (None with --no-ppl)
    kl: torch.Tensor | None  # windows on which KL vs the source and verification are measured (None: --kl-tokens 0)
    desc: dict  # text, window, windows, kl_tokens (for the report)


@dataclass
class Run:
    """The state of one run between its phases (see the module docstring)."""

    recipe: Recipe
    options: RunOptions
    reporter: Reporter
    device: torch.device
    resolved: object = None
    placement: ResidentModel | OffloadedModel | None = None
    calib: torch.Tensor | None = None
    windows: EvalWindows | None = None
    journal: Journal | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    world: World = field(default_factory=World)  # the ranks of a distributed run (qwenquant/distributed.py)
    rank_peaks: list[int] = field(default_factory=list)  # each rank's peak host bytes after quantizing

    streamed_tokenizer: object = None  # the data-free streaming path loads no model, only its tokenizer

    @property
    def tokenizer(self):
        return self.streamed_tokenizer if self.placement is None else self.placement.tokenizer

    @contextmanager
    def timed(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t

    # -- phases ----------------------------------------------------------------------------------------------------

    def resolve(self) -> None:
        """Resolve the model and refuse, before loading any weight, what this recipe cannot do with it."""
        recipe = self.recipe
        self.resolved = resolve_model(recipe.model.id, recipe.model.revision)
        check_not_source(self.options.out, self.resolved.path)
        check_layout(recipe, self.resolved.config)
        check_mixed_precision(recipe, self.resolved.adapter, self.resolved.config)
        if self.options.resume and recipe.stage("mixed_precision") is not None:
            raise BadInputError("--resume is not supported for mixed-precision (--keep-sensitive) runs; run without --resume")
        self.reporter.log(f"model {recipe.model.id} -> {self.resolved.path} ({self.resolved.config['architectures'][0]})")

    def fingerprint(self) -> str:
        """What the journal of this run must match to be resumed (qwenquant/journal.py)."""
        return run_fingerprint(self.recipe.to_yaml(), self.resolved.weight_files,
                               {"world_size": self.world.size} if self.world.distributed else None)

    def load(self, offload_folder: Path | None) -> None:
        if offload_folder is None:
            self.placement = ResidentModel(self.resolved, self.recipe.model.dtype)
        else:
            self.placement = OffloadedModel(self.resolved, self.recipe.model.dtype, offload_folder)

    def calibrate(self) -> None:
        c = self.recipe.calibration
        if needs_calibration(self.recipe):
            with self.timed("calibration_data"):
                self.calib = load_calibration(c.dataset, self.tokenizer, c.num_samples, c.seq_len, c.seed)

    def prepare_eval(self) -> None:
        ev = self.recipe.eval
        window = min(ev.window, int(self.resolved.config.get("max_position_embeddings", ev.window)))
        text, text_desc = load_eval_text(ev.eval_text)
        all_windows = eval_windows(self.tokenizer, text, window, None)
        ppl = all_windows[: ev.max_windows] if ev.max_windows else all_windows
        kl = all_windows[: max(1, math.ceil(ev.kl_tokens / window))] if ev.kl_tokens else None  # None: no KL
        compute = compute_dtype_name(self.device, getattr(torch, self.recipe.model.dtype))
        desc = {"text": text_desc} | windows_setting(window, int(ppl.shape[0]), len(all_windows))
        self.windows = EvalWindows(ppl if ev.perplexity else None, kl,
                                   desc | {"kl_tokens": int(kl.numel()) if kl is not None else 0,
                                           "compute_dtype": compute})

    def evaluate_source(self) -> dict:
        """Perplexity, log-probs and tasks of the source (journaled: a resumed run does not measure it again)."""
        saved = self.journal.load_source_eval() if self.journal is not None else None
        if saved is not None:
            return saved
        p, model = self.placement, self.placement.model
        with self.timed("eval_source"):
            ppl, logp = p.evaluate(model, self.windows.ppl, self.windows.kl, self.device, self.reporter, "source")
            tasks = evaluate_recipe_tasks(model, p.tokenizer, self.recipe.eval, self.device, self.reporter, "source")
            greedy = (transformers_greedy(model, p.tokenizer, self.device)  # GGUF: llama.cpp's answers vs the source's
                      if FORMATS[self.recipe.export.format].write_folder is not None and self.recipe.eval.verify
                      else None)
        p.park(model)
        source = {"ppl": ppl, "logp": logp, "tasks": tasks, "greedy": greedy}
        if self.journal is not None:
            self.journal.save_source_eval(source)
        return source

    def quantize(self, recipe: Recipe, model) -> Quantized:
        """Quantize `model` in place per `recipe` and evaluate it; the mixed-precision driver calls this once per
        candidate recipe."""
        state = self.quantize_layers(recipe, model)
        with self.timed("eval_quantized"):
            ppl, logp = self.placement.evaluate(model, self.windows.ppl, self.windows.kl, self.device, self.reporter,
                                                "quantized", state.activations, state.kv_scales)
        resolved = dataclasses.replace(recipe, stages=[spec_of(s).resolve(s, state.searched) for s in recipe.stages])
        return Quantized(resolved, model, state, ppl, logp)

    def quantize_layers(self, recipe: Recipe, model) -> QuantState:
        """The layer loop alone (what every rank of a distributed run does; then their peak memory is gathered)."""
        state = QuantState()
        if self.journal is not None and self.world.main:  # the other ranks journal only their activations
            state.records = self.journal.records
        adapter, store = self.resolved.adapter, self.placement.layer_store
        n_layers = len(model.get_submodule(adapter.layers_path))
        with self.timed("quantize"):
            with self.reporter.step(f"quantize ({' -> '.join(spec_of(s).name for s in recipe.stages)})", n_layers) as advance:
                run_sequential(model, adapter, self.calib, recipe.stages, self.device, state,
                               on_layer_done=lambda i, n: advance(), journal=self.journal, layer_store=store,
                               world=self.world,
                               kv_strategy=recipe.kv_cache.strategy if recipe.kv_cache.enabled else None)
        if self.world.distributed:  # the last collective of a distributed run
            self.rank_peaks = self.world.gather_objects(peak_host_bytes())
            self.world.leave()
        return state

    def evaluate_tasks(self, q: Quantized) -> dict | None:
        with self.timed("eval_tasks_quantized"), activation_quantization(q.model, q.state.activations), \
                kv_cache_quantization(q.model, q.state.kv_scales):
            tasks = evaluate_recipe_tasks(q.model, self.tokenizer, q.recipe.eval, self.device, self.reporter,
                                          "quantized")
        self.placement.park(q.model)
        return tasks

    def export(self, tmp: Path, q: Quantized) -> dict:
        with self.timed("export"):
            fmt = FORMATS[q.recipe.export.format]
            try:
                if fmt.write_folder is not None:  # not a safetensors folder (GGUF: one file)
                    written = fmt.write_folder(tmp, q.model, self.tokenizer, q.recipe, q.state,
                                               self.placement.state_dict_items(q.model))
                else:
                    written = write_checkpoint(tmp, q.model, self.tokenizer, q.recipe, q.state,
                                               self.resolved.adapter.always_ignore,
                                               items=self.placement.state_dict_items(q.model))
            except UnstorableRecord as err:  # values the format cannot store, found per tensor (GPTQ v1 zero point 0)
                raise BadInputError(f"export to {q.recipe.export.format} failed: {err}") from err
            (tmp / "recipe.yaml").write_text(q.recipe.to_yaml())
        return written

    def verify(self, tmp: Path, q: Quantized, src_logp, written: dict, src_greedy=None) -> dict | None:
        if not q.recipe.eval.verify:
            return None
        with self.timed("verify"):
            if FORMATS[q.recipe.export.format].write_folder is not None:  # GGUF: gguf-py + llama.cpp
                return verify_gguf(tmp / written["files"][0], q.model, list(q.state.records), self.tokenizer,
                                   self.windows.kl, src_logp, q.logp, self.device, q.recipe.eval.verify_max_kl,
                                   src_greedy)
            return self.placement.verify(tmp, q.model, q.recipe, q.state, self.windows.kl, src_logp, q.logp,
                                         self.device)

    def report(self, tmp: Path, q: Quantized, source: dict, q_tasks, written: dict, verification,
               sections: dict, offload_folder: Path | None) -> dict:
        """Build and write qwenquant_report.json, REPORT.md and the model card into `tmp`; `sections`: the run's
        optional report sections (mixed_precision, resumed_after_layers)."""
        resolved, ev = self.resolved, q.recipe.eval
        tasks = merge_task_results(source["tasks"], q_tasks, ev.task_limit) if source["tasks"] is not None else None
        evaluation = evaluation_section(self.windows.desc, source["ppl"], q.ppl, kl_stats(source["logp"], q.logp), tasks)
        memory = {"peak_host_bytes": peak_host_bytes(), "device": str(self.device)}
        if offload_folder is not None:  # decoder layers were kept on disk (a resource setting, not in the recipe)
            memory["offload_dir"] = str(offload_folder.parent)
        report = build_report(
            recipe=q.recipe, resolved=resolved, files_sha256={f.name: file_sha256(f) for f in resolved.weight_files},
            command=self.options.command, started=self.started, version=__version__,
            calibration={"tokens": int(self.calib.numel()) if self.calib is not None else 0,
                         "sha256_token_ids": samples_hash(self.calib) if self.calib is not None else None},
            evaluation=evaluation, verification=verification,
            sizes={"source_bytes": _files_bytes(resolved.weight_files),
                   "output_bytes": _files_bytes(tmp / f for f in written["files"])},
            memory=memory, state=q.state, timings=dict(self.seconds) | {"stages": q.state.stage_seconds},
            sections={"gates": check_gates(evaluation, ev), "path": in_memory_path(q.recipe, self.options)} | sections,
        )
        shutil.rmtree(tmp / JOURNAL_DIR, ignore_errors=True)  # scratch of this run, not part of the checkpoint
        write_report(tmp, report)
        (tmp / "README.md").write_text(render_model_card(report, source_license(resolved.path)))
        return report


def run_recipe(recipe: Recipe, options: RunOptions, reporter: Reporter | None = None) -> dict | None:
    """Quantize per the recipe, write `options.out` atomically, verify it, and return the report dict.

    Launched by torchrun (qwenquant/distributed.py), every rank quantizes with its shard of the calibration samples
    and rank 0 alone writes the output and returns the report; the other ranks return None.
    Raises VerificationError (exit 4) or QualityGateError (exit 3) after writing the folder and its report.
    """
    device = resolve_device(recipe.device)
    with join_world(device, options.dist_timeout_s) as world:
        return _run_recipe(recipe, options, reporter, world, local_device(device))


def _run_recipe(recipe: Recipe, options: RunOptions, reporter: Reporter | None, world: World,
                device: torch.device) -> dict | None:
    out = options.out
    check_output_dir(out, options.overwrite)  # fail fast, before any heavy work
    if options.offload_dir is not None:
        check_offload(recipe)
        local = Path(recipe.model.id).expanduser()
        check_offload_dir(options.offload_dir, out, local if local.is_dir() else None)
    run = Run(recipe, options, reporter or Reporter(quiet=True), device, world=world)
    with run.timed("load"):
        run.resolve()
    check_ranks(world, recipe, run.resolved.weight_files, options.stream and streams(recipe))
    if recipe.eval.kl_tokens == 0 and not (options.stream and streams(recipe)):
        raise BadInputError("--kl-tokens 0 (no KL) applies to data-free streamed runs only; this run quantizes in "
                            f"memory ({'; '.join(streaming_blockers(recipe) or ['--no-stream'])}): drop --kl-tokens 0")
    if options.stream and streams(recipe):
        if options.offload_dir is not None or options.resume:
            run.reporter.log("note: --offload-dir / --resume are not used: this data-free recipe streams tensor by "
                             "tensor with bounded memory and restarts from the beginning")
        report = run_streamed(run)
        _raise_on_failure(report, out)
        return report
    if options.resume and recipe.stage("mixed_precision") is None:  # refuse a journal this run cannot continue
        check_resume(world, partial_dir(out), run.fingerprint())
    sessions = nullcontext()
    if options.offload_dir is not None:  # whether the run creates DIR: rank 0's view, before any rank creates it
        missing = world.gather_objects(not Path(options.offload_dir).expanduser().exists())[0]
        sessions = offload_session(options.offload_dir, out, world.rank, remove_dir=missing and world.main)
    with sessions as offload_folder:
        with run.timed("load"):
            run.load(offload_folder)
        run.calibrate()
        check_shardable(world, run.calib)
        if not world.main:  # the other ranks quantize and journal their shard alongside rank 0, then stop
            run.journal = share_journal(world, None)
            run.quantize_layers(recipe, run.placement.model)
            return None
        run.prepare_eval()
        report = _write_output(run, offload_folder)
    _raise_on_failure(report, out)
    return report


def _write_output(run: Run, offload_folder: Path | None) -> dict:
    """Everything that writes into the hidden `.OUT.partial/` folder, renamed into place at the end."""
    recipe, options = run.recipe, run.options
    mixed = recipe.stage("mixed_precision") is not None
    with atomic_output_dir(options.out, options.overwrite, resume=options.resume, keep_on_interrupt=_has_progress) as tmp:
        # the journal keeps finished layers on disk (bounded memory, --resume); mixed precision may quantize the
        # model several times, so it keeps its records in memory
        run.journal = None if mixed else Journal(tmp, run.fingerprint(), run.world)
        if run.world.distributed:  # the other ranks open theirs now (qwenquant/runner/ranks.py)
            share_journal(run.world, run.journal)
        done = run.journal.layers_done() if run.journal is not None else 0
        if options.resume:
            run.reporter.log(f"resuming after {done} finished decoder layers" if done else "nothing to resume; starting")
        source = run.evaluate_source()
        sections: dict = {}
        if mixed:  # resolves the keep list (measuring sensitivity if asked; auto tries candidates)
            q, sections["mixed_precision"] = run_mixed_precision(run, source["ppl"])
        else:
            q = run.quantize(recipe, run.placement.model)
        q_tasks = run.evaluate_tasks(q)
        written = run.export(tmp, q)
        verification = run.verify(tmp, q, source["logp"], written, source.get("greedy"))
        if done:
            sections["resumed_after_layers"] = done
        if run.world.distributed:
            sections["ranks"] = ranks_section(run.world, int(run.calib.shape[0]), run.rank_peaks)
        if "gguf" in written:  # what the GGUF writer stored: tensor types, float16 rounding, tokenizer
            sections["gguf"] = written["gguf"]
        return run.report(tmp, q, source, q_tasks, written, verification, sections, offload_folder)


def in_memory_path(recipe: Recipe, options: RunOptions) -> dict:
    """The report's `path` section of a run quantized in memory: why it did not stream."""
    why = streaming_blockers(recipe) or ["--no-stream"]
    return {"streamed": False, "why": why}


def _raise_on_failure(report: dict, out: Path) -> None:
    verification = report["verification"]
    if verification is not None and not verification["passed"]:
        raise VerificationError(
            f"verification failed: {verification['reason']}; the folder {out} was written with its report for inspection"
        )
    failed = [g for g in report["gates"] if not g["passed"]]
    if failed:
        raise QualityGateError(f"quality gate failed: {failed[0]['description']}; the folder {out} and its report were written")


def _files_bytes(files) -> int:
    return sum(Path(f).stat().st_size for f in files)


def _has_progress(tmp: Path) -> bool:
    """Whether an interrupted run's temporary folder holds finished layers worth resuming."""
    meta = read_journal(tmp)
    return meta is not None and meta.get("layers_done", 0) > 0
