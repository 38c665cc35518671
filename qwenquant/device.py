"""The torch device a `--device` flag (or a recipe's `device`) names: auto | cpu | cuda | cuda:N."""

from __future__ import annotations

import torch

from qwenquant.errors import BadInputError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU; a CUDA spec must name a device this machine
    has. Anything else is a one-line BadInputError naming `--device` and what to pass instead."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not spec.startswith("cuda"):
        raise BadInputError(f"--device {spec}: not a device; use {DEVICE_CHOICES}")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise BadInputError(f"--device {spec}: not a device; use {DEVICE_CHOICES}") from None
    if dev.type != "cuda":
        raise BadInputError(f"--device {spec}: not a device; use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise BadInputError(f"--device {spec}: CUDA is not available here; use --device cpu or auto")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise BadInputError(f"--device {spec}: only {count} CUDA device(s) here; use cuda:0 to cuda:{count - 1}")
    return dev
