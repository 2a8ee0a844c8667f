"""The shard-set and subset contracts shared by the shard job, the loader, curation and studies.

A shard set is a folder/prefix holding::

    {prefix}-{index:06d}.tar   WebDataset shards; each sample: {key}.mp4, {key}.json, {key}.cls (if labelled)
    index.parquet              one row per sample (schema: INDEX_SCHEMA)
    rejects.parquet            source, stage, error
    manifest.json              written LAST: the commit. A shard set without it is incomplete.

A subset is a Parquet file of keys selecting samples of an existing shard set (never a copy); its schema
metadata records the source manifest URL, the rule that made it and the hash of its inputs.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

FORMAT = "vmae-shards/1"
SUBSET_FORMAT = "vmae-subset/1"
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.parquet"
REJECTS_NAME = "rejects.parquet"

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),
    ("duration", pa.float64()), ("frames", pa.int32()), ("fps", pa.float64()), ("width", pa.int32()),
    ("height", pa.int32()), ("label", pa.int32()), ("domain", pa.string()), ("source", pa.string()),
    ("source_sha256", pa.string()), ("label_name", pa.string()), ("clip_index", pa.int32()),
    ("clip_start", pa.float64()),
])  # fmt: skip
"""``index.parquet``: the mp4 of sample ``key`` is bytes ``[offset, offset + size)`` of tar ``shard``; probe facts
of the clip (seconds, frames, fps, pixels), its label (-1: none) and class name, domain, source URL and hash,
and which clip of its source it is (``clip_index``, starting at ``clip_start`` seconds)."""
INDEX_COLUMNS = tuple(INDEX_SCHEMA.names)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardInfo:
    """One finished shard. ``name`` is relative to the manifest's folder."""

    name: str
    size: int
    sha256: str
    num_samples: int
    keys: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    shards: tuple[ShardInfo, ...]
    num_samples: int
    config: dict[str, Any]
    code_version: str
    created: str
    url: str = ""  # where it was read from (not serialised)
    format: str = FORMAT
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def root(self) -> str:
        return self.url.rsplit("/", 1)[0] if "/" in self.url else "."

    def shard_url(self, shard: ShardInfo | str) -> str:
        name = shard.name if isinstance(shard, ShardInfo) else shard
        check_shard_name(name, self.url)
        return storage.join(self.root, name)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("url")
        return json.dumps(d, indent=1, sort_keys=True)


@cache
def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        v = version("vmae")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+g{sha}" if sha else v


def check_shard_name(name: str, where: str = "manifest") -> None:
    """A shard name must resolve inside its shard set's folder: a plain relative path, no ``..``, no
    absolute path or URL (an edited manifest must not make a reader open ``../../etc/passwd``)."""
    parts = name.replace("\\", "/").split("/")
    if not name or "://" in name or name.startswith(("/", "~")) or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{where}: shard name {name!r} does not stay inside the shard set's folder")


def write_manifest(url: str, manifest: Manifest, cfg: storage.StorageConfig | None = None) -> None:
    storage.write_bytes_atomic(url, manifest.to_json().encode(), cfg)


def read_manifest(url: str, cfg: storage.StorageConfig | None = None) -> Manifest:
    """Read ``manifest.json`` (or a shard-set folder URL holding one)."""
    if not url.endswith(".json"):
        url = storage.join(url, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(url, cfg)
    except FileNotFoundError as e:
        raise ValueError(f"no manifest at {url!r}: the shard set is missing or incomplete") from e
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"manifest {url!r} is not valid JSON: {e}") from e
    if d.get("format") != FORMAT:
        raise ValueError(f"manifest {url!r} has format {d.get('format')!r}, expected {FORMAT!r}")
    try:
        shards = tuple(ShardInfo(**{**s, "keys": tuple(s.get("keys", ()))}) for s in d["shards"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"manifest {url!r} has a malformed shard entry: {e}") from e
    for s in shards:
        check_shard_name(s.name, f"manifest {url!r}")
    return Manifest(
        shards=shards,
        num_samples=int(d["num_samples"]),
        config=d.get("config", {}),
        code_version=d.get("code_version", ""),
        created=d.get("created", ""),
        stats=d.get("stats", {}),
        url=url,
    )


def write_table_atomic(url: str, table: pa.Table, cfg: storage.StorageConfig | None = None) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(url, sink.getvalue().to_pybytes(), cfg)


def read_table(url: str, cfg: storage.StorageConfig | None = None) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.read_bytes(url, cfg)))


def write_subset(
    url: str,
    keys: list[str],
    *,
    source_manifest: str,
    rule: dict[str, Any],
    inputs_hash: str,
    extra_columns: dict[str, list] | None = None,
    cfg: storage.StorageConfig | None = None,
) -> None:
    """Write a subset manifest: column ``key`` (+ extras), provenance in the schema metadata."""
    cols = {"key": pa.array(keys, pa.string())}
    for name, values in (extra_columns or {}).items():
        cols[name] = pa.array(values)
    meta = {
        "format": SUBSET_FORMAT,
        "source_manifest": source_manifest,
        "rule": json.dumps(rule, sort_keys=True),
        "inputs_hash": inputs_hash,
        "num_samples": str(len(keys)),
    }
    table = pa.table(cols).replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
    write_table_atomic(url, table, cfg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Subset:
    keys: tuple[str, ...]
    source_manifest: str
    rule: dict[str, Any]
    inputs_hash: str
    url: str = ""


def read_subset(url: str, cfg: storage.StorageConfig | None = None) -> Subset:
    try:
        table = read_table(url, cfg)
    except FileNotFoundError as e:
        raise ValueError(f"subset manifest {url!r} does not exist") from e
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("format") != SUBSET_FORMAT or "key" not in table.column_names:
        raise ValueError(f"{url!r} is not a vmae subset manifest (format {meta.get('format')!r})")
    return Subset(
        keys=tuple(table.column("key").to_pylist()),
        source_manifest=meta["source_manifest"],
        rule=json.loads(meta.get("rule", "{}")),
        inputs_hash=meta.get("inputs_hash", ""),
        url=url,
    )
