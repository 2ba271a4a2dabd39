"""Typed configs: dataclasses loaded strictly from YAML, with ``--set a.b=value`` overrides.

Unknown keys, wrong types and out-of-range values are errors naming the file and the key path
(``configs/x.yaml: distill.max_epochs: must be >= 1, got -5``), never silent defaults. Each
component owns a small dataclass; a run config composes them. A dataclass with a
``validate(where)`` method is checked by :func:`from_dict` right after it is built (its fields
first, then the enclosing config's cross-section rules), so a bad setting is refused at load
time, before any work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from hetcomp_dist import storage

T = TypeVar("T")
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_METRIC = re.compile(r"(recall|ndcg)@([1-9][0-9]*)")


class ConfigError(ValueError):
    """A config file or override is invalid; the message (one line) names the file and key."""

    def __init__(self, message: str):
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message).strip()))  # the CLI prints one line


@dataclass(frozen=True)
class Where:
    """A place in a config: its source (a file, ``config``) and the key path inside it."""

    source: str
    path: str = ""

    def at(self, key: str | int) -> Where:
        if isinstance(key, int):
            return Where(self.source, f"{self.path}[{key}]")
        return Where(self.source, f"{self.path}.{key}" if self.path else str(key))

    def __str__(self) -> str:
        return f"{self.source}: {self.path}" if self.path else self.source

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self}: {message}")


def from_dict(cls: type[T], data: Any, where: str | Where = "config") -> T:
    """Build dataclass ``cls`` from a mapping, checking every key and type, then its ``validate``."""
    where = where if isinstance(where, Where) else Where(str(where))
    if not isinstance(data, dict):
        raise where.error(f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise where.error(f"unknown key(s) {', '.join(unknown)} for {cls.__name__} (allowed: {', '.join(fields)})")
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, where.at(name))
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise where.error(f"missing required key(s) {', '.join(missing)} for {cls.__name__}")
    built = cls(**values)
    validate = getattr(built, "validate", None)
    if callable(validate):
        validate(where)
    return built


def _convert(tp: Any, value: Any, where: Where) -> Any:
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
                errors.append(e)
        raise errors[0] if len(errors) == 1 else where.error(f"{value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise where.error(f"{value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise where.error(f"expected a list, got {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(arg, v, where.at(i)) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise where.error(f"expected a mapping, got {value!r}")
        _, arg = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(arg, v, where.at(str(k))) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise where.error(f"expected {tp.__name__}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- validation helpers

def check_ranges(obj: Any, where: Where, rules: Iterable[str]) -> None:
    """Check numeric fields against rules like ``"lr > 0"``; list fields item by item; None is skipped."""
    for rule in rules:
        name, op, bound = rule.split()
        value = getattr(obj, name)
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, v in items:
            at = where.at(name) if i is None else where.at(name).at(i)
            if v is None:
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise at.error(f"must be a finite number, got {v!r}")
            if not _OPS[op](v, float(bound)):
                raise at.error(f"must be {op} {bound}, got {v!r}")


def check_metric(where: Where, metric: str, ks: Iterable[int] | None = None) -> None:
    """``metric`` must be recall@K or ndcg@K (with K in ``ks`` when given)."""
    match = _METRIC.fullmatch(metric)
    ks = None if ks is None else list(ks)
    if not match or (ks is not None and int(match.group(2)) not in ks):
        cut = "K >= 1" if ks is None else f"K in ks {ks}"
        raise where.error(f"must be recall@K or ndcg@K with {cut}, got {metric!r}")


def check_name(name: Any, what: str | Where) -> str:
    """``name`` if it is safe as one path component, else a ConfigError naming ``what``."""
    if not isinstance(name, str) or not storage.is_component(name):
        raise ConfigError(f"{what}: {name!r} is not a valid name (one path component: no '/', '\\', "
                          "'..', control characters or surrounding spaces, not empty)")
    return name


def check_unique(where: Where, names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise where.error(f"must be unique, {', '.join(map(repr, repeated))} repeated")


def check_uri(where: Where, uri: str) -> None:
    """A location a run writes to: a supported scheme, no '..' or control characters."""
    parts = uri.replace("\\", "/").split("/")
    if not uri.strip() or ".." in parts or any(ord(c) < 32 for c in uri):
        raise where.error(f"{uri!r} is not a valid location (no '..' components or control characters, "
                          "not empty)")
    try:
        storage.filesystem(uri)
    except storage.StorageError as e:
        raise where.error(str(e)) from None


# ----------------------------------------------------------------------------- loading

def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: where in the text and what (PyYAML's own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{at}{problem}"


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise ConfigError(f"--set {item!r}: empty key in {path.strip()!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: invalid YAML value ({_yaml_problem(e)})") from None
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {key} is not a mapping")
        node[keys[-1]] = value
    return data


def _read_yaml(path: str | Path) -> dict:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML at {_yaml_problem(e)}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data or {}


def _read_config(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, tuple[Path, ...]]:
    """A config file with its ``extends`` resolved: (settings, the files read, the base last).

    ``extends: base.yaml`` (relative to the file) starts from the base's settings; this file's
    mappings merge into the base's key by key and its other values replace the base's, except a
    key written ``name+`` whose list is appended to the base's ``name`` (``teachers+: [...]`` adds
    teachers). So a variant states only how it differs and cannot drift from its base.
    """
    if path.resolve() in {p.resolve() for p in chain}:
        raise ConfigError(f"{path}: extends itself through {' -> '.join(map(str, chain + (path,)))}")
    data = _read_yaml(path)
    base_name = data.pop("extends", None)
    if base_name is None:
        return data, chain + (path,)
    if not isinstance(base_name, str) or not base_name.strip():
        raise ConfigError(f"{path}: extends: expected a config file name, got {base_name!r}")
    if not (path.parent / base_name).is_file():
        raise ConfigError(f"{path}: extends: {path.parent / base_name} is not a config file")
    base, files = _read_config(path.parent / base_name, chain + (path,))
    return _merge(base, data, path), files


def _merge(base: dict, over: dict, path: Path, at: str = "") -> dict:
    out = dict(base)
    for key, value in over.items():
        name = f"{at}{key}"
        if isinstance(key, str) and key.endswith("+"):
            key = key[:-1]
            if not isinstance(value, list) or not isinstance(out.get(key, []), list):
                raise ConfigError(f"{path}: {name}: appends a list to a list ({key} in the base is "
                                  f"{type(out.get(key)).__name__}, the value {type(value).__name__})")
            out[key] = list(out.get(key, [])) + value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, path, f"{name}.")
        else:
            out[key] = value
    return out


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults when no file) plus overrides, validated.

    The file may ``extends`` another (see :func:`_read_config`); errors then name every file read.
    """
    data, files = _read_config(Path(path)) if path is not None else ({}, ())
    data = apply_overrides(data, list(overrides))
    source = " extending ".join(map(str, files)) if files else "config"
    return from_dict(cls, data, Where(source))


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _plain(config: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))   # tuples -> lists, as stored


def differences(cls: type[T], stored: Any, current: T, ignore: tuple[str, ...] = ()) -> list[str] | None:
    """The fields (not in ``ignore``) where a stored config differs from ``current``.

    The one rule for "is this the same run": ``stored`` (a config as written to storage) is read
    with :func:`from_dict`, so a field added since it was written takes its default (a new option
    never invalidates finished work) and an unknown key, a wrong type or a value out of range makes
    it unreadable: None. Keys a class renamed (its ``RENAMED`` mapping, old -> new) are read under
    their new names, so work stored before a rename still counts.
    """
    renamed = getattr(cls, "RENAMED", {})
    if isinstance(stored, dict) and renamed:
        stored = {renamed.get(k, k): v for k, v in stored.items()}
    try:
        then = from_dict(cls, stored, "stored config")
    except ConfigError:
        return None
    a, b = _plain(then), _plain(current)
    return sorted(k for k in a if k not in ignore and a[k] != b.get(k))


def compatible(cls: type[T], stored: Any, current: T, ignore: tuple[str, ...] = ()) -> bool:
    """Whether ``stored`` equals ``current`` outside ``ignore`` (see :func:`differences`)."""
    return differences(cls, stored, current, ignore) == []
