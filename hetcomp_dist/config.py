"""Typed configs: dataclasses loaded strictly from YAML, with ``--set a.b=value`` overrides.

Unknown keys and wrong types are errors naming the file and the key path, never silent
defaults. Each component owns a small dataclass; a run config composes them.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and key."""


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} for {cls.__name__} "
                          f"(allowed: {', '.join(fields)})")
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, f"{where}.{name}")
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)} for {cls.__name__}")
    return cls(**values)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, arg = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(arg, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        path, raw = item.split("=", 1)
        node = data
        keys = path.strip().split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {key} is not a mapping")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults when no file) plus overrides."""
    data: dict = {}
    where = "config"
    if path is not None:
        where = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from None
    data = apply_overrides(data, list(overrides))
    return from_dict(cls, data, where)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _plain(config: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))   # tuples -> lists, as stored


def differences(cls: type[T], stored: Any, current: T, ignore: tuple[str, ...] = ()) -> list[str] | None:
    """The fields (not in ``ignore``) where a stored config differs from ``current``.

    The one rule for "is this the same run": ``stored`` (a config as written to storage) is read
    with :func:`from_dict`, so a field added since it was written takes its default (a new option
    never invalidates finished work) and an unknown key or a wrong type makes it unreadable: None.
    """
    try:
        then = from_dict(cls, stored, "stored config")
    except ConfigError:
        return None
    a, b = _plain(then), _plain(current)
    return sorted(k for k in a if k not in ignore and a[k] != b.get(k))


def compatible(cls: type[T], stored: Any, current: T, ignore: tuple[str, ...] = ()) -> bool:
    """Whether ``stored`` equals ``current`` outside ``ignore`` (see :func:`differences`)."""
    return differences(cls, stored, current, ignore) == []
