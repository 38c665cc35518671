"""Checks the config dataclasses run in `__post_init__`: each raises ValueError whose message starts with the key."""

from __future__ import annotations

from typing import Any


def choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not allowed; use one of {', '.join(map(str, allowed))}")


def positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be true or false")


def ratio_map(name: str, value: Any, key_type: type, low: float, exclusive_low: bool = False) -> None:
    """A mapping key -> number in [low, 1] ((low, 1] if exclusive_low), as written by the scale search."""
    if not isinstance(value, dict):
        raise ValueError(f"{name}: must be a mapping, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(k, key_type) or isinstance(k, bool):
            raise ValueError(f"{name}: key {k!r} must be a {key_type.__name__}")
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (low < v if exclusive_low else low <= v) and v <= 1
        if not ok:
            raise ValueError(f"{name}.{k}: must be a number in {'(' if exclusive_low else '['}{low:g}, 1], got {v!r}")


def percent(name: str, value: Any) -> float | None:
    """A percentage written as a number (1, 2.5) or as text with or without the sign ("1%", "2.5 %"), as a float;
    None stays None. Anything else is a ValueError naming the key."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip().removesuffix("%").strip()
        try:
            return float(text)
        except ValueError:
            pass
    raise ValueError(f"{name}: {value!r} is not a percentage; write a number like 1 or 1%")


ALL = "all"


def count_or_all(name: str, value: Any) -> int | None:
    """A positive count written as a number or digits ("4"), or "all" / None for no limit (returned as None).
    Anything else is a ValueError naming the key."""
    if value is None or (isinstance(value, str) and value.strip().lower() == ALL):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"{name}: {value!r} is neither a positive number nor {ALL}")


def count_text(value: int | None) -> str:
    """The inverse of `count_or_all` as a flag spells it (None -> "all")."""
    return ALL if value is None else str(value)
