"""One config loader for every job.

Configs are frozen, keyword-only dataclasses that live next to the code they configure and validate
themselves in ``__post_init__``. This module turns a YAML file plus ``a.b=c`` overrides into such a
dataclass (nested dataclasses included), rejects unknown keys with the path of the offending key, and
writes the resolved config into a run directory so a run can be reproduced.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing
from typing import Any, TypeVar

import fsspec
import yaml

from pipeline import storage

T = TypeVar("T")


def _parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would (``1e-3`` -> float, ``[1,2]`` -> list, ``null``)."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b=c`` overrides to a nested dict (copy); the value is parsed as YAML."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        path, value = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ValueError(f"override {item!r} has an empty key")
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = _parse_scalar(value)
    return out


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` (dataclasses, tuples, optionals)."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where=where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, where)
        return value
    if origin in (tuple, list) and isinstance(value, list | tuple):
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            return tuple(
                _convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=False))
            )
        conv = [_convert(args[0], v, f"{where}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(conv) if origin is tuple else conv
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError as e:
            raise ValueError(f"{where}: {value!r} is not a number") from e
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is tuple and isinstance(value, list):
        return tuple(value)
    # scalars are checked here, so a bad value is named by its key (not a TypeError deep in validation)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: {value!r} is not an integer")
    if tp is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"{where}: {value!r} is not a number")
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: {value!r} is not true/false")
    if tp is str and not isinstance(value, str):
        raise ValueError(f"{where}: {value!r} is not a string")
    return value


def from_dict(cls: type[T], data: dict, *, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys (named by their dotted path)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from e


def to_dict(cfg: Any) -> dict:
    """Plain, YAML-safe dict of a (nested) config dataclass."""

    def clean(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return clean(dataclasses.asdict(cfg))


def load_yaml(url: str) -> dict:
    try:
        with fsspec.open(url, "r") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError as e:
        raise ValueError(f"config file {url!r} does not exist") from e
    except yaml.YAMLError as e:
        raise ValueError(f"config file {url!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {url!r} must hold a mapping at the top level")
    return data


def load_config(
    cls: type[T], url: str | None = None, overrides: list[str] | tuple[str, ...] = (), **fields: Any
) -> T:
    """Load YAML ``url`` (or the dataclass defaults when None), apply the user's ``a.b=c`` overrides, then set
    the top-level ``fields`` a caller computed (typed values, e.g. a ``SplitSection``), and validate."""
    data = load_yaml(url) if url else {}
    check_override_keys(cls, overrides)
    data = {**apply_overrides(data, overrides), **fields}
    return from_dict(cls, data, where=url or cls.__name__)


def check_override_keys(cls: type, overrides: list[str] | tuple[str, ...]) -> None:
    """Every ``a.b=c`` override names a field of ``cls`` (nested through dataclass fields; a dict-typed
    field such as ``model.overrides`` takes any key); else ``ValueError`` naming the override, not a YAML."""
    for item in overrides:
        path = item.split("=", 1)[0].strip()
        node: Any = cls
        keys = [k for k in path.split(".") if k]
        for i, k in enumerate(keys):
            if not _is_dataclass_type(node):
                break  # a dict or free-form field: its own validation names bad values
            fields = {f.name: f for f in dataclasses.fields(node) if f.init}
            if k not in fields:
                where = ".".join(keys[:i]) or node.__name__
                raise ValueError(f"override {item!r}: {where} has no key {k!r}; allowed: {sorted(fields)}")
            tp = typing.get_type_hints(node)[k]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            node = (
                args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp
            )


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, meaning)`` of every field of config class ``cls``, nested sections flattened to
    dotted keys; the meaning is the field's trailing ``# comment`` in the source (``vmae <cmd> --show-config``)."""
    notes: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):  # subclasses win
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        notes.update(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, flags=re.M))
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, str, str, str]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        key = prefix + f.name
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        inner = tp if _is_dataclass_type(tp) else None
        if inner is None and typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            inner = args[0] if len(args) == 1 and _is_dataclass_type(args[0]) else None
        if inner is not None:
            out += describe(inner, key + ".")
            continue
        shown = json.dumps(to_dict(default) if dataclasses.is_dataclass(default) else default, default=str)
        name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        out.append((key, name, shown, notes.get(f.name, "")))
    return out


def save_config(cfg: Any, run_dir_url: str, name: str = "config.yaml", storage_cfg: Any = None) -> str:
    """Write the resolved config, with every secret redacted (``pipeline.storage.redact``), into the run
    directory (atomically; on object stores no folder or bucket is created) and return its URL.
    ``storage_cfg`` (a ``pipeline.storage.StorageConfig``) says how to reach the store."""
    url = run_dir_url.rstrip("/") + "/" + name
    text = yaml.safe_dump(storage.redact(to_dict(cfg)), sort_keys=False)
    storage.write_bytes_atomic(url, text.encode(), storage_cfg)
    return url
