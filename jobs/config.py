"""One config loader for every job.

Configs are frozen, keyword-only dataclasses that live next to the code they configure and validate
themselves in ``__post_init__``. This module turns a YAML file plus ``a.b=c`` overrides into such a
dataclass (nested dataclasses included), rejects unknown keys with the path of the offending key, and
writes the resolved config into a run directory so a run can be reproduced.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

import fsspec
import yaml

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
    data = {**apply_overrides(data, overrides), **fields}
    return from_dict(cls, data, where=url or cls.__name__)


def save_config(
    cfg: Any, run_dir_url: str, name: str = "config.yaml", storage_options: dict[str, Any] | None = None
) -> str:
    """Write the resolved config into the run directory and return its URL.

    ``storage_options`` reach fsspec (e.g. an S3 endpoint from ``pipeline.storage.storage_options``)."""
    url = run_dir_url.rstrip("/") + "/" + name
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    return url
