"""Command-line flags declared once, each bound to the field of the settings dataclass it sets.

A `Flag` names that field; its default is read from the field (typed only beside the dataclass, through `to_flag`
where the flag spells it differently, e.g. `--no-ppl` for `perplexity`) and its help lives with the declaration.
A `Group` is flags of one dataclass: a recipe section (`ModelConfig` ...), a stage config, or `RunOptions`.
`with_groups(...)` attaches groups to a Typer command: it extends the signature Typer reads (so `--help` lists each
flag with its default) and hands the command a `Given`, the values by parameter and as settings per section.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

import typer

GIVEN = "given"  # the command parameter that receives the Given


class Default(Enum):
    """Flag defaults that are not values."""

    FROM_FIELD = "read from the field"
    REQUIRED = "the flag must be given"


FROM_FIELD, REQUIRED = Default.FROM_FIELD, Default.REQUIRED


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Flag:
    """One flag. `field`: the field of its group's dataclass it sets; None for a switch the command reads itself
    (its default is then typed here, once). `param` (default: the field's name) is the Python parameter Typer
    sees and, without `decls`, the flag's name (`--param-name`)."""

    field: str | None
    type: Any  # what Typer parses: int, Optional[str], an Enum for a fixed choice ...
    help: str
    decls: tuple[str, ...] = ()
    param: str = ""
    default: Any = FROM_FIELD
    to_field: Callable[[Any], Any] = _same  # flag value -> field value
    to_flag: Callable[[Any], Any] = _same  # field default -> flag default
    metavar: str | None = None
    lead: bool = False  # listed first in --help (--model, --out)

    def __post_init__(self) -> None:
        if not self.param:
            object.__setattr__(self, "param", self.field)
        if self.field is None and self.default is FROM_FIELD:
            raise TypeError(f"flag {self.param}: a switch (no field) needs its default")

    @property
    def choice(self) -> bool:
        return isinstance(self.type, type) and issubclass(self.type, Enum)

    def default_for(self, target: type | None) -> Any:
        """The flag's default: its own, or the field's default of `target` in the flag's spelling."""
        if self.default is not FROM_FIELD:
            return self.default
        value = self.to_flag(field_default(target, self.field))
        return self.type(value) if self.choice else value

    def field_value(self, value: Any) -> Any:
        """The field's value for a flag value (a choice's Enum member -> its string)."""
        return self.to_field(value.value if isinstance(value, Enum) else value)

    def annotation(self) -> Any:
        """`Annotated[type, typer.Option(...)]`, what Typer reads from a parameter."""
        return Annotated[self.type, typer.Option(*self.decls, help=self.help, metavar=self.metavar)]


INVERTED = {"to_field": operator.not_, "to_flag": operator.not_}  # Flag(...) options of a `--no-x` flag for field x


def field_default(target: type, name: str) -> Any:
    """The default of dataclass `target`'s field `name` (calling its default_factory)."""
    for f in dataclasses.fields(target):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise TypeError(f"{target.__name__}.{name} has no default; give the flag its own")
    raise TypeError(f"{target.__name__} has no field {name!r}")


@dataclass(frozen=True)
class Group:
    """Flags of one dataclass `target` (None: switches only). `section`: the recipe section or stage name their
    settings fill (None: not a recipe section); `switch`: the parameter that turns an optional stage on (given
    true or not None)."""

    target: type | None
    flags: tuple[Flag, ...]
    section: str | None = None
    switch: str | None = None

    def flag(self, param: str) -> Flag:
        return next(f for f in self.flags if f.param == param)

    def only(self, *params: str) -> Group:
        """The same group with just the flags of `params`."""
        return dataclasses.replace(self, flags=tuple(f for f in self.flags if f.param in params))

    def with_defaults(self, **defaults: Any) -> Group:
        """The same group with other defaults for some flags (by parameter), for a command whose own differ."""
        return dataclasses.replace(self, flags=tuple(
            dataclasses.replace(f, default=defaults[f.param]) if f.param in defaults else f for f in self.flags))

    def is_on(self, values: dict) -> bool:
        return self.switch is None or values[self.switch] not in (None, False)


class Given:
    """What a command was given for the flags of its groups."""

    def __init__(self, groups: Iterable[Group], values: dict[str, Any]):
        self.groups = tuple(groups)
        self.values = values

    def __getitem__(self, param: str) -> Any:
        return self.values[param]

    def settings(self, group: Group) -> dict[str, Any]:
        """Field -> value for the flags of `group` that set a field."""
        return {f.field: f.field_value(self.values[f.param]) for f in group.flags
                if f.field is not None and f.param in self.values}

    def sections(self) -> dict[str, dict[str, Any]]:
        """Recipe section or stage name -> its settings, for the groups with a section that are on."""
        out: dict[str, dict[str, Any]] = {}
        for group in self.groups:
            if group.section is not None and group.is_on(self.values):
                out.setdefault(group.section, {}).update(self.settings(group))
        return out


def _parameter(group: Group, flag: Flag) -> inspect.Parameter:
    default = flag.default_for(group.target)
    return inspect.Parameter(flag.param, inspect.Parameter.KEYWORD_ONLY, annotation=flag.annotation(),
                             default=inspect.Parameter.empty if default is REQUIRED else default)


def with_groups(*groups: Group):
    """Decorator: attach the flags of `groups` to a command function that takes `given: Given`: they take that
    parameter's place in the signature Typer reads (`lead` flags first), and their values come back in `given`."""

    def decorate(func: Callable) -> Callable:
        own = list(inspect.signature(func, eval_str=True).parameters.values())
        at = [p.name for p in own].index(GIVEN)
        flags = [(g, f) for g in groups for f in g.flags]
        attached = [_parameter(g, f) for g, f in flags]
        lead = [p for p, (_g, f) in zip(attached, flags) if f.lead]
        rest = [p for p, (_g, f) in zip(attached, flags) if not f.lead]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[:at]] + lead
        params += rest + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[at + 1:]]
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise TypeError(f"{func.__name__}: a flag parameter is declared twice: {sorted(names)}")
        flag_names = {f.param for _g, f in flags}

        def command(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in flag_names}
            return func(**kwargs, given=Given(groups, values))

        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(command, attr, getattr(func, attr))
        command.__signature__ = inspect.Signature(params)
        return command

    return decorate
