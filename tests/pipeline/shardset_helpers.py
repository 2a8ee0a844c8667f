"""Build small shard sets that follow the ``pipeline.ingest.manifest`` contract, without the shard job.

Why: loader, curation and study tests need shard sets with known content (and known defects) in
milliseconds, on local disk or the loopback S3 server. ``make_shard_set`` writes ``{prefix}-{i:06d}.tar``
(samples ``{key}.mp4``, ``{key}.json``, ``{key}.cls``), ``index.parquet`` and, last, ``manifest.json``.

Video ``i`` is ``frames`` flat frames (``pattern="index"``: frame ``t`` has grey level ``frame_level(t)``,
so a test can tell which source frame an output frame came from) or a moving gradient (``"moving"``).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import webdataset as wds

from pipeline import storage
from pipeline.ingest.encode import encode_mp4
from pipeline.ingest.manifest import (
    INDEX_NAME,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    read_manifest,
    write_manifest,
)
from pipeline.ingest.manifest import write_table_atomic as write_table

# bad-sample kinds accepted by ``bad=``: garbage bytes for the mp4, no mp4 member, a key the manifest
# lists but the tar lacks, an unparsable .cls label
BAD_KINDS = ("garbage", "no_mp4", "absent", "bad_label")


def frame_level(t: int) -> int:
    """Grey level of frame ``t`` in the ``"index"`` pattern (5 levels apart: far above H.264 noise at crf 10)."""
    if not 0 <= t < 44:
        raise ValueError(f"index pattern supports frames 0..43, got {t}")
    return 16 + 5 * t


def video_frames(i: int, frames: int, width: int, height: int, pattern: str) -> np.ndarray:
    """uint8 [T, H, W, 3] frames of video ``i``."""
    if pattern == "index":
        levels = np.array([frame_level(t) for t in range(frames)], np.uint8)
        return np.broadcast_to(levels[:, None, None, None], (frames, height, width, 3)).copy()
    if pattern == "moving":
        yy, xx = np.mgrid[0:height, 0:width]
        out = [
            ((xx * 3 + yy * 2 + 7 * t + 31 * i) % 256)[..., None] * np.array([1, 0.7, 0.4])
            for t in range(frames)
        ]
        return np.stack(out).astype(np.uint8)
    raise ValueError(f"pattern must be 'index' or 'moving', got {pattern!r}")


def make_shard_set(
    url: str,
    n_videos: int,
    n_shards: int,
    *,
    sizes: list[int] | None = None,
    frames: int | Callable[[int], int] = 24,
    width: int = 64,
    height: int = 48,
    fps: int = 25,
    pattern: str = "index",
    labels: bool = True,
    bad: dict[int, str] | None = None,
    keys_in_manifest: bool = True,
    prefix: str = "shard",
    num_classes: int = 5,
) -> Manifest:
    """Write a shard set of ``n_videos`` tiny videos in ``n_shards`` shards under folder URL ``url``.

    ``sizes`` (videos per shard, summing to ``n_videos``) makes uneven shards; by default they differ by at
    most one. ``bad`` maps a video index to one of :data:`BAD_KINDS`. Keys are ``vid{i:05d}``; label of
    video ``i`` is ``i % num_classes`` (``labels=False``: no ``.cls`` and ``label: null``). Returns the
    manifest as read back.
    """
    sizes = sizes or [len(a) for a in np.array_split(np.arange(n_videos), n_shards)]
    if len(sizes) != n_shards or sum(sizes) != n_videos:
        raise ValueError(f"sizes {sizes} must have {n_shards} entries summing to {n_videos}")
    bad = bad or {}
    if any(kind not in BAD_KINDS for kind in bad.values()):
        raise ValueError(f"bad kinds must be in {BAD_KINDS}, got {sorted(set(bad.values()))}")
    infos, rows, i = [], [], 0
    for s, size in enumerate(sizes):
        name = f"{prefix}-{s:06d}.tar"
        buf, keys = io.BytesIO(), []
        with wds.TarWriter(buf) as tar:
            for _ in range(size):
                key = f"vid{i:05d}"
                n = frames(i) if callable(frames) else frames
                label = i % num_classes if labels else None
                meta = {
                    "fps": fps,
                    "frames": n,
                    "width": width,
                    "height": height,
                    "label": label,
                    "domain": "synthetic",
                }
                mp4 = encode_mp4(video_frames(i, n, width, height, pattern), fps=fps, crf=10, gop=8)
                sample = {"__key__": key, "json": json.dumps(meta).encode()}
                kind = bad.get(i)
                if kind != "no_mp4":
                    sample["mp4"] = b"\x00not a video\x00" * 40 if kind == "garbage" else mp4
                if labels:
                    sample["cls"] = b"seven" if kind == "bad_label" else str(label).encode()
                if kind != "absent":
                    tar.write(sample)
                keys.append(key)
                rows.append({"key": key, "shard": name, "offset": len(rows), "size": len(mp4), "duration": n / fps,
                             "frames": n, "fps": float(fps), "width": width, "height": height, "label": label,
                             "domain": "synthetic", "source": f"synthetic://{key}", "source_sha256": ""})  # fmt: skip
                i += 1
        data = buf.getvalue()
        storage.write_bytes_atomic(storage.join(url, name), data)
        infos.append(ShardInfo(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                               num_samples=size, keys=tuple(keys) if keys_in_manifest else ()))  # fmt: skip
    write_table(storage.join(url, INDEX_NAME), pa.Table.from_pylist(rows))
    manifest = Manifest(shards=tuple(infos), num_samples=n_videos, config={"synthetic": True},
                        code_version="test", created="test")  # fmt: skip
    write_manifest(storage.join(url, MANIFEST_NAME), manifest)
    return read_manifest(url)


def take(loader, limit: int | None = None) -> list[dict]:
    """The batches of ``loader``'s current pass: all of them, or the first ``limit`` (then the pass is left
    half way, as a ``break`` leaves it)."""
    return list(itertools.islice(loader, limit))


def run_epoch(loader, limit: int | None = None) -> list[tuple]:
    """``(keys, video, mask, label, valid)`` of the batches :func:`take` returns."""
    return [(tuple(b["key"]), b["video"], b["mask"], b["label"], b["valid"]) for b in take(loader, limit)]
