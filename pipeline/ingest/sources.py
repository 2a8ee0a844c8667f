"""List the raw videos of a shard job: which files, under which stable keys, with which labels and domain.

Why: the key is the identity of a sample for every later stage (index, curation, subsets), so it must be a
pure function of the source's path (not of listing order, time or content) and safe for WebDataset, which
splits a member name at its first dot. Labels come from a ``path,label`` list (CSV or Parquet, like the
UCF101/Kinetics split files) or from the parent folder name (UCF101 layout ``<class>/<video>``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp",
)  # fmt: skip
_LABEL_MODES = ("none", "folder", "list")
_DOMAIN_MODES = ("input", "prefix")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """What to list under ``--input`` and how to label it."""

    extensions: tuple[str, ...] = VIDEO_EXTENSIONS  # matched case-insensitively; content decides the codec
    labels: str = "none"  # "none" | "folder" (parent folder name) | "list" (label_list)
    label_list: str | None = None  # URL of a CSV/Parquet with columns path,label (path relative to --input)
    only_listed: bool = False  # with a label list: skip videos the list does not name
    domain: str | None = None  # fixed domain tag; None: derived as domain_from says
    domain_from: str = "input"  # "input": last component of --input; "prefix": first folder below it

    def __post_init__(self) -> None:
        if self.labels not in _LABEL_MODES:
            raise ValueError(f"source.labels must be one of {_LABEL_MODES}, got {self.labels!r}")
        if self.labels == "list" and not self.label_list:
            raise ValueError("source.labels='list' needs source.label_list (a CSV/Parquet URL)")
        if self.domain_from not in _DOMAIN_MODES:
            raise ValueError(f"source.domain_from must be one of {_DOMAIN_MODES}, got {self.domain_from!r}")
        bad = [e for e in self.extensions if not e.startswith(".")]
        if not self.extensions or bad:
            raise ValueError(
                f"source.extensions must be a non-empty list like ['.mp4'], got {self.extensions!r}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceItem:
    """One raw video. ``version`` (size/mtime or ETag) tells a cached transcode whether it is stale."""

    url: str
    rel: str
    key: str
    size: int
    version: str
    label: int = -1
    label_name: str = ""
    domain: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Listing:
    """Sorted by key. ``classes[i]`` names label ``i`` (empty when labels are integers or absent);
    ``missing`` holds label-list paths that match no listed video; ``skipped`` holds ``(url, reason)`` of
    entries that are not regular files (a FIFO would block its reader forever)."""

    items: tuple[SourceItem, ...]
    classes: tuple[str, ...]
    missing: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()


def make_key(rel: str) -> str:
    """Stable sample key of a path relative to the input root: readable safe chars + 8 hex of its SHA-1.

    ``"Jump/v_Jump_g01.avi"`` -> ``"Jump_v_Jump_g01_avi-<hash>"``. The hash keeps keys unique when two
    paths sanitise alike (``a/b.mp4`` vs ``a_b.mp4``); there are no dots (WebDataset splits on them)."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", rel).strip("_-")[:72] or "video"
    return f"{base}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def _url(input_url: str, path: str) -> str:
    proto = storage.protocol(input_url)
    if proto == "file" and "://" not in input_url:
        return path
    return f"{proto}://{path}"


