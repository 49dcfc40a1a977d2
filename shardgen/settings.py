"""Settings dataclasses from plain data (JSON, YAML): the one loader that shardgen's and
liverseg's configs share, so that every file of settings is refused the same way."""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from .errors import ShardgenError

T = TypeVar("T")

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 40
_SHORT.maxlist = _SHORT.maxdict = 6


def shown(value: Any) -> str:
    """A value for a one-line message: repr, shortened (a hostile file may hold megabytes)."""
    return _SHORT.repr(value)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls``: what a CLI shows and uses, so
    that no default is typed twice."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    if field.default is dataclasses.MISSING:
        raise ValueError(f"{cls.__name__}.{name} has no default")
    return field.default


def from_dict(cls: type[T], data: Any, what: str, error: type[Exception] = ShardgenError,
              required: Collection[str] = (), source: str = "",
              check: Callable[[Mapping[str, Any]], str] | None = None) -> T:
    """``cls(**data)`` for a dataclass ``cls``, or ``error`` in one line (prefixed by
    ``source``, e.g. the file) when ``data`` is not a mapping, has a key that is not a
    field (the valid ones are listed), lacks one of ``required``, fails ``check`` (which
    returns a problem, or "" for none, before the constructor sees the values) or is
    refused by the constructor. ``what`` names the settings in messages: "model settings"."""
    prefix = f"{source}: " if source else ""
    if not isinstance(data, Mapping):
        raise error(f"{prefix}{what} must be a mapping, got {type(data).__name__}")
    names = field_names(cls)
    unknown = sorted(set(map(str, data)) - set(names))
    if unknown:
        raise error(f"{prefix}unknown {what} {shown(unknown)}; valid: {', '.join(names) or 'none'}")
    missing = [name for name in required if name not in data]
    if missing:
        raise error(f"{prefix}missing required {what} {missing}")
    problem = check(data) if check is not None else ""
    if problem:
        raise error(f"{prefix}{problem}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise error(f"{prefix}{what}: {exc}") from None
