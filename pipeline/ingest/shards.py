"""The two storage-facing stages of the shard job: prepare one sample (cached), write one shard (atomic).

Why a work cache: a shard job over a large bucket runs for hours and may be killed; each source's result
(its transcoded clips under ``_work/{clip_key}.mp4`` and a record ``_work/{key}.json`` written last, both
atomically) survives, so a rerun only does what is missing. Deterministic rejects (probe/transcode) are
cached too; storage failures are not, so a rerun retries them.

Why deterministic shards: samples are assigned to shards in key order by size/count alone, and tar headers
carry a fixed mtime/owner, so a rerun (or a resumed run) writes byte-identical shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from pipeline import storage
from pipeline.ingest.manifest import ShardInfo
from pipeline.ingest.probe import ProbeError, probe
from pipeline.ingest.sources import SourceItem
from pipeline.ingest.transcode import TranscodeConfig, TranscodeError, transcode_file

WORK_DIR = "_work"
_RETRY = {"cached": False, "retryable": True}  # a reject that is not cached: the next run tries again
_TAR_BLOCK = 512
_TAR_END = 2 * _TAR_BLOCK  # two zero blocks close an archive
_TAR_RECORD = tarfile.RECORDSIZE  # the archive is padded to a whole record (10240 bytes)


SHARD_ORDERS = ("shuffled", "key")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardConfig:
    """How samples are packed. A shard closes before it would exceed ``max_bytes`` or ``max_samples``.

    ``order``: ``shuffled`` writes samples in a seeded pseudo-random order (by a hash of ``seed`` and the key:
    deterministic, so reruns stay byte-identical), so every shard mixes classes and sources; ``key`` keeps
    them sorted by key. A bucket laid out by class folder sharded in key order gives class-pure shards, and
    a streaming loader's bounded shuffle buffer then yields class-pure batches."""

    prefix: str = "shard"
    max_bytes: int = 256 * 2**20
    max_samples: int = 0  # 0: no count limit
    mtime: int = 0  # tar member mtime (s): fixed -> identical bytes on rerun; int, as floats add PAX headers
    order: str = "shuffled"  # "shuffled" (seeded hash of the key) or "key"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "/.\\ "):
            raise ValueError(
                f"shards.prefix must be a plain name without '/', '.', spaces, got {self.prefix!r}"
            )
        if self.max_bytes < 1:
            raise ValueError(f"shards.max_bytes must be >= 1, got {self.max_bytes}")
        if self.max_samples < 0:
            raise ValueError(f"shards.max_samples must be >= 0 (0: unlimited), got {self.max_samples}")
        if not isinstance(self.mtime, int) or self.mtime < 0:
            raise ValueError(f"shards.mtime must be an integer >= 0 (seconds), got {self.mtime!r}")
        if self.order not in SHARD_ORDERS:
            raise ValueError(f"shards.order must be one of {SHARD_ORDERS}, got {self.order!r}")

    def sort_key(self, key: str) -> str | bytes:
        """Where sample ``key`` goes in the write order."""
        return key if self.order == "key" else hashlib.sha256(f"{self.seed}:{key}".encode()).digest()


def params_hash(cfg: TranscodeConfig) -> str:
    """Identity of the transcode settings: a cached clip made with other settings is stale."""
    return hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def clip_keys(key: str, n: int, cfg: TranscodeConfig) -> list[str]:
    """Sample keys of a source's clips: the source key itself, or ``{key}_c{NNN}`` when cutting clips."""
    return [key] if cfg.max_clip_s is None else [f"{key}_c{i:03d}" for i in range(n)]


def scratch_dir(url: str, cfg: storage.StorageConfig | None = None) -> str | None:
    """Where to build files bound for ``url``: beside it for local outputs (so the final rename never
    crosses filesystems), else the system temp dir (``None``)."""
    if storage.protocol(url) != "file":
        return None
    path = os.path.join(storage.get_fs(url, cfg)[1], ".tmp")
    os.makedirs(path, exist_ok=True)
    return path


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(item: SourceItem, tmp: str, cfg: storage.StorageConfig | None) -> tuple[str, str]:
    """(local path, sha256) of the source; remote sources are streamed to ``tmp`` (memory stays flat)."""
    if storage.protocol(item.url) == "file":
        path = storage.get_fs(item.url, cfg)[1]
        return path, _sha256_file(path)
    fs, path = storage.get_fs(item.url, cfg)
    local = os.path.join(tmp, "source")

    def download() -> str:
        h = hashlib.sha256()
        with fs.open(path, "rb") as src, open(local, "wb") as dst:
            for block in iter(lambda: src.read(1 << 22), b""):
                h.update(block)
                dst.write(block)
        return h.hexdigest()

    return local, storage.retry(download, cfg=cfg)


