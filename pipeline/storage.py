"""Object-storage helpers: every path is a ``str`` fsspec URL (``/abs``, ``file://``, ``s3://``, ``gs://``).

Why a module: writes must be atomic (a reader never sees half an object), transient errors must be retried,
and S3 endpoints/credentials come from config or the standard environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """How to reach object storage. Empty fields fall back to the standard environment variables."""

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    region: str | None = None
    retries: int = 5
    backoff_s: float = 0.2

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"storage.retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0:
            raise ValueError(f"storage.backoff_s must be >= 0, got {self.backoff_s}")


def storage_options(url: str, cfg: StorageConfig | None = None) -> dict[str, Any]:
    """fsspec ``storage_options`` for ``url``'s protocol."""
    cfg = cfg or StorageConfig()
    proto = protocol(url)
    if proto in ("s3", "s3a"):
        endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
        opts: dict[str, Any] = {}
        if endpoint:
            opts["endpoint_url"] = endpoint
        if cfg.key:
            opts["key"] = cfg.key
        if cfg.secret:
            opts["secret"] = cfg.secret
        if cfg.region:
            opts["client_kwargs"] = {"region_name": cfg.region}
        return opts
    return {}


def protocol(url: str) -> str:
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0]


def absolute(url: str) -> str:
    """Local paths made absolute (Ray workers run in another working directory); other URLs unchanged."""
    if protocol(url) != "file":
        return url
    return os.path.abspath(url.removeprefix("file://"))


def get_fs(url: str, cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path-without-protocol) for ``url``."""
    return fsspec.core.url_to_fs(url, **storage_options(url, cfg))


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: connection trouble, throttling, 5xx. Missing files / bad input are not."""
    if isinstance(
        exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError | ValueError
    ):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(
        s in text for s in ("timeout", "throttl", "slowdown", "503", "500", "connection", "temporar", "reset")
    )


def retry(fn: Callable[[], T], *, what: str, cfg: StorageConfig | None = None) -> T:
    """Call ``fn`` with exponential backoff on transient storage errors."""
    cfg = cfg or StorageConfig()
    for attempt in range(cfg.retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - filtered by is_transient
            if attempt >= cfg.retries or not is_transient(e):
                raise
            time.sleep(cfg.backoff_s * (2**attempt) * (1 + random.random()))
    raise AssertionError("unreachable")


def read_bytes(url: str, cfg: StorageConfig | None = None) -> bytes:
    fs, path = get_fs(url, cfg)
    return retry(lambda: fs.cat_file(path), what=f"read {url}", cfg=cfg)


def exists(url: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = get_fs(url, cfg)
    return retry(lambda: fs.exists(path), what=f"exists {url}", cfg=cfg)


def write_bytes_atomic(url: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    """Write ``data`` so that ``url`` either does not exist or holds all of it.

    Local: write ``.tmp-<uuid>`` beside it, fsync, rename. Object stores: a single PUT of the whole body
    (S3 makes an object visible only when its PUT/multipart upload completes).
    """
    fs, path = get_fs(url, cfg)
    if protocol(url) == "file":
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    retry(lambda: fs.pipe_file(path, data), what=f"write {url}", cfg=cfg)


def upload_file_atomic(local_path: str, url: str, cfg: StorageConfig | None = None) -> None:
    """Move/upload a finished local file to ``url`` atomically (rename locally; one upload remotely)."""
    fs, path = get_fs(url, cfg)
    if protocol(url) == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(local_path, path)
        return
    retry(lambda: fs.put_file(local_path, path), what=f"upload {url}", cfg=cfg)


def makedirs(url: str, cfg: StorageConfig | None = None) -> None:
    fs, path = get_fs(url, cfg)
    if protocol(url) == "file":
        fs.makedirs(path, exist_ok=True)
