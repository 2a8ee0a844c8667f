"""Object-storage helpers: every path is a ``str`` fsspec URL (``/abs``, ``file://``, ``s3://``, ``gs://``).

Why a module: writes must be atomic (a reader never sees half an object), transient errors must be retried,
and S3 endpoints/credentials come from config or the standard environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``).
"""

from __future__ import annotations

import dataclasses
import errno
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


# errno values of failures that a later attempt may not see: busy/throttled (S3 SlowDown and 503 arrive as
# EBUSY through s3fs), remote I/O (500), and the socket-level ones
_TRANSIENT_ERRNO = frozenset(
    getattr(errno, name)
    for name in ("EBUSY", "EREMOTEIO", "EAGAIN", "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "ETIMEDOUT",
                 "EPIPE", "ENETDOWN", "ENETUNREACH", "EHOSTUNREACH")
    if hasattr(errno, name)
)  # fmt: skip


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types of the storage stack that mean "the connection failed", not "the request was wrong":
    botocore's connection/timeout family and its response parser (throttled responses can be malformed),
    aiohttp's client errors, fsspec's timeout — the ones s3fs itself retries."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
        from botocore.parsers import ResponseParserError

        types += [BotoConnectionError, HTTPClientError, ResponseParserError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError

        types += [ClientConnectionError, ClientPayloadError]
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(types)


_TRANSIENT_TYPES = _transient_types()
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)


def is_transient(exc: BaseException) -> bool:
    """Whether a later attempt may succeed, decided from exception types and ``errno`` (never from message
    text): connection trouble, timeouts, throttling and 5xx are; a missing object, a permission, bad input or
    a full disk are not. The ``__cause__`` chain is followed (s3fs and fsspec wrap the original error)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, _PERMANENT_TYPES):
            return False
        if isinstance(exc, _TRANSIENT_TYPES):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


def retry(fn: Callable[[], T], *, cfg: StorageConfig | None = None) -> T:
    """Call ``fn`` with exponential backoff (``cfg.backoff_s`` x 2^attempt, jittered) on transient storage
    errors (:func:`is_transient`), at most ``cfg.retries`` times; anything else is raised at once."""
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
    return retry(lambda: fs.cat_file(path), cfg=cfg)


def exists(url: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = get_fs(url, cfg)
    return retry(lambda: fs.exists(path), cfg=cfg)


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
    retry(lambda: fs.pipe_file(path, data), cfg=cfg)


def upload_file_atomic(local_path: str, url: str, cfg: StorageConfig | None = None) -> None:
    """Move/upload a finished local file to ``url`` atomically (rename locally; one upload remotely)."""
    fs, path = get_fs(url, cfg)
    if protocol(url) == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(local_path, path)
        return
    retry(lambda: fs.put_file(local_path, path), cfg=cfg)


def makedirs(url: str, cfg: StorageConfig | None = None) -> None:
    fs, path = get_fs(url, cfg)
    if protocol(url) == "file":
        fs.makedirs(path, exist_ok=True)