def prepare_sample(
    item: SourceItem, work_url: str, cfg: TranscodeConfig, storage_cfg: storage.StorageConfig | None = None
) -> dict[str, Any]:
    """Probe and transcode one source into ``work_url`` unless a valid cached record exists.

    Returns the record (JSON-safe): ``status`` "ok" with ``clips`` (key, frames, size, sha256, ...), or
    "rejected" with ``stage`` and a one-line ``error``; ``cached`` says whether it came from the cache.
    Only what is wrong with the input itself becomes a cached reject. Failing to read the source becomes a
    ``stage="read"`` reject marked ``retryable`` (not cached: the job does not commit while any remain). An
    environment failure while probing or transcoding (full disk, I/O, permission, memory — even when FFmpeg
    reports it as a decode error) raises :class:`pipeline.storage.EnvironmentFailure` and records nothing;
    so does failing to write the work cache."""
    record_url = storage.join(work_url, f"{item.key}.json")
    params = params_hash(cfg)
    try:
        cached = json.loads(storage.read_bytes(record_url, storage_cfg))
        if (cached.get("source"), cached.get("version"), cached.get("params")) == (
            item.url,
            item.version,
            params,
        ):
            return {**cached, "cached": True}
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    base = {
        "key": item.key,
        "source": item.url,
        "version": item.version,
        "params": params,
        "bytes_in": item.size,
    }
    with tempfile.TemporaryDirectory(prefix="vmae-shard-", dir=scratch_dir(work_url, storage_cfg)) as tmp:
        try:
            local, sha = _fetch(item, tmp, storage_cfg)
        except Exception as e:  # noqa: BLE001 - a failed read is this source's retryable reject ...
            if storage.is_environment_error(e) and not storage.is_transient(e):  # ... unless our disk failed
                raise storage.EnvironmentFailure(f"reading {item.url} failed: {_one_line(e)}") from e
            return {**base, "status": "rejected", "stage": "read", "error": _one_line(e), **_RETRY}
        base["source_sha256"] = sha
        stage = "probe"
        try:
            info = probe(local)
            stage = "transcode"
            clips = transcode_file(local, tmp, "clip", cfg, info)
        except Exception as e:  # noqa: BLE001 - sorted into a verdict on the video or the environment's fault
            if storage.is_environment_error(e):
                raise storage.EnvironmentFailure(f"{stage} of {item.url} failed: {_one_line(e)}") from e
            if not isinstance(e, ProbeError | TranscodeError):  # a decoder bug: recorded, retried next run
                return {**base, "status": "rejected", "stage": stage, "error": _one_line(e), "cached": False}
            record = {**base, "status": "rejected", "stage": stage, "error": _one_line(e)}
            storage.write_bytes_atomic(record_url, json.dumps(record, sort_keys=True).encode(), storage_cfg)
            return {**record, "cached": False}
        out = []
        for key, clip in zip(clip_keys(item.key, len(clips), cfg), clips, strict=True):
            meta = {k: v for k, v in dataclasses.asdict(clip).items() if k != "path"}
            out.append(
                {**meta, "key": key, "size": os.path.getsize(clip.path), "sha256": _sha256_file(clip.path)}
            )
            storage.upload_file_atomic(clip.path, storage.join(work_url, f"{key}.mp4"), storage_cfg)
    record = {**base, "status": "ok", "probe": info.to_dict(), "clips": out}
    storage.write_bytes_atomic(record_url, json.dumps(record, sort_keys=True).encode(), storage_cfg)
    return {**record, "cached": False}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, ValueError) else f"{type(e).__name__}: {text}"[:300]