def list_sources(
    input_url: str,
    cfg: SourceConfig,
    storage_cfg: storage.StorageConfig | None = None,
    *,
    exclude: str | None = None,
) -> Listing:
    """List video files under ``input_url`` (recursive, by extension), label them, sort by key.

    Hidden (``.x``) and private (``_x``) files and folders are skipped, and so is ``exclude`` (the job's
    output, when it lies inside the input)."""
    fs, root = storage.get_fs(input_url, storage_cfg)
    root = root.rstrip("/")
    if not storage.retry(lambda: fs.exists(root), cfg=storage_cfg):
        raise ValueError(f"--input {input_url!r} does not exist")
    found = storage.retry(lambda: fs.find(root, detail=True), cfg=storage_cfg)
    skip = storage.get_fs(exclude, storage_cfg)[1].rstrip("/") + "/" if exclude else None
    exts = tuple(e.lower() for e in cfg.extensions)
    entries, skipped = [], []
    for path, info in sorted(found.items()):
        rel = path[len(root) + 1 :] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]
        if skip and (path + "/").startswith(skip):
            continue
        if any(part[:1] in (".", "_") for part in rel.split("/")) or not rel.lower().endswith(exts):
            continue
        if info.get("type", "file") not in ("file", None):  # a FIFO, socket or device named like a video
            skipped.append((_url(input_url, path), f"not a regular file ({info.get('type')})"))
            continue
        version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        entries.append((rel, path, int(info.get("size") or 0), str(version).strip('"')))

    rows: dict[str, LabelRow] = {}
    missing: tuple[str, ...] = ()
    if cfg.labels == "list":
        assert cfg.label_list is not None
        known = {rel for rel, *_ in entries}
        listed = {_relative(p, root): row for p, row in read_label_list(cfg.label_list, storage_cfg).items()}
        rows = {r: row for r, row in listed.items() if r in known}
        missing = tuple(sorted(r for r in listed if r not in known))
        if cfg.only_listed:
            entries = [e for e in entries if e[0] in rows]
    elif cfg.labels == "folder":
        rows = {rel: LabelRow(label=rel.rsplit("/", 2)[-2]) for rel, *_ in entries if "/" in rel}

    classes = _classes(rows.values())
    index = {n: i for i, n in enumerate(classes)}
    input_name = root.rsplit("/", 1)[-1] or root
    items = []
    for rel, path, size, version in entries:
        row = rows.get(rel)
        if cfg.domain:
            domain = cfg.domain
        elif row is not None and row.domain:
            domain = row.domain
        elif cfg.domain_from == "prefix" and "/" in rel:
            domain = rel.split("/", 1)[0]
        else:
            domain = input_name
        if row is None:
            label, name = -1, ""
        elif isinstance(row.label, str):
            label, name = index[row.label], row.label
        else:
            label, name = row.label, row.name
        items.append(
            SourceItem(url=_url(input_url, path), rel=rel, key=make_key(rel), size=size, version=version,
                       label=label, label_name=name, domain=domain)
        )  # fmt: skip
    items.sort(key=lambda it: it.key)
    return Listing(items=tuple(items), classes=classes, missing=missing, skipped=tuple(skipped))


def _relative(path: str, root: str) -> str:
    """A label-list path relative to the input root (lists may hold relative paths or full URLs)."""
    path = path.split("://", 1)[-1] if "://" in path else path
    while path.startswith("./"):
        path = path[2:]
    return path[len(root) + 1 :] if path.startswith(root + "/") else path.lstrip("/")


@dataclasses.dataclass(frozen=True)
class LabelRow:
    """One label-list row: a class name (mapped to sorted-name indices) or an integer label with an
    optional name; an optional per-video domain tag."""

    label: str | int
    name: str = ""
    domain: str | None = None


def _classes(rows) -> tuple[str, ...]:
    """Class names by label index: sorted names for string labels; for integer labels the names the list
    gives (``class``/``label_name`` column), ``""`` where it gives none."""
    rows = list(rows)
    names = sorted({r.label for r in rows if isinstance(r.label, str)})
    if names:
        return tuple(names)
    ints = [r for r in rows if isinstance(r.label, int) and r.label >= 0]
    if not ints:
        return ()
    out = [""] * (max(r.label for r in ints) + 1)
    for r in ints:
        out[r.label] = out[r.label] or r.name
    return tuple(out)


def read_label_list(url: str, storage_cfg: storage.StorageConfig | None = None) -> dict[str, LabelRow]:
    """``path -> LabelRow`` from a CSV (with a header) or Parquet file with columns ``path`` and ``label``
    (names or integers) and optionally ``class``/``label_name`` (names of integer labels) and ``domain``."""
    try:
        raw = storage.read_bytes(url, storage_cfg)
    except FileNotFoundError as e:
        raise ValueError(f"source.label_list {url!r} does not exist") from e
    try:
        if url.lower().endswith(".parquet"):
            table = pq.read_table(pa.BufferReader(raw))
        else:
            table = pacsv.read_csv(io.BytesIO(raw))
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"source.label_list {url!r} is not a readable CSV/Parquet file: {e}") from e
    cols = set(table.column_names)
    if not {"path", "label"} <= cols:
        raise ValueError(f"source.label_list {url!r} needs columns 'path' and 'label', has {sorted(cols)}")
    paths, labels = table.column("path").to_pylist(), table.column("label").to_pylist()
    if any(p is None for p in paths) or any(lab is None for lab in labels):
        raise ValueError(f"source.label_list {url!r} has empty path or label cells")
    n = len(paths)
    name_col = next((c for c in ("class", "label_name") if c in cols), None)
    names = [str(x or "") for x in table.column(name_col).to_pylist()] if name_col else [""] * n
    domains = [x or None for x in table.column("domain").to_pylist()] if "domain" in cols else [None] * n
    is_int = pa.types.is_integer(table.schema.field("label").type)
    if is_int and any(lab < 0 for lab in labels):
        raise ValueError(f"source.label_list {url!r} has negative integer labels")
    return {
        str(p): LabelRow(label=int(lab) if is_int else str(lab), name=nm if is_int else str(lab), domain=d)
        for p, lab, nm, d in zip(paths, labels, names, domains, strict=True)
    }
