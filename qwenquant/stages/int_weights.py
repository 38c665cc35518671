"""Config fields the INT weight-only quantizer stages share (RTN, GPTQ, AWQ), and their clip-ratio search results."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from qwenquant.quant import intq
from qwenquant.validation import boolean, choice, ratio_map

INT_BITS = (2, 3, 4, 8)
GROUP_SIZES = (-1, 32, 64, 128)  # -1 = per output channel


def check_int_fields(name: str, cfg) -> None:
    """bits, group_size and symmetric of an INT stage config, errors naming `<stage>.<key>`."""
    choice(f"{name}.bits", cfg.bits, INT_BITS)
    choice(f"{name}.group_size", cfg.group_size, GROUP_SIZES)
    boolean(f"{name}.symmetric", cfg.symmetric)


def check_clip_fields(name: str, cfg) -> None:
    """Fixed per-Linear clip ratios (`clip`: full Linear name -> ratio; absent = 1.0) or `clip_search`, not both."""
    ratio_map(f"{name}.clip", cfg.clip, str, 0.0, exclusive_low=True)
    if cfg.clip_search and cfg.clip:
        raise ValueError(f"{name}.clip: set either clip_search or per-Linear clip ratios, not both")


def check_group_size(cfg, name: str, n: int, k: int) -> str | None:
    """A stage's `check_linear`: the group size must divide the Linear's input features."""
    if cfg.group_size != -1 and k % cfg.group_size:
        return (f"{name} has {k} input features, not divisible by --group-size {cfg.group_size}; "
                "use a divisor of it or -1 (per channel)")
    return None


def clip_key(name: str) -> str:
    """The `QuantState.searched` key of a stage's searched clip ratios."""
    return f"{name}.clip"


def resolve_clip(name: str):
    """A stage's `resolve`: the searched clip ratios written in, the search turned off."""

    def resolve(cfg, searched: dict):
        clip = searched.get(clip_key(name))
        if cfg.clip_search and clip is not None:
            return dataclasses.replace(cfg, clip_search=False, clip=dict(clip))
        return cfg

    return resolve


@dataclass
class ClippedIntStage:
    """INT quantizers whose weight range can be clipped per Linear: fixed ratios (`clip`, full Linear name -> ratio;
    absent = 1.0) or chosen by each Linear's output error on calibration inputs (`clip_search`, scale search)."""

    bits: int = 4
    group_size: int = 128  # -1 = per output channel
    symmetric: bool = True
    clip: dict = field(default_factory=dict)
    clip_search: bool = False

    name = "int"

    def __post_init__(self) -> None:
        check_int_fields(self.name, self)
        check_clip_fields(self.name, self)


# -- the estimator's cost model shared by the INT quantizers (StageSpec cost fields; qwenquant/estimate/) ----------


def int_record_bytes(cfg, n: int, k: int, dtype_bytes: int) -> int:
    """An INT record: int32 codes, and per group a scale in the model dtype and an int32 zero point."""
    groups = k // (k if cfg.group_size == -1 else cfg.group_size)
    return 4 * n * k + (dtype_bytes + 4) * n * groups


def int_label(cfg) -> str:
    return f"w{cfg.bits} g{cfg.group_size} {'sym' if cfg.symmetric else 'asym'}"


def int_tag(default_symmetric: bool):
    """The `tag` of an INT quantizer whose command defaults to group 128 and `default_symmetric`: the group size
    (`G64`, `CH` per channel), `SYM`/`ASYM` off that default, `SEARCH` with clip search."""
    def tag(cfg) -> str:
        parts = [] if cfg.group_size == 128 else ["CH" if cfg.group_size == -1 else f"G{cfg.group_size}"]
        if cfg.symmetric != default_symmetric:
            parts.append("SYM" if cfg.symmetric else "ASYM")
        return "-".join(parts + (["SEARCH"] if getattr(cfg, "clip_search", False) else []))
    return tag


def int_serving_scheme(cfg) -> str:
    return f"w{cfg.bits}a16"


def int_probe_quantize(cfg, w: torch.Tensor, dtype: torch.dtype):
    """Round-to-nearest with the stage's grid, its dequantize and error: the per-weight work of an INT pass."""
    qw = intq.quantize_rtn(w.float(), cfg.bits, cfg.group_size, cfg.symmetric, scale_dtype=dtype)
    float((w.float() - qw.dequantize()).norm())
    return qw
