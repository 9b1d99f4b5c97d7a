"""Typed configs: frozen dataclasses filled from YAML, then `key=value` overrides.

The loader is strict on purpose: an unknown key or a value of the wrong type is a
`ValueError` that names the key, so a typo in a sweep never silently trains the default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow only lossless conversions."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{key}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {value!r}")
    raise ValueError(f"{key}: unsupported config type {tp}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build `cls` from a nested dict, rejecting unknown keys and wrong types.

    Raises:
        ValueError: naming the offending key.
    """
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; "
            f"valid keys under {prefix or 'the top level'}: {sorted(types_)}"
        )
    kwargs = {k: coerce(v, types_[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ validation
        raise ValueError(f"{prefix}{e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def _parse_scalar(raw: str, tp: Any) -> Any:
    """Parse an override string by the *target* type, so `name=123` stays a string."""
    if tp is str or (typing.get_origin(tp) is typing.Literal and all(isinstance(c, str) for c in typing.get_args(tp))):
        return raw
    return yaml.safe_load(raw)


def resolve_key(cls: type, dotted: str) -> tuple[Any, list[str]]:
    """Return the annotation of `dotted` inside `cls` and its path."""
    path = dotted.split(".")
    tp: Any = cls
    for i, part in enumerate(path):
        if not _is_dataclass_type(tp):
            raise ValueError(f"override {dotted!r}: {'.'.join(path[:i])} is not a section")
        types_ = _field_types(tp)
        if part not in types_:
            raise ValueError(
                f"override {dotted!r}: unknown key {part!r}; valid keys here: {sorted(types_)}"
            )
        tp = types_[part]
    return tp, path


def apply_overrides(data: dict[str, Any], cls: type, overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to a nested dict.

    A section that has a `name` field accepts a bare string as shorthand for its name,
    so `teacher=smollm2` means `teacher.name=smollm2`.
    """
    data = {**data}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        tp, path = resolve_key(cls, key)
        if _is_dataclass_type(tp):
            if "name" not in _field_types(tp):
                raise ValueError(f"override {key!r}: {key} is a section; set one of its keys, e.g. {key}.<key>=...")
            tp, path = _field_types(tp)["name"], path + ["name"]
        node = data
        for part in path[:-1]:
            child = node.get(part) or {}
            node[part] = child = {**child}
            node = child
        node[path[-1]] = _parse_scalar(raw, tp)
    return data


def load_config(cls: type[T], yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults ← YAML file ← `key=value` overrides, validated into `cls`.

    Raises:
        ValueError: unknown key, wrong type, or a file that is not a YAML mapping.
        FileNotFoundError: `yaml_path` does not exist.
    """
    data: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a YAML mapping, not {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, cls, overrides or [])
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
