"""Strict conversion of plain mappings (YAML, JSON, env) into frozen dataclasses.

Unknown keys and wrong types are refused with a :class:`ConfigurationError` whose subject is the
dotted path of the offending setting, so a misspelled key never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from stepguard.errors import ConfigurationError

T = TypeVar("T")

_NONE = type(None)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a dataclass, once per class (resolving string annotations
    is the costly part of building many small specs, e.g. template instances at DAG parse)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = get_type_hints(cls)
    return hints


def from_mapping(cls: type[T], data: object, where: str) -> T:
    """Build dataclass ``cls`` from ``data``; ``where`` names the location for errors."""
    if not isinstance(data, Mapping):
        raise ConfigurationError(
            f"expected a mapping, got {type(data).__name__}", subject=where or cls.__name__
        )
    fields = {f.name: f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if f.init}
    hints = _hints(cls)
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigurationError(
            "unknown setting",
            subject=_join(where, unknown[0]),
            details=[f"unknown: {_join(where, k)}" for k in unknown],
            hint=f"known settings here: {known}",
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = convert(hints[name], value, _join(where, name))
    missing = [
        n for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigurationError("missing required setting", subject=_join(where, missing[0]))
    try:
        return cls(**kwargs)
    except ConfigurationError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc), subject=where or cls.__name__) from exc


def convert(tp: Any, value: object, where: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise a ConfigurationError naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and _NONE in args:
            return None
        errors: list[ConfigurationError] = []
        for arg in args:
            if arg is _NONE:
                continue
            try:
                return convert(arg, value, where)
            except ConfigurationError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigurationError(
                f"must be one of {', '.join(map(repr, allowed))}, got {value!r}", subject=where
            )
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_mapping(tp, value, where)
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigurationError(
                f"expected a list, got {type(value).__name__}", subject=where
            )
        item_tp = args[0] if args else Any
        return tuple(convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict, typing.Mapping) or tp is dict:
        args = get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigurationError(
                f"expected a mapping, got {type(value).__name__}", subject=where
            )
        vt = args[1] if len(args) == 2 else Any
        return {str(k): convert(vt, v, _join(where, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        raise ConfigurationError(f"expected true/false, got {value!r}", subject=where)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigurationError(f"expected an integer, got {value!r}", subject=where)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigurationError(f"expected an integer, got {value!r}", subject=where)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigurationError(f"expected a number, got {value!r}", subject=where)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigurationError(f"expected a number, got {value!r}", subject=where)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigurationError(
            f"expected a string, got {type(value).__name__}", subject=where
        )
    raise ConfigurationError(f"unsupported setting type {tp!r}", subject=where)


def to_plain(obj: object) -> Any:
    """The inverse of :func:`from_mapping`: dataclasses to dicts, tuples to lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.repr and f.init
        }
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def load_yaml(path: Path, what: str) -> Any:
    """Parse a YAML (or JSON) file; unreadable or invalid files are one ConfigurationError
    naming the file (``what`` says what it is: "settings file", "step spec")."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} ({exc.strerror})",
                                 subject=str(path)) from exc
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{what} is not valid YAML", subject=str(path),
                                 details=[str(exc).splitlines()[0]]) from exc
