"""Layer sensitivity of a model (glue): how much quantizing one unit ALONE changes the model's next-token
distribution, for every Linear, every vLLM fused group (q/k/v, o, gate/up, down of a layer) and every decoder block.

End to end: mean per-token KL(source || model with only that unit fake-quantized) over the given token windows.
Proxy: the relative output error of each Linear on the inputs it receives in the source model (qwenquant.quant.
sensitivity.output_error_terms), combined over a unit's Linears. Quantizers are the library's round-to-nearest
ones: FP8 E4M3 weights (qwenquant.quant.fp8, with FP8 input fake-quantization as the engine computes it) or INT RTN
(qwenquant.quant.intq). Weights are restored after each unit; nothing is left changed in the model.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qwenquant.model.qwen3 import ArchAdapter
from qwenquant.activations import activation_quantization
from qwenquant.stages.fp8 import FP8Stage
from qwenquant.state import ActivationSpec
from qwenquant.quant import fp8 as fp8q
from qwenquant.quant import intq
from qwenquant.quant.sensitivity import output_error_terms, rank_by_sensitivity, relative_error, spearman

LEVELS = ("linear", "group", "block")
SCHEMES = {  # CLI name -> UnitScheme fields
    "fp8": {"kind": "fp8"},
    "w8a16": {"kind": "int", "bits": 8},
    "w4a16": {"kind": "int", "bits": 4},
    "w3a16": {"kind": "int", "bits": 3},
}


@dataclass(frozen=True)
class UnitScheme:
    """How a unit is fake-quantized: FP8 (`granularity` channel|tensor|block, `activations` token|group|none) or
    INT round-to-nearest (`bits`, `group_size`, `symmetric`)."""

    kind: str = "fp8"
    granularity: str = "channel"
    block_size: int = 128
    activations: str = "token"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("fp8", "int"):
            raise ValueError(f"scheme.kind: {self.kind!r} is not allowed; use fp8 or int")
        if self.kind == "fp8":
            if self.granularity not in fp8q.WEIGHT_GRANULARITIES:
                raise ValueError(f"scheme.granularity: {self.granularity!r}; use one of {fp8q.WEIGHT_GRANULARITIES}")
            if self.activations not in ("token", "group", "none"):
                raise ValueError(f"scheme.activations: {self.activations!r}; use token, group or none")
        else:
            intq.check_bits(self.bits)
            if self.group_size != -1 and self.group_size < 1:
                raise ValueError(f"scheme.group_size: must be positive or -1, got {self.group_size}")

    @property
    def label(self) -> str:
        if self.kind == "fp8":
            acts = "" if self.activations == "none" else f", {self.activations} activations"
            return f"FP8 E4M3 ({self.granularity} weights{acts})"
        grid = "sym" if self.symmetric else "asym"
        group = "channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"INT{self.bits} RTN ({group}, {grid}, weight-only)"

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Dequantized weight in w's dtype, exactly what the exported checkpoint would compute with."""
        if self.kind == "fp8":
            return fp8q.quantize_fp8(w, self.granularity, self.block_size, scale_dtype=w.dtype).dequantize(w.dtype)
        return intq.quantize_rtn(w.float(), self.bits, self.group_size, self.symmetric, scale_dtype=w.dtype).dequantize(w.dtype)

    def activation_spec(self) -> ActivationSpec | None:
        if self.kind != "fp8" or self.activations == "none":
            return None
        return ActivationSpec(self.activations, group_size=self.block_size)


def scheme_from_name(name: str, group_size: int = 128) -> UnitScheme:
    if name not in SCHEMES:
        raise ValueError(f"--scheme: {name!r} is not allowed; use one of {', '.join(SCHEMES)}")
    fields = SCHEMES[name]
    return UnitScheme(**fields, group_size=group_size) if fields["kind"] == "int" else UnitScheme(**fields)


def scheme_for_stage(stage) -> UnitScheme:
    """The RTN-style scheme that stands in for a recipe quantizer stage: GPTQ/AWQ are ranked with RTN of the same
    grid, FP8 static activations with dynamic per-token ones (no calibrated scales exist before the run)."""
    if isinstance(stage, FP8Stage):
        acts = {"dynamic": "group" if stage.weights == "block" else "token", "static": "token", "none": "none"}
        return UnitScheme("fp8", stage.weights, stage.block_size, acts[stage.activations])
    return UnitScheme("int", bits=stage.bits, group_size=stage.group_size, symmetric=stage.symmetric)


