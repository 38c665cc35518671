"""The Recipe: the single, versioned description of a run. CLI flags build one; recipes/*.yaml load into one;
the output folder keeps the resolved one (`recipe.yaml`) so any result can be reproduced.

Schema (version 1):
```
version: 1
model: {id, revision, dtype}
calibration: {dataset, num_samples, seq_len, seed}
stages:            # ordered, each a one-key mapping
  - mixed_precision: {keep_sensitive, keep, max_keep, sensitivity_samples}   # optional, first
  - smooth: {alpha, mappings, layer_alpha, alpha_search}
  - fp8: {weights, activations, block_size, clip, clip_search}
  - gptq: {bits, group_size, symmetric, actorder, dampening_frac, block_size, clip, clip_search}
    | awq: {bits, group_size, symmetric, n_grid, clip, norm_mappings} | rtn: {bits, group_size, symmetric, clip, clip_search}
  - compensate: {steps, lr, samples, batch_size, rounding, norms, qk_norms, target}   # optional, after the quantizer
export: {format, max_shard_size_mb}
eval: {perplexity, eval_text, window, max_windows (N | all), kl_tokens, verify, verify_max_kl, max_ppl_increase_pct,
       tasks, task_limit, min_task_recovery_pct}
device: auto | cpu | cuda | cuda:N
target: {name, force}   # optional: the GPU the checkpoint is for (qwenquant.targets); refuses what it cannot run
kv_cache: {scheme: none | fp8, strategy: tensor | head}   # optional: calibrated FP8 KV-cache scales (absent: none)
```
Each config validates itself in `__post_init__` (ValueError naming the key and the allowed values). Stage configs
live with their stages (`qwenquant/stages/`, listed in `qwenquant.stages.registry.STAGES`); export formats are the
entries of `qwenquant.export.registry.FORMATS`, which also say which settings and shapes they can store.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qwenquant.errors import BadInputError
from qwenquant.eval.perplexity import DEFAULT_WINDOWS
from qwenquant.quant.kv_cache import KV_STRATEGIES
from qwenquant.export.registry import FORMATS
from qwenquant.stages.registry import QUANTIZERS, STAGES, spec_of, stage_name
from qwenquant.targets import TARGETS, target_runs
from qwenquant.validation import choice, count_or_all, percent, positive

RECIPE_VERSION = 1
EXPORT_FORMATS = tuple(FORMATS)


@dataclass
class ModelConfig:
    id: str = ""
    revision: str | None = None
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        choice("model.dtype", self.dtype, ("bfloat16", "float16", "float32"))


@dataclass
class CalibrationConfig:
    dataset: str = "builtin"
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        positive("calibration.num_samples", self.num_samples)
        positive("calibration.seq_len", self.seq_len)
        if self.seq_len < 8:
            raise ValueError(f"calibration.seq_len: must be >= 8, got {self.seq_len}")


@dataclass
class ExportConfig:
    format: str = "compressed-tensors"
    max_shard_size_mb: int = 4096

    def __post_init__(self) -> None:
        choice("export.format", self.format, EXPORT_FORMATS)
        positive("export.max_shard_size_mb", self.max_shard_size_mb)


@dataclass
class EvalConfig:
    perplexity: bool = True
    eval_text: str = "wikitext2"  # wikitext2 | path to .txt/.raw
    window: int = 2048  # tokens per non-overlapping window (capped at the model's max positions)
    max_windows: int | None = DEFAULT_WINDOWS  # the first N windows, or None (`all`, also in YAML): the whole text
    kl_tokens: int = 4096  # tokens on which KL(source || quantized) and verification are measured; 0: no KL
    verify: bool = True
    # Reloaded checkpoint vs source, mean per-token KL in nats: catches broken checkpoints (they score several
    # nats); quality itself is gated by max_ppl_increase_pct. 3-bit INT on a small model reaches ~0.06.
    verify_max_kl: float = 0.5
    max_ppl_increase_pct: float | None = None  # quality gate: fail (exit 3) above this perplexity increase
    tasks: list = field(default_factory=list)  # zero-shot tasks (qwenquant eval names), source vs quantized
    task_limit: int | None = None  # documents per task (quick CI runs)
    min_task_recovery_pct: float | None = None  # quality gate: every task keeps >= this % of the source accuracy

    def __post_init__(self) -> None:
        self.max_ppl_increase_pct = percent("eval.max_ppl_increase_pct", self.max_ppl_increase_pct)
        self.min_task_recovery_pct = percent("eval.min_task_recovery_pct", self.min_task_recovery_pct)
        positive("eval.window", self.window)
        if self.kl_tokens != 0:
            positive("eval.kl_tokens", self.kl_tokens)
        elif self.verify:
            raise ValueError("eval.kl_tokens: 0 (no KL measured) needs --no-verify: verification measures KL")
        self.max_windows = count_or_all("eval.max_windows", self.max_windows)
        if self.min_task_recovery_pct is not None and not self.tasks:
            raise ValueError("eval.min_task_recovery_pct: needs eval.tasks (--tasks)")
        if self.task_limit is not None:
            positive("eval.task_limit", self.task_limit)
        if not isinstance(self.tasks, list) or not all(isinstance(t, str) and t for t in self.tasks):
            raise ValueError("eval.tasks: must be a list of task names")
        if self.max_ppl_increase_pct is not None and not self.perplexity:
            raise ValueError("eval.max_ppl_increase_pct: needs perplexity evaluation (remove --no-ppl)")
        if self.verify_max_kl <= 0:
            raise ValueError(f"eval.verify_max_kl: must be > 0, got {self.verify_max_kl}")


@dataclass
class TargetConfig:
    """The device the checkpoint is made for (`--target`, a key of `qwenquant.targets.TARGETS`; `auto` is resolved
    by the caller, so a saved recipe names a device): a quantizer whose serving scheme that device cannot run is
    refused unless `force`."""

    name: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.name is not None:
            choice("target.name", self.name, tuple(TARGETS))
        if self.force and self.name is None:
            raise ValueError("target.force: needs target.name (--target)")


@dataclass
class KVCacheConfig:
    """The KV-cache scheme written beside the weights: `none` (the engine's cache keeps the model dtype unless told
    otherwise) or `fp8` (E4M3 K/V scales calibrated after each layer is quantized, qwenquant/quant/kv_cache.py),
    one scale per tensor or per KV head (`strategy`)."""

    scheme: str = "none"
    strategy: str = "tensor"

    def __post_init__(self) -> None:
        choice("kv_cache.scheme", self.scheme, ("none", "fp8"))
        choice("kv_cache.strategy", self.strategy, KV_STRATEGIES)
        if self.scheme == "none" and self.strategy != "tensor":
            raise ValueError(f"kv_cache.strategy: {self.strategy} needs kv_cache.scheme fp8 (--kv-cache fp8)")

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    stages: list = field(default_factory=list)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    version: int = RECIPE_VERSION
    target: TargetConfig = field(default_factory=TargetConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise ValueError(f"version: recipe version {self.version} is not supported; this qwenquant reads {RECIPE_VERSION}")
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise ValueError(f"device: {self.device!r} is not allowed; use auto, cpu, cuda or cuda:N")
        specs = [spec_of(s) for s in self.stages]
        names = [spec.name for spec in specs]
        quantizers = [n for n in names if n in QUANTIZERS]
        if len(quantizers) != 1:
            raise ValueError(f"stages: need exactly one quantizer stage ({', '.join(QUANTIZERS)}), got {quantizers or 'none'}")
        q = names.index(quantizers[0])
        for i, spec in enumerate(specs):
            if spec.role == "transform" and i > q:
                raise ValueError(f"stages: {spec.name} must come before the quantizer")
            if spec.role == "refine" and (i < q or names.count(spec.name) > 1):
                raise ValueError(f"stages: {spec.name} must come after the quantizer, once")
            if spec.role == "plan" and (i != 0 or names.count(spec.name) > 1):
                raise ValueError(f"stages: {spec.name} must be the first stage, once")
            spec.check(self.stages[i], quantizers[0])
        mixed = self.stage("mixed_precision")
        if mixed is not None and mixed.keep_sensitive == "auto" and self.eval.max_ppl_increase_pct is None:
            raise ValueError("stages: mixed_precision keep_sensitive auto needs eval.max_ppl_increase_pct "
                             "(--max-ppl-increase)")
        # the format refuses what it cannot store, record kind included (ValueError naming export.format)
        FORMATS[self.export.format].check_stage(STAGES[quantizers[0]].record_kind, self.stage(quantizers[0]))
        if self.kv_cache.enabled and FORMATS[self.export.format].kv_cache_scheme is None:
            raise ValueError(f"kv_cache.scheme: --format {self.export.format} cannot carry a KV-cache scheme; use "
                             "--format compressed-tensors, or drop --kv-cache fp8")
        self._check_target(quantizers[0])

    def _check_target(self, quantizer: str) -> None:
        if self.target.name is None or self.target.force:
            return
        scheme = STAGES[quantizer].serving_scheme(self.stage(quantizer))
        why = target_runs(self.target.name, scheme)
        if why:
            raise ValueError(f"target.name: {why}; run its recipe instead (qwenquant run --target "
                             f"{self.target.name} --model ...) or pass --force-target to write it anyway")

    def stage(self, name: str):
        return next((s for s in self.stages if stage_name(s) == name), None)

    @property
    def quantizer(self) -> str:
        """The name of the recipe's quantizer stage."""
        return next(stage_name(s) for s in self.stages if stage_name(s) in QUANTIZERS)

    @property
    def quantizer_config(self):
        return self.stage(self.quantizer)

    @property
    def record_kind(self) -> str:
        """The kind of QuantizedWeight the quantizer makes (fp8 | int)."""
        return STAGES[self.quantizer].record_kind

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "model": dataclasses.asdict(self.model),
            "calibration": dataclasses.asdict(self.calibration),
            "stages": [{stage_name(s): dataclasses.asdict(s)} for s in self.stages],
            "export": dataclasses.asdict(self.export),
            "eval": dataclasses.asdict(self.eval),
            "device": self.device,
        } | ({"target": dataclasses.asdict(self.target)} if self.target.name else {}) | (
            {"kv_cache": dataclasses.asdict(self.kv_cache)} if self.kv_cache.enabled else {})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _build(cls: type, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(allowed))}")
    return cls(**data)


