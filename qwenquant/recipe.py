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
eval: {perplexity, eval_text, window, max_windows, kl_tokens, verify, verify_max_kl}
device: auto | cpu | cuda | cuda:N
```
Each config validates itself in `__post_init__` (ValueError naming the key and the allowed values).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qwenquant.errors import BadInputError

RECIPE_VERSION = 1


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not allowed; use one of {', '.join(map(str, allowed))}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def _ratio_map(name: str, value: Any, key_type: type, low: float, exclusive_low: bool = False) -> None:
    """A mapping key -> number in [low, 1] ((low, 1] if exclusive_low), as written by the scale search."""
    if not isinstance(value, dict):
        raise ValueError(f"{name}: must be a mapping, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(k, key_type) or isinstance(k, bool):
            raise ValueError(f"{name}: key {k!r} must be a {key_type.__name__}")
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (low < v if exclusive_low else low <= v) and v <= 1
        if not ok:
            raise ValueError(f"{name}.{k}: must be a number in {'(' if exclusive_low else '['}{low:g}, 1], got {v!r}")


@dataclass
class ModelConfig:
    id: str = ""
    revision: str | None = None
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        _choice("model.dtype", self.dtype, ("bfloat16", "float16", "float32"))


@dataclass
class CalibrationConfig:
    dataset: str = "builtin"
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        _positive("calibration.num_samples", self.num_samples)
        _positive("calibration.seq_len", self.seq_len)
        if self.seq_len < 8:
            raise ValueError(f"calibration.seq_len: must be >= 8, got {self.seq_len}")


@dataclass
class SmoothStage:
    """SmoothQuant-style activation scaling folded into preceding norms/linears."""

    alpha: float = 0.5
    mappings: str = "all"  # all | norms (only input/post-attention layernorms)
    layer_alpha: dict[int, float] = field(default_factory=dict)  # decoder layer -> alpha (overrides alpha)
    alpha_search: bool = False  # choose each layer's alpha by its FP8-quantized output error (scale search)

    def __post_init__(self) -> None:
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smooth.alpha: must be a number in [0, 1], got {self.alpha!r}")
        _choice("smooth.mappings", self.mappings, ("all", "norms"))
        _ratio_map("smooth.layer_alpha", self.layer_alpha, int, 0.0)
        if self.alpha_search and self.layer_alpha:
            raise ValueError("smooth.layer_alpha: set either alpha_search or per-layer alphas, not both")

    def alpha_for(self, layer: int) -> float:
        return float(self.layer_alpha.get(layer, self.alpha))


@dataclass
class FP8Stage:
    """E4M3 weights (+ optional FP8 activations)."""

    weights: str = "channel"  # tensor | channel | block
    activations: str = "dynamic"  # dynamic | static | none
    block_size: int = 128
    clip: dict[str, float] = field(default_factory=dict)  # Linear (full name) -> weight clipping ratio; else 1.0
    clip_search: bool = False  # choose each Linear's clipping ratio by its output error (scale search)
    # per-Linear weight granularity overriding `weights` (full name -> channel | block), or chosen per vLLM fused
    # group by output error (`granularity_search`, with channel weights and dynamic activations; compressed-tensors
    # stores both in one checkpoint as two config groups)
    granularity: dict[str, str] = field(default_factory=dict)
    granularity_search: bool = False

    def weights_for(self, name: str) -> str:
        """The weight granularity of one Linear (full name)."""
        return self.granularity.get(name, self.weights)

    def __post_init__(self) -> None:
        _choice("fp8.weights", self.weights, ("tensor", "channel", "block"))
        for name, g in self.granularity.items():
            _choice(f"fp8.granularity.{name}", g, ("channel", "block"))
        if (self.granularity_search or self.granularity) and (self.weights != "channel" or self.activations != "dynamic"):
            raise ValueError("fp8.granularity: per-Linear channel/block choice needs weights: channel and "
                             "activations: dynamic (block weights pair with dynamic group activations)")
        if self.granularity_search and self.granularity:
            raise ValueError("fp8.granularity: set either granularity_search or per-Linear granularity, not both")
        _choice("fp8.activations", self.activations, ("dynamic", "static", "none"))
        _positive("fp8.block_size", self.block_size)
        if self.weights == "block" and self.activations == "static":
            raise ValueError("fp8: block weights pair with dynamic group activations; use activations: dynamic")
        _ratio_map("fp8.clip", self.clip, str, 0.0, exclusive_low=True)
        if self.clip_search and self.clip:
            raise ValueError("fp8.clip: set either clip_search or per-Linear clip ratios, not both")


@dataclass
class IntStage:
    """Shared fields of the INT weight-only quantizers (RTN, GPTQ, AWQ)."""

    bits: int = 4
    group_size: int = 128  # -1 = per output channel
    symmetric: bool = True

    def __post_init__(self) -> None:
        _choice(f"{self.name}.bits", self.bits, (2, 3, 4, 8))
        _choice(f"{self.name}.group_size", self.group_size, (-1, 32, 64, 128))
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"{self.name}.symmetric: must be true or false")

    name = "int"


@dataclass
class ClippedIntStage(IntStage):
    """INT quantizers whose weight range can be clipped per Linear: fixed ratios (`clip`, full Linear name -> ratio;
    absent = 1.0) or chosen by each Linear's output error on calibration inputs (`clip_search`, scale search)."""

    clip: dict = field(default_factory=dict)
    clip_search: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _ratio_map(f"{self.name}.clip", self.clip, str, 0.0, exclusive_low=True)
        if self.clip_search and self.clip:
            raise ValueError(f"{self.name}.clip: set either clip_search or per-Linear clip ratios, not both")


@dataclass
class RTNStage(ClippedIntStage):
    name = "rtn"


@dataclass
class GPTQStage(ClippedIntStage):
    actorder: str = "static"  # static | group | none
    dampening_frac: float = 0.01
    block_size: int = 128
    name = "gptq"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("gptq.actorder", self.actorder, ("static", "group", "none"))
        if not 0.0 <= self.dampening_frac < 1.0:
            raise ValueError(f"gptq.dampening_frac: must be in [0, 1), got {self.dampening_frac}")


@dataclass
class AWQStage(IntStage):
    symmetric: bool = False
    n_grid: int = 20
    clip: bool = True
    norm_mappings: bool = True  # input_layernorm -> q/k/v (measured on Qwen3, see benchmarks)
    name = "awq"


@dataclass
class MixedPrecisionStage:
    """Keep whole vLLM fused groups (q/k/v, o, gate/up, down of a layer) in the source dtype.

    `keep_sensitive`: N (the N most sensitive groups, measured with qwenquant.sensitivity on the first
    `sensitivity_samples` calibration windows), "auto" (the fewest, at most `max_keep`, meeting
    eval.max_ppl_increase_pct), or null. `keep`: the resolved full Linear names; when set nothing is measured.
    """

    keep_sensitive: int | str | None = None
    keep: list[str] | None = None
    max_keep: int = 8
    sensitivity_samples: int = 8

    def __post_init__(self) -> None:
        ks = self.keep_sensitive
        if ks is not None and ks != "auto" and (not isinstance(ks, int) or isinstance(ks, bool) or ks < 0):
            raise ValueError(f"mixed_precision.keep_sensitive: {ks!r} is not allowed; use a count >= 0, auto or null")
        if self.keep is not None:
            if not isinstance(self.keep, list) or not all(isinstance(n, str) and n for n in self.keep):
                raise ValueError("mixed_precision.keep: must be a list of module names")
            if len(set(self.keep)) != len(self.keep):
                raise ValueError("mixed_precision.keep: lists a module twice")
        if ks is None and self.keep is None:
            raise ValueError("mixed_precision: set keep_sensitive (N or auto) or keep (module names)")
        _positive("mixed_precision.max_keep", self.max_keep)
        _positive("mixed_precision.sensitivity_samples", self.sensitivity_samples)


COMPENSATE_TARGETS = ("layer", "float")


@dataclass
class CompensateStage:
    """Error-compensation fine-tuning after the quantizer (qwenquant/compensation.py): per decoder layer, tune the
    weight scales, INT rounding offsets (`rounding`) and norm weights (`norms`; `qk_norms` adds q_norm/k_norm)
    with `steps` signed-gradient steps of size `lr` (decaying linearly) so the quantized layer's output matches the
    unquantized one on the first `samples` calibration samples, `batch_size` samples per step."""

    steps: int = 40  # defaults sized for about a minute on qwen3-mini (6 layers) on 2 CPU cores
    lr: float = 0.005  # rounding offsets, in grid steps; scales and norms move RELATIVE_LR_RATIO of it (relative)
    samples: int = 16
    batch_size: int = 1
    rounding: bool = True
    norms: bool = True
    qk_norms: bool = False
    # what the quantized layer is fitted to: "float" = the unquantized model's own layer output (the float path's
    # inputs, so the fit also absorbs error accumulated in earlier layers); "layer" = the unquantized layer applied
    # to the quantized path's inputs (this layer's own quantization error only)
    target: str = "float"

    def __post_init__(self) -> None:
        if self.target not in COMPENSATE_TARGETS:
            raise ValueError(f"compensate.target: must be one of {', '.join(COMPENSATE_TARGETS)}, got {self.target!r}")
        _positive("compensate.steps", self.steps)
        _positive("compensate.samples", self.samples)
        _positive("compensate.batch_size", self.batch_size)
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not 0.0 < self.lr <= 1.0:
            raise ValueError(f"compensate.lr: must be a number in (0, 1], got {self.lr!r}")
        for key in ("rounding", "norms", "qk_norms"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"compensate.{key}: must be true or false")


STAGE_TYPES: dict[str, type] = {
    "smooth": SmoothStage,
    "fp8": FP8Stage,
    "rtn": RTNStage,
    "gptq": GPTQStage,
    "awq": AWQStage,
    "mixed_precision": MixedPrecisionStage,
    "compensate": CompensateStage,
}
QUANTIZER_STAGES = ("fp8", "rtn", "gptq", "awq")
EXPORT_FORMATS = ("compressed-tensors", "hf-fp8", "gptq", "awq")


@dataclass
class ExportConfig:
    format: str = "compressed-tensors"
    max_shard_size_mb: int = 4096

    def __post_init__(self) -> None:
        _choice("export.format", self.format, EXPORT_FORMATS)
        _positive("export.max_shard_size_mb", self.max_shard_size_mb)


@dataclass
class EvalConfig:
    perplexity: bool = True
    eval_text: str = "wikitext2"  # wikitext2 | path to .txt/.raw
    window: int = 2048  # tokens per non-overlapping window (capped at the model's max positions)
    max_windows: int | None = None  # None = the whole text
    kl_tokens: int = 4096  # tokens on which KL(source || quantized) and verification are measured
    verify: bool = True
    # Reloaded checkpoint vs source, mean per-token KL in nats: catches broken checkpoints (they score several
    # nats); quality itself is gated by max_ppl_increase_pct. 3-bit INT on a small model reaches ~0.06.
    verify_max_kl: float = 0.5
    max_ppl_increase_pct: float | None = None  # quality gate: fail (exit 3) above this perplexity increase
    tasks: list = field(default_factory=list)  # zero-shot tasks (qwenquant eval names), source vs quantized
    task_limit: int | None = None  # documents per task (quick CI runs)
    min_task_recovery_pct: float | None = None  # quality gate: every task keeps >= this % of the source accuracy

    def __post_init__(self) -> None:
        _positive("eval.window", self.window)
        _positive("eval.kl_tokens", self.kl_tokens)
        if self.max_windows is not None:
            _positive("eval.max_windows", self.max_windows)
        if self.min_task_recovery_pct is not None and not self.tasks:
            raise ValueError("eval.min_task_recovery_pct: needs eval.tasks (--tasks)")
        if self.task_limit is not None:
            _positive("eval.task_limit", self.task_limit)
        if not isinstance(self.tasks, list) or not all(isinstance(t, str) and t for t in self.tasks):
            raise ValueError("eval.tasks: must be a list of task names")
        if self.max_ppl_increase_pct is not None and not self.perplexity:
            raise ValueError("eval.max_ppl_increase_pct: needs perplexity evaluation (remove --no-ppl)")
        if self.verify_max_kl <= 0:
            raise ValueError(f"eval.verify_max_kl: must be > 0, got {self.verify_max_kl}")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    stages: list = field(default_factory=list)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise ValueError(f"version: recipe version {self.version} is not supported; this qwenquant reads {RECIPE_VERSION}")
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise ValueError(f"device: {self.device!r} is not allowed; use auto, cpu, cuda or cuda:N")
        names = [stage_name(s) for s in self.stages]
        quantizers = [n for n in names if n in QUANTIZER_STAGES]
        if len(quantizers) != 1:
            raise ValueError(f"stages: need exactly one quantizer stage ({', '.join(QUANTIZER_STAGES)}), got {quantizers or 'none'}")
        if "smooth" in names and names.index("smooth") > names.index(quantizers[0]):
            raise ValueError("stages: smooth must come before the quantizer")
        if "compensate" in names and (names.index("compensate") < names.index(quantizers[0]) or names.count("compensate") > 1):
            raise ValueError("stages: compensate must come after the quantizer, once")
        smooth = self.stage("smooth")
        if smooth is not None and smooth.alpha_search and quantizers[0] != "fp8":
            raise ValueError("stages: smooth.alpha_search measures FP8 quantization error; it needs the fp8 quantizer")
        if "mixed_precision" in names:
            if names.index("mixed_precision") != 0 or names.count("mixed_precision") > 1:
                raise ValueError("stages: mixed_precision must be the first stage, once")
            if self.stage("mixed_precision").keep_sensitive == "auto" and self.eval.max_ppl_increase_pct is None:
                raise ValueError("stages: mixed_precision keep_sensitive auto needs eval.max_ppl_increase_pct "
                                 "(--max-ppl-increase)")
        q = quantizers[0]
        fmt = self.export.format
        if q == "fp8" and fmt not in ("compressed-tensors", "hf-fp8"):
            raise ValueError(f"export.format: {fmt} stores INT weights; FP8 exports to compressed-tensors or hf-fp8")
        if q != "fp8" and fmt == "hf-fp8":
            raise ValueError("export.format: hf-fp8 stores FP8 weights; INT runs export to compressed-tensors, gptq or awq")
        if q in ("rtn", "gptq", "awq"):
            self._check_int_format(self.stage(q), fmt)
        if fmt == "hf-fp8":
            fp8 = self.stage("fp8")
            if fp8.weights != "block" or fp8.activations != "dynamic":
                raise ValueError("export.format: hf-fp8 (Qwen's layout) needs fp8.weights: block and fp8.activations: dynamic")

    @staticmethod
    def _check_int_format(stage, fmt: str) -> None:
        """Refuse layouts a format cannot store (see docs/formats.md)."""
        actorder = getattr(stage, "actorder", "none")
        if fmt == "compressed-tensors" and actorder == "group":
            raise ValueError("export.format: compressed-tensors (>= 0.13) cannot store act-order 'group' (g_idx); "
                             "use actorder static or format gptq")
        if fmt == "awq":
            if actorder == "group":
                raise ValueError("export.format: awq cannot store act-order 'group'; use actorder static/none or format gptq")
            if stage.bits != 4:
                raise ValueError(f"export.format: awq stores 4-bit weights only, got bits {stage.bits}; "
                                 "use bits 4 or format compressed-tensors")
        if fmt == "gptq" and stage.bits not in (2, 4, 8):
            raise ValueError(f"export.format: gptq packs 2, 4 or 8 bits, got bits {stage.bits}; use compressed-tensors")

    def stage(self, name: str):
        return next((s for s in self.stages if stage_name(s) == name), None)

    @property
    def quantizer(self) -> str:
        return next(stage_name(s) for s in self.stages if stage_name(s) in QUANTIZER_STAGES)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "model": dataclasses.asdict(self.model),
            "calibration": dataclasses.asdict(self.calibration),
            "stages": [{stage_name(s): dataclasses.asdict(s)} for s in self.stages],
            "export": dataclasses.asdict(self.export),
            "eval": dataclasses.asdict(self.eval),
            "device": self.device,
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def stage_name(stage) -> str:
    for name, cls in STAGE_TYPES.items():
        if type(stage) is cls:
            return name
    raise TypeError(f"not a stage: {stage!r}")


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
    top = {"version", "model", "calibration", "stages", "export", "eval", "device"}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(top))}")
    stages = []
    for i, entry in enumerate(data.get("stages") or []):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"stages[{i}]: each stage is a one-key mapping like '- fp8: {{...}}'")
        (name, body), = entry.items()
        if name not in STAGE_TYPES:
            raise ValueError(f"stages[{i}].{name}: unknown stage; allowed: {', '.join(STAGE_TYPES)}")
        try:
            stages.append(_build(STAGE_TYPES[name], body, f"stages[{i}].{name}"))
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
    )


def _line_of(node: yaml.Node, path: str) -> int | None:
    """1-based line of a dotted key path like `stages[1].fp8.weights` in a composed YAML tree."""
    import re

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