@dataclass(frozen=True)
class Unit:
    """A set of Linears quantized together: `level` linear|group|block, `type` e.g. "q_proj", "q+k+v", "block"."""

    name: str
    level: str
    layer: int
    type: str
    linears: tuple[str, ...]


def group_label(group: tuple[str, ...]) -> str:
    """`("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")` -> "q+k+v"; `("mlp.down_proj",)` -> "down";
    members of different modules (every expert of an MoE layer) -> their common parent, "experts"."""
    parents = {n.rsplit(".", 1)[0] for n in group}
    if len(parents) > 1:
        common = [p for p in zip(*(n.split(".") for n in group)) if len(set(p)) == 1]
        return common[-1][0] if common else "+".join(sorted(parents))
    return "+".join(n.rsplit(".", 1)[-1].removesuffix("_proj") for n in group)


def fused_units(adapter: ArchAdapter) -> list[tuple[str, ...]]:
    """The layer's Linears partitioned into vLLM fused groups (singletons for unfused ones), in layer order."""
    out: list[tuple[str, ...]] = []
    for name in adapter.linears:
        group = adapter.fused_group_of(name)
        if group not in out:
            out.append(group)
    return out


def list_units(adapter: ArchAdapter, num_layers: int, levels: tuple[str, ...] = LEVELS, config=None) -> list[Unit]:
    """Every unit of the requested levels, names like `model.layers.3.mlp.down_proj`, `model.layers.3:gate+up`,
    `model.layers.3` (`config` tells MoE layers apart: their experts are one group, `model.layers.3:experts`)."""
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise ValueError(f"levels: {unknown[0]!r} is not allowed; use {', '.join(LEVELS)}")
    units = []
    for i, layer_adapter in enumerate(adapter.layers(config, num_layers)):
        prefix = f"{adapter.layers_path}.{i}"
        if "linear" in levels:
            units += [Unit(f"{prefix}.{n}", "linear", i, n.rsplit(".", 1)[-1], (f"{prefix}.{n}",))
                      for n in layer_adapter.linears]
        if "group" in levels:
            units += [Unit(f"{prefix}:{group_label(g)}", "group", i, group_label(g), tuple(f"{prefix}.{n}" for n in g))
                      for g in fused_units(layer_adapter)]
        if "block" in levels:
            units.append(Unit(prefix, "block", i, "block", tuple(f"{prefix}.{n}" for n in layer_adapter.linears)))
    return units


@contextmanager
def quantized_unit(model: nn.Module, unit: Unit, scheme: UnitScheme) -> Iterator[None]:
    """Inside the block, only `unit`'s Linears are fake-quantized (weights and, for FP8, inputs); always restored."""
    saved: dict[str, torch.Tensor] = {}
    spec = scheme.activation_spec()
    try:
        for name in unit.linears:
            lin = model.get_submodule(name)
            saved[name] = lin.weight.data
            lin.weight.data = scheme.fake_quantize(lin.weight.data)
        with activation_quantization(model, {n: spec for n in unit.linears} if spec else {}):
            yield
    finally:
        for name, w in saved.items():
            model.get_submodule(name).weight.data = w


@torch.no_grad()
def _source_pass(model: nn.Module, windows: torch.Tensor, device, linears: list[str], scheme: UnitScheme):
    """Source log-probs [rows, T, V] (float32, CPU), source mean NLL, and each Linear's proxy (err^2, ref^2) terms."""
    terms: dict[str, list[tuple[float, float]]] = {n: [] for n in linears}
    spec = scheme.activation_spec()
    handles = []

    def hook(module, args, name):
        x = args[0]
        x_hat = None
        if spec is not None:
            x_hat = fp8q.fake_quantize_activation(x, spec.mode, spec.input_scale, spec.group_size)
        w = module.weight.data
        terms[name].append(output_error_terms(x, w, scheme.fake_quantize(w), x_hat))

    try:
        for n in linears:
            handles.append(model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)))
        logps, nll, count = [], 0.0, 0
        for row in windows:
            logits = model(input_ids=row.unsqueeze(0).to(device), use_cache=False).logits[0].float()
            logp = F.log_softmax(logits, dim=-1)
            nll += float(-logp[:-1].gather(-1, row[1:].to(device).unsqueeze(-1)).sum())
            count += row.numel() - 1
            logps.append(logp.to("cpu"))  # float32: fp16 storage alone puts a ~1e-4 nats floor under flat distributions
    finally:
        for h in handles:
            h.remove()
    return torch.stack(logps), nll / count, terms