def _member_bytes(size: int) -> int:
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardSample:
    """One sample to pack: the clip's bytes are read from ``mp4_url``; ``meta`` becomes ``{key}.json``."""

    key: str
    mp4_url: str
    mp4_size: int
    meta: dict[str, Any]
    label: int = -1

    def members(self) -> dict[str, bytes]:
        out = {"json": json.dumps(self.meta, sort_keys=True).encode()}
        if self.label >= 0:
            out["cls"] = str(self.label).encode()
        return out

    def tar_bytes(self) -> int:
        """Bytes this sample adds to a tar (headers + 512-byte padding)."""
        return _member_bytes(self.mp4_size) + sum(_member_bytes(len(v)) for v in self.members().values())


def tar_size(samples: Sequence[ShardSample]) -> int:
    """Exact size (bytes) of the tar ``write_shard`` makes of ``samples``: members + end blocks, padded
    to whole records."""
    return -(-(sum(s.tar_bytes() for s in samples) + _TAR_END) // _TAR_RECORD) * _TAR_RECORD


def plan_shards(samples: Sequence[ShardSample], cfg: ShardConfig) -> list[list[ShardSample]]:
    """Greedy, order-preserving assignment: a new shard starts when the next sample would push the current
    tar past ``max_bytes`` or ``max_samples``. A sample larger than ``max_bytes`` gets a shard of its own."""
    plan: list[list[ShardSample]] = []
    size = 0  # member bytes of the open shard
    for s in samples:
        n = s.tar_bytes()
        padded = -(-(size + n + _TAR_END) // _TAR_RECORD) * _TAR_RECORD
        if not plan or padded > cfg.max_bytes or 0 < cfg.max_samples <= len(plan[-1]):
            plan.append([])
            size = 0
        plan[-1].append(s)
        size += n
    return plan


def shard_name(cfg: ShardConfig, index: int) -> str:
    return f"{cfg.prefix}-{index:06d}.tar"


def plan_digest(samples: Sequence[ShardSample], cfg: ShardConfig) -> str:
    """Identity of a shard's content: equal digest -> identical tar bytes (the metadata holds the clip's
    sha256, so a changed clip changes the digest)."""
    blob = json.dumps([cfg.mtime, [(s.key, s.label, s.meta) for s in samples]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_shard(
    samples: Sequence[ShardSample],
    url: str,
    cfg: ShardConfig,
    storage_cfg: storage.StorageConfig | None = None,
    *,
    read: Callable[[str], bytes] | None = None,
) -> tuple[ShardInfo, dict[str, tuple[int, int]]]:
    """Write ``samples`` as one WebDataset tar at ``url``, atomically (local temp file, then rename/upload).

    Returns the ShardInfo (name relative to the shard folder) and ``key -> (offset, size)`` of each
    ``{key}.mp4`` member's data in the tar, so a reader can fetch one clip with a range request."""
    import webdataset as wds  # here, not at the top: it imports torch (~1 s), which transcode workers skip

    read = read or (lambda u: storage.read_bytes(u, storage_cfg))
    with tempfile.TemporaryDirectory(
        prefix="vmae-tar-", dir=scratch_dir(url.rsplit("/", 1)[0], storage_cfg)
    ) as tmp:
        local = os.path.join(tmp, "shard.tar")
        with (
            open(local, "wb") as f,
            wds.TarWriter(f, encoder=False, mtime=cfg.mtime, user="vmae", group="vmae") as tw,
        ):
            for s in samples:
                tw.write({"__key__": s.key, "mp4": read(s.mp4_url), **s.members()})
        spans = {}
        with tarfile.open(local, "r:") as tf:
            for m in tf.getmembers():
                if m.name.endswith(".mp4"):
                    spans[m.name[: -len(".mp4")]] = (m.offset_data, m.size)
        if set(spans) != {s.key for s in samples}:
            raise AssertionError(f"tar members {sorted(spans)} do not match the samples written")
        info = ShardInfo(
            name=url.rstrip("/").rsplit("/", 1)[-1], size=os.path.getsize(local), sha256=_sha256_file(local),
            num_samples=len(samples), keys=tuple(s.key for s in samples),
        )  # fmt: skip
        storage.upload_file_atomic(local, url, storage_cfg)
    return info, spans
