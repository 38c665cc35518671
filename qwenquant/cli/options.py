"""The option groups the commands share, each flag bound to the field it sets (qwenquant/cli/flags.py).

The quantize commands (`fp8`, `gptq`, `awq`, `rtn`) take `QUANTIZE_GROUPS` plus their scheme's own flags;
`run`, `sensitivity`, `compare`, `push` and `report` reuse the groups (or parts of them) that fit.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

from qwenquant.cli.flags import INVERTED, REQUIRED, Flag, Group
from qwenquant.export.registry import FORMATS
from qwenquant.recipe import CalibrationConfig, EvalConfig, ExportConfig, KVCacheConfig, ModelConfig, Recipe, TargetConfig
from qwenquant.recipe_builder import parse_compensate_target, parse_keep_sensitive, parse_tasks, tasks_text
from qwenquant.runner.options import RunOptions
from qwenquant.stages.compensate import CompensateStage
from qwenquant.stages.mixed_precision import MixedPrecisionStage
from qwenquant.targets import TARGET_NAMES, resolve_target
from qwenquant.validation import count_text

MODEL = Group(ModelConfig, (
    Flag("id", str, "Local folder, hub id, or shorthand like Qwen3-4B (= Qwen/Qwen3-4B).", ("--model", "-m"),
         param="model", default=REQUIRED, lead=True),
    Flag("revision", Optional[str], "Hub revision (branch, tag or commit)."),
), section="model")

CALIBRATION = Group(CalibrationConfig, (
    Flag("dataset", str, "builtin | builtin:en | builtin:zh | chat | chat:en | chat:zh (conversations through the "
         "model's chat template) | FILE.txt | FILE.jsonl (text or messages) | hub dataset id[:config][@split].",
         ("--calib",), param="calib"),
    Flag("num_samples", int, "Calibration samples."),
    Flag("seq_len", int, "Tokens per calibration sample."),
    Flag("seed", int, "Seed for calibration sampling."),
), section="calibration")

DEVICE = Group(Recipe, (
    Flag("device", str, "auto | cpu | cuda | cuda:N: where each layer is processed."),
))

TargetName = Enum("TargetName", {name: name for name in TARGET_NAMES}, type=str)
TARGET = Group(TargetConfig, (
    Flag("name", Optional[TargetName], "The GPU the checkpoint is for: a scheme it cannot run is refused with the "
         "reason (unless --force-target); auto: this machine's GPU, cpu without one. `qwenquant run --target NAME` "
         "runs that GPU's recipe.", ("--target",), param="target", to_field=resolve_target),
    Flag("force", bool, "Write a scheme the --target cannot run.", ("--force-target",), param="force_target"),
), section="target")

KVScheme = Enum("KVScheme", {"none": "none", "fp8": "fp8"}, type=str)
KVStrategy = Enum("KVStrategy", {"tensor": "tensor", "head": "head"}, type=str)
KV_CACHE = Group(KVCacheConfig, (
    Flag("scheme", KVScheme, "fp8: calibrate FP8 (E4M3) K/V-cache scales after each layer is quantized and write "
         "them for vLLM/SGLang (compressed-tensors kv_cache_scheme, k_scale/v_scale); the report's KL then includes "
         "the FP8 cache. none: no KV scheme.", ("--kv-cache",), param="kv_cache"),
    Flag("strategy", KVStrategy, "With --kv-cache fp8: one scale per attention layer for K and one for V (tensor), "
         "or one per KV head (head).", ("--kv-cache-strategy",), param="kv_cache_strategy"),
), section="kv_cache")

PERPLEXITY_TEXT = Group(EvalConfig, (
    Flag("eval_text", str, "wikitext2 (WikiText-2 test) or a text file for perplexity."),
    Flag("max_windows", str, "Perplexity on the first N windows of the text, or all of them (all).",
         param="eval_windows", metavar="N|all", to_flag=count_text),
    Flag("window", int, "Tokens per perplexity window (capped at the model's max positions).", ("--eval-window",),
         param="eval_window"),
), section="eval")

EVAL = Group(EvalConfig, PERPLEXITY_TEXT.flags + (
    Flag("perplexity", bool, "Skip perplexity (KL and verification still run).", ("--no-ppl",), param="no_ppl",
         **INVERTED),
    Flag("verify", bool, "Do not reload and compare the written checkpoint.", ("--no-verify",), param="no_verify",
         **INVERTED),
    Flag("verify_max_kl", float, "Fail if the reloaded checkpoint's mean next-token KL vs the source exceeds this "
         "(nats)."),
    Flag("kl_tokens", int, "Tokens of the evaluation text on which the next-token KL vs the source (and "
         "verification) is measured; 0 with --no-verify: no KL (data-free streamed runs only; with --no-ppl too, "
         "no evaluation pass at all).", ("--kl-tokens",), metavar="N"),
    Flag("max_ppl_increase_pct", Optional[str], "Quality gate: exit 3 (after writing the report) if perplexity "
         "rises more than this many percent (1 or 1%: one percent).", ("--max-ppl-increase",),
         param="max_ppl_increase", metavar="PCT"),
    Flag("tasks", Optional[str], "Comma-separated zero-shot tasks to measure on source and result "
         "(hellaswag,piqa,arc_easy,winogrande,ceval).", ("--tasks",), to_field=parse_tasks, to_flag=tasks_text),
    Flag("task_limit", Optional[int], "Documents per task (quick runs).", ("--task-limit",)),
    Flag("min_task_recovery_pct", Optional[str], "Quality gate: exit 3 if any task keeps less than this % of the "
         "source accuracy (99 or 99%).", ("--min-task-recovery",), param="min_task_recovery",
         metavar="PCT"),
), section="eval")

MIXED_PRECISION = Group(MixedPrecisionStage, (
    Flag("keep_sensitive", Optional[str], "Keep the N most sensitive fused groups (q/k/v, o, gate/up, down of a "
         "layer) in bf16; auto: the fewest meeting --max-ppl-increase.", ("--keep-sensitive",), metavar="N|auto",
         to_field=parse_keep_sensitive),
    Flag("max_keep", int, "With --keep-sensitive auto: keep at most this many groups.", ("--max-keep",)),
), section="mixed_precision", switch="keep_sensitive")

COMPENSATE = Group(CompensateStage, (
    Flag(None, bool, "After quantizing each layer, tune its scales, INT rounding and norm weights so its output "
         "matches the unquantized layer (error-compensation fine-tuning).", ("--compensate/--no-compensate",),
         param="compensate", default=False),
    Flag("steps", int, "Signed-gradient steps per layer for --compensate.", param="compensate_steps"),
    Flag("lr", float, "Step size for --compensate (rounding offsets, in grid steps; scales and norms take relative "
         "steps of a fixed fraction of it).", param="compensate_lr"),
    Flag("target", str, "What --compensate fits each quantized layer to: float = the unquantized model's own layer "
         "output (also absorbs error from earlier layers); layer = the unquantized layer on the quantized model's "
         "inputs.", ("--compensate-target",), param="compensate_target", metavar="float|layer",
         to_field=parse_compensate_target),
), section="compensate", switch="compensate")

RUN = Group(RunOptions, (
    Flag("out", Optional[Path], "Output folder (default: ./<model>-<SCHEME>-<what the flags changed>).",
         ("--out", "-o"), default=None, lead=True),
    Flag("overwrite", bool, "Replace an existing output folder."),
    Flag("resume", bool, "Continue an interrupted run of the same command from its last finished decoder layer "
         "(kept in the hidden .OUT.partial folder).", ("--resume",)),
    Flag("offload_dir", Optional[Path], "Keep decoder layers not in use on disk under DIR (created if missing; the "
         "run's files are removed at the end), so models larger than host RAM can be quantized. Evaluation and "
         "verification then run one layer at a time; not with --tasks or --keep-sensitive.", ("--offload-dir",),
         metavar="DIR"),
    Flag("stream", bool, "Data-free recipes (FP8 dynamic / weight-only / block, RTN; no smoothing, search, compensation "
         "or keep list) stream the source safetensors through the quantizer into the output shards with bounded "
         "memory and worker threads, building no model; --no-stream quantizes them in memory like every other "
         "recipe (same bytes).", ("--stream/--no-stream",)),
    Flag("dist_timeout_s", float, "Distributed runs (torchrun / --nproc): seconds a rank waits for the others in one "
         "collective before the run fails (rank 0 evaluates the source meanwhile).", ("--dist-timeout",),
         param="dist_timeout", metavar="S"),
))

OUTPUT = Group(None, (
    Flag(None, bool, "Load nothing, write nothing: estimate peak host/device memory, output size and time per stage "
         "from config.json, the safetensors headers and a few-second speed probe, and check them against the free "
         "memory and disk (exit 5 when they do not fit).", ("--dry-run",), param="dry_run", default=False),
    Flag(None, bool, "No progress output.", ("--quiet", "-q"), param="quiet", default=False),
    Flag(None, bool, "Print a JSON summary on stdout.", ("--json",), param="json_out", default=False),
    Flag(None, bool, "Print the resolved recipe as YAML and exit.", ("--print-recipe",), param="print_recipe",
         default=False),
    Flag(None, int, "Run on N processes of this machine (re-launched through torch.distributed.run, like torchrun "
         "--nproc-per-node N): each calibrates on its share of the samples, rank 0 writes the output.",
         ("--nproc",), param="nproc", default=1, metavar="N"),
))



def format_group(kind: str, help: str) -> Group:
    """`--format`: a choice of the export formats that store `kind` (fp8 | int) weights, in registry order."""
    names = [name for name, fmt in FORMATS.items() if kind in fmt.stores]
    choices = Enum(f"{kind.upper()}Format", {name: name for name in names}, type=str)
    return Group(ExportConfig, (Flag("format", choices, help, ("--format",)),), section="export")


PRINTING = OUTPUT.only("quiet", "json_out")  # commands that print a result: --quiet, --json

# after the scheme's own flags, in --help order (the lead flags, --model and --out, come first)
QUANTIZE_GROUPS = (MODEL, CALIBRATION, DEVICE, TARGET, KV_CACHE, EVAL, MIXED_PRECISION, COMPENSATE, RUN, OUTPUT)
