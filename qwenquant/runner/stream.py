"""A run on the data-free streaming path (qwenquant/stream/): no model is built and no calibration forward runs.

Phases: build the meta skeleton and read the source headers (`load`), quantize and write the shards tensor by
tensor on worker threads (`quantize_and_write`), write config/tokenizer, then one layer-streamed pass that evaluates
the source and the written checkpoint and verifies every stored tensor (`verify`, qwenquant/stream/verify.py), and the
report. The output folder is written atomically like every run's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qwenquant import __version__
from qwenquant.export.checkpoint import write_metadata
from qwenquant.export.model_card import render_model_card, source_license
from qwenquant.export.writer import atomic_output_dir
from qwenquant.gates import check_gates
from qwenquant.model.loader import file_sha256
from qwenquant.model.skeleton import load_generation_config, load_tokenizer, meta_skeleton
from qwenquant.pipeline import peak_host_bytes
from qwenquant.report import build_report, evaluation_section, write_report
from qwenquant.stages.registry import spec_of
from qwenquant.state import QuantState
from qwenquant.stream.execute import count_jobs, stream_plan
from qwenquant.stream.plan import build_plan
from qwenquant.stream.shards import ShardLayout
from qwenquant.stream.source import SourceFiles
from qwenquant.stream.verify import evaluate_and_verify


def stream_workers() -> int:
    """Worker threads: one per core this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_streamed(run) -> dict:
    """Run `run.recipe` (a recipe `qwenquant.stream.eligibility.streams` accepts) into `run.options.out`; the
    report dict. `run`: a qwenquant.runner.run.Run after its `resolve` phase."""
    recipe, options, resolved, reporter = run.recipe, run.options, run.resolved, run.reporter
    with run.timed("load"):
        skeleton = meta_skeleton(resolved, recipe.model.dtype)
        skeleton.generation_config = load_generation_config(resolved.path)
        run.streamed_tokenizer = load_tokenizer(resolved)
    run.prepare_eval()
    workers = stream_workers()
    reporter.log(f"data-free recipe: streaming {len(resolved.weight_files)} source file(s) through the quantizer "
                 f"on {workers} worker thread(s); no model is loaded")
    with SourceFiles(resolved.weight_files) as source, atomic_output_dir(options.out, options.overwrite) as tmp:
        plan = build_plan(skeleton, resolved.adapter, recipe, source, resolved.reference)
        with run.timed("quantize_and_write"):
            layout = ShardLayout(plan.outputs, recipe.export.max_shard_size_mb * 2**20)
            layout.create(tmp)
            try:
                with reporter.step("quantize + write shards (streamed)", count_jobs(plan, source)) as advance:
                    stream_plan(plan, source, layout, recipe, resolved.reference, workers, advance)
            finally:
                layout.close()
            files = layout.finish()
            write_metadata(tmp, skeleton, run.tokenizer, recipe, plan.quantized, resolved.adapter.always_ignore)
            (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        n_layers = int(resolved.config["num_hidden_layers"])
        if run.windows.ppl is None and run.windows.kl is None:  # --no-ppl --kl-tokens 0 --no-verify: nothing to do
            reporter.log("no evaluation pass: --no-ppl, --kl-tokens 0 and --no-verify")
            checked = {"source": None, "quantized": None, "kl": None, "verification": None, "layer_errors": {}}
        else:
            with run.timed("verify"), reporter.step("evaluate + verify, layer by layer", n_layers) as advance:
                checked = evaluate_and_verify(resolved, tmp, plan, recipe, run.windows.ppl, run.windows.kl,
                                              run.device, on_layer=advance)
        shutil.rmtree(tmp / "_unused_offload", ignore_errors=True)
        report = _report(run, tmp, plan, files, checked)
    return report


def _layer_reports(plan, errors: dict[str, float], stage: str) -> list[dict]:
    by_layer: dict[int, dict] = {}
    for name in plan.quantized:
        i = plan.layers[name]
        local = name.split(".", 3)[3] if name.count(".") >= 3 else name
        by_layer.setdefault(i, {})[local] = {"weight_rel_error": errors[name]} if name in errors else {}
    return [{"layer": i, stage: by_layer[i]} for i in sorted(by_layer)]


def _report(run, tmp: Path, plan, files: list[str], checked: dict) -> dict:
    recipe, resolved, ev = run.recipe, run.resolved, run.recipe.eval
    evaluation = evaluation_section(run.windows.desc, checked["source"], checked["quantized"], checked["kl"], None)
    state = QuantState()
    state.layer_reports = _layer_reports(plan, checked["layer_errors"], spec_of(recipe.quantizer_config).name)
    verification = checked["verification"] if ev.verify else None
    report = build_report(
        recipe=recipe, resolved=resolved, files_sha256={f.name: file_sha256(f) for f in resolved.weight_files},
        command=run.options.command, started=run.started, version=__version__,
        calibration={"tokens": 0, "sha256_token_ids": None},
        evaluation=evaluation, verification=verification,
        sizes={"source_bytes": sum(f.stat().st_size for f in resolved.weight_files),
               "output_bytes": sum((tmp / f).stat().st_size for f in files)},
        memory={"peak_host_bytes": peak_host_bytes(), "device": str(run.device)}, state=state,
        timings=dict(run.seconds) | {"stages": {}},
        sections={"gates": check_gates(evaluation, ev), "path": {"streamed": True, "workers": stream_workers()}},
    )
    write_report(tmp, report)
    (tmp / "README.md").write_text(render_model_card(report, source_license(resolved.path)))
    return report
