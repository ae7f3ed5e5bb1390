"""Typed option dataclasses: every config checks its own fields, wherever it is built.

Options reach a config from command lines, JSON files (saved runs, checkpoints), Python sweeps
(numpy scalars and arrays) and ``dataclasses.replace``; a config that checked its types only
on one of those paths would let ``num_slots=2.5`` or ``np.int64`` through the others. So the
check lives in the config itself: :class:`CheckedConfig`'s ``__post_init__`` coerces each field
to its declared type (any integer where a ``float`` is declared, a list or array where a tuple
is, numpy scalars to Python ones) and refuses the rest (a float or a bool where an ``int`` is
declared) before a subclass's own range checks run.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from typing import Any, Mapping

import numpy as np

from perception.errors import PerceptionError


class OptionTypeError(PerceptionError):
    """An option whose value is not of its declared type."""

    def __init__(self, owner: str, field: str, expected: str, value: Any) -> None:
        self.owner, self.field, self.expected, self.value = owner, field, expected, value
        super().__init__(f"{owner} option {field} must be {expected}, got {value!r}")

    def __reduce__(self) -> tuple[Any, ...]:  # raised in worker processes, re-raised in the parent
        return type(self), (self.owner, self.field, self.expected, self.value)

    def reworded(self, owner: str) -> "OptionTypeError":
        """The same error, naming the option's owner as the user knows it (``model 'vae'``)."""
        return OptionTypeError(owner, self.field, self.expected, self.value)


class CheckedConfig:
    """Base of every option dataclass (models, datasets, estimators, training runs).

    A subclass with its own ``__post_init__`` calls ``super().__post_init__()`` first, so that
    its range checks see values of the declared types.
    """

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.init:
                continue
            value = getattr(self, f.name)
            try:
                coerced = _coerce(value, hints[f.name])
            except (TypeError, OverflowError):
                raise OptionTypeError(type(self).__name__, f.name, _type_name(hints[f.name]), value) from None
            object.__setattr__(self, f.name, coerced)  # frozen configs too


def config_from_dict(config_cls: type, values: Mapping[str, Any] | None, what: str) -> Any:
    """``config_cls(**values)``, refusing unknown keys; errors name the owner as ``what``."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, CheckedConfig)):
        raise TypeError(f"{config_cls!r} is not a CheckedConfig dataclass")
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise PerceptionError(f"unknown {what} option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    try:
        return config_cls(**values)
    except OptionTypeError as error:
        raise error.reworded(what) from None


@functools.cache
def _hints(config_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (the scalar, optional, tuple and dict hints configs use), else TypeError."""
    if isinstance(value, np.generic):  # numpy scalars from sweeps: compare and store Python values
        value = value.item()
    if hint is Any:
        return value
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        for arg in args:
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
        raise TypeError(hint)
    if hint is type(None):
        if value is None:
            return None
        raise TypeError(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise TypeError(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(args) != len(value):
            raise TypeError(hint)
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise TypeError(hint)
        key_hint, value_hint = args or (Any, Any)
        return {_coerce(k, key_hint): _coerce(v, value_hint) for k, v in value.items()}
    if origin is typing.Literal:
        for arg in args:  # by type and value: 1.0 is not Literal[1], True is not Literal[1]
            if type(value) is type(arg) and value == arg:
                return arg
        raise TypeError(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(hint)
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise TypeError(hint)
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise TypeError(hint)
    if hint is str:
        if isinstance(value, str):
            return str(value)
        raise TypeError(hint)
    raise NotImplementedError(f"config fields of type {hint} are not supported by CheckedConfig")


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list, each item {_type_name(args[0])}"
    if origin is dict:
        return "a mapping of option names to values"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        return " or ".join(_type_name(a) for a in args)
    return f"of type {hint}"