@torch.no_grad()
def _compare_pass(model: nn.Module, windows: torch.Tensor, device, src_logp: torch.Tensor) -> tuple[float, float]:
    """(mean per-token KL(source || model), mean NLL) over the windows, one window at a time."""
    kl_sum, nll, count = 0.0, 0.0, 0
    for i, row in enumerate(windows):
        logits = model(input_ids=row.unsqueeze(0).to(device), use_cache=False).logits[0].float()
        q_log = F.log_softmax(logits, dim=-1)
        p_log = src_logp[i].to(device).float()
        kl_sum += float((p_log.exp() * (p_log - q_log)).sum(-1).clamp(min=0).sum())
        nll += float(-q_log[:-1].gather(-1, row[1:].to(device).unsqueeze(-1)).sum())
        count += row.numel()
    return kl_sum / count, nll / (count - windows.shape[0])


@dataclass
class SensitivityResult:
    """Per unit: end-to-end mean KL, proxy, change in NLL on the windows. `rows` follow `units` order."""

    scheme: UnitScheme
    rows: list[dict]
    source_nll: float
    tokens: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def scores(self, level: str, key: str = "kl") -> dict[str, float]:
        return {r["unit"]: r[key] for r in self.rows if r["level"] == level}

    def ranking(self, level: str, key: str = "kl") -> list[str]:
        return rank_by_sensitivity(self.scores(level, key))

    def proxy_correlation(self, level: str) -> float:
        rows = [r for r in self.rows if r["level"] == level]
        return spearman([r["proxy"] for r in rows], [r["kl"] for r in rows])


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    adapter: ArchAdapter,
    windows: torch.Tensor,
    scheme: UnitScheme,
    device: torch.device,
    levels: tuple[str, ...] = LEVELS,
    on_unit: Callable[[int, int], None] | None = None,
) -> SensitivityResult:
    """Measure every unit of `levels` on token windows [rows, T]; the model must already be on `device`."""
    t0 = time.perf_counter()
    num_layers = len(model.get_submodule(adapter.layers_path))
    units = list_units(adapter, num_layers, levels, model.config)
    linears = [f"{adapter.layers_path}.{i}.{n}" for i, layer in enumerate(adapter.layers(model.config, num_layers))
               for n in layer.linears]
    src_logp, src_nll, terms = _source_pass(model, windows, device, linears, scheme)
    rows = []
    for j, unit in enumerate(units):
        with quantized_unit(model, unit, scheme):
            kl, nll = _compare_pass(model, windows, device, src_logp)
        proxy = relative_error([t for n in unit.linears for t in terms[n]])
        rows.append({"unit": unit.name, "level": unit.level, "layer": unit.layer, "type": unit.type,
                     "linears": list(unit.linears), "kl": kl, "proxy": proxy, "delta_nll": nll - src_nll})
        if on_unit:
            on_unit(j + 1, len(units))
    return SensitivityResult(scheme, rows, src_nll, int(windows.numel()), time.perf_counter() - t0)


def rank_groups(model: nn.Module, adapter: ArchAdapter, windows: torch.Tensor, scheme: UnitScheme,
                device: torch.device, on_unit: Callable[[int, int], None] | None = None) -> tuple[list[list[str]], SensitivityResult]:
    """Fused groups, most sensitive (end-to-end KL) first, each as its list of full Linear names."""
    result = measure_sensitivity(model, adapter, windows, scheme, device, ("group",), on_unit)
    by_unit = {r["unit"]: r["linears"] for r in result.rows}
    return [by_unit[u] for u in result.ranking("group")], result
