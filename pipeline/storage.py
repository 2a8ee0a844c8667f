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


SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_SECRET_FIELDS = frozenset(
    {"secret", "password", "token", "secret_key", "session_token", "aws_secret_access_key"}
)
REDACTED = "***"


def redact(obj: Any) -> Any:
    """A copy of a config/report tree (dicts, lists, scalars) with no secret in it: values of secret-named
    fields (``secret``, ``password``, ``token``, ...; ``key`` too inside a storage section, i.e. next to a
    ``secret`` or ``endpoint_url``), and any string holding the value of a secret environment variable
    (``AWS_SECRET_ACCESS_KEY``, session tokens), become ``***``. Everything vmae writes goes through it."""
    secrets = [v for k in SECRET_ENV if len(v := os.environ.get(k, "")) >= 4]

    def clean(x: Any, storage_section: bool = False) -> Any:
        if isinstance(x, dict):
            section = "secret" in x or "endpoint_url" in x
            return {k: (REDACTED if x[k] and (str(k).lower() in _SECRET_FIELDS or (section and k == "key"))
                        else clean(x[k], section)) for k in x}  # fmt: skip
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, str):
            for secret in secrets:
                x = x.replace(secret, REDACTED)
        return x

    return clean(obj)


CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
PUBLIC_ENV = ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")


def credentials_from_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The object-store settings of this process (credentials and the public endpoint/region) to hand to
    Ray workers as a Ray object — never through ``runtime_env``, whose ``env_vars`` Ray keeps in job
    metadata (``ray job list``) and writes into its session logs."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in (*CREDENTIAL_ENV, *PUBLIC_ENV) if env.get(k)}


def install_credentials(creds: dict[str, str] | None) -> None:
    """In a worker: make ``creds`` (from :func:`credentials_from_env`) this process's, for fsspec, s3fs,
    boto3 and pyarrow alike; variables the worker already has are kept (the cluster's own win)."""
    if not creds:
        return
    changed = False
    for k, v in creds.items():
        if not os.environ.get(k):
            os.environ[k] = v
            changed = True
    if changed:
        try:
            import s3fs  # local import: optional (only S3 URLs need it)

            s3fs.S3FileSystem.clear_instance_cache()
        except ImportError:
            pass


def check_bucket(url: str, cfg: StorageConfig | None = None) -> None:
    """For an object-store URL, ``ValueError`` if its bucket does not exist (vmae never creates buckets: a
    typo'd name would otherwise be created silently, in whatever region the client defaults to)."""
    if protocol(url) not in ("s3", "s3a", "gs", "gcs"):
        return
    fs, path = get_fs(url, cfg)
    bucket = path.split("/", 1)[0]
    try:
        ok = retry(lambda: fs.exists(bucket), cfg=cfg)
    except PermissionError as e:
        raise ValueError(f"bucket {bucket!r} of {url!r} is not accessible with these credentials: {e}") from e
    if not ok:
        raise ValueError(
            f"bucket {bucket!r} of {url!r} does not exist; create it first (vmae never creates buckets)"
        )


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
    try:  # local imports: each package is optional (installed with the S3 stack)
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


# errno values that say the machine or the store failed (full disk, quota, I/O error, read-only, permission,
# out of memory or file handles) — never a verdict on the data being processed
_ENVIRONMENT_ERRNO = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EIO", "EROFS", "EACCES", "EPERM", "ENOMEM", "EMFILE", "ENFILE")
    if hasattr(errno, name)
)


class EnvironmentFailure(RuntimeError):
    """The machine, the disk or the object store failed while processing an input: not a verdict on the
    input, so nothing about it is recorded; the job stops (or the caller retries later)."""


def is_environment_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps, via ``__cause__``/``__context__``) comes from the
    environment: a full disk or quota, an I/O or permission error, exhausted memory or file handles, or a
    transient storage/network failure (:func:`is_transient`). Decided from types and ``errno`` only."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, EnvironmentFailure | PermissionError | MemoryError):
            return True
        if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNO:
            return True
        if isinstance(e, OSError | ConnectionError | TimeoutError) and is_transient(e):
            return True
        stack += [e.__cause__, e.__context__]
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


def _named(url: str, fn: Callable[[], T], cfg: StorageConfig | None) -> T:
    """``retry(fn)``, with a denied access re-raised naming ``url`` (S3 says only "Forbidden")."""
    try:
        return retry(fn, cfg=cfg)
    except PermissionError as e:
        raise PermissionError(f"{url}: access denied ({' '.join(str(e).split())[:160]}); check the "
                              "credentials and the bucket policy") from e  # fmt: skip


def read_bytes(url: str, cfg: StorageConfig | None = None) -> bytes:
    fs, path = get_fs(url, cfg)
    return _named(url, lambda: fs.cat_file(path), cfg)


def exists(url: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = get_fs(url, cfg)
    return _named(url, lambda: fs.exists(path), cfg)


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
    """Create a local folder; object stores have no folders (and a bucket is never created)."""
    fs, path = get_fs(url, cfg)
    if protocol(url) == "file":
        fs.makedirs(path, exist_ok=True)