def recipe_from_dict(data: dict) -> Recipe:
    """Build and validate a Recipe; raises ValueError whose message starts with the offending key path."""
    if not isinstance(data, dict):
        raise ValueError("recipe: expected a mapping at the top level")
    top = {"version", "model", "calibration", "stages", "export", "eval", "device", "target", "kv_cache"}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(top))}")
    stages = []
    for i, entry in enumerate(data.get("stages") or []):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"stages[{i}]: each stage is a one-key mapping like '- fp8: {{...}}'")
        (name, body), = entry.items()
        if name not in STAGES:
            raise ValueError(f"stages[{i}].{name}: unknown stage; allowed: {', '.join(STAGES)}")
        try:
            stages.append(_build(STAGES[name].config, body, f"stages[{i}].{name}"))
        except ValueError as err:  # a stage names its own keys "fp8.weights": add where it sits
            msg = str(err)
            raise ValueError(msg if msg.startswith("stages[") else f"stages[{i}].{msg}") from err
    return Recipe(
        version=data.get("version", RECIPE_VERSION),
        model=_build(ModelConfig, data.get("model"), "model"),
        calibration=_build(CalibrationConfig, data.get("calibration"), "calibration"),
        stages=stages,
        export=_build(ExportConfig, data.get("export"), "export"),
        eval=_build(EvalConfig, data.get("eval"), "eval"),
        device=data.get("device", "auto"),
        target=_build(TargetConfig, data.get("target"), "target"),
        kv_cache=_build(KVCacheConfig, data.get("kv_cache"), "kv_cache"),
    )


def _line_of(node: yaml.Node, path: str) -> int | None:
    """1-based line of a dotted key path like `stages[1].fp8.weights` in a composed YAML tree."""
    parts = [p for p in re.split(r"\.|\[(\d+)\]", path) if p]
    line = node.start_mark.line + 1
    for part in parts:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                return line
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Read a recipe file; errors name the file, line and key. `overrides` (e.g. model.id) are applied first."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except OSError as err:
        raise BadInputError(f"recipe {path}: cannot read it ({err.strerror})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        raise BadInputError(f"recipe {path}{at}: not valid YAML ({getattr(err, 'problem', err)})") from err
    data = data or {}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][key] = value
    try:
        return recipe_from_dict(data)
    except (ValueError, TypeError) as err:
        msg = str(err)
        key = msg.split(":", 1)[0]
        line = _line_of(node, key) if node is not None else None
        at = f":{line}" if line else ""
        raise BadInputError(f"recipe {path}{at}: {msg}") from err


def validate(build) -> Recipe:
    """Run a Recipe constructor, turning ValueError into a one-line BadInputError for the CLI."""
    try:
        return build()
    except (ValueError, TypeError) as err:
        raise BadInputError(f"invalid settings: {err}") from err
