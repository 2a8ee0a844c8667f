"""Bytes in, frames out: stream the selected samples of one WebDataset shard and decode clips from memory.

Why here and not in the loader: both halves are Ray-free and torch-free, so the loader, curation and the
benchmark share one reading path. Shards are *streamed* (one open fsspec file at a time, members read in tar
order); members of samples the caller does not want are skipped by the tar reader without being kept.

Videos are decoded with decord from an in-memory ``BytesIO`` (one thread: the loader parallelises across
DataLoader workers). decord 0.6 cannot open some files (and mis-decodes some frame widths), so any decord failure
falls back to PyAV; a file neither can decode raises :class:`BadSample`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import av
import decord
import numpy as np
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from pipeline import storage

log = logging.getLogger(__name__)
READ_BLOCK = 8 * 2**20


class BadSample(ValueError):
    """A sample that cannot become a clip (undecodable, too short, missing member, bad label)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"sample {key!r}: {reason}")
        self.key = key
        self.reason = reason


def _short(exc: BaseException, limit: int = 160) -> str:
    """One-line, bounded error text (decord echoes the whole input buffer into its messages)."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _decord_frames(data: bytes, choose: Callable[[int], Sequence[int]]) -> tuple[np.ndarray, list[int]]:
    vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
    indices = [int(i) for i in choose(len(vr))]
    frames = vr.get_batch(indices).asnumpy()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != len(indices):
        raise RuntimeError(f"decord returned frames of shape {frames.shape}")
    return frames, indices


def _pyav_frames(data: bytes, choose: Callable[[int], Sequence[int]]) -> tuple[np.ndarray, list[int]]:
    """Decode every frame (the fallback path: rare, and shard videos are short and small)."""
    with av.open(io.BytesIO(data)) as inp:
        frames = [f.to_ndarray(format="rgb24") for f in inp.decode(video=0)]
    indices = [int(i) for i in choose(len(frames))]
    return np.stack([frames[i] for i in indices]), indices


def check_length(key: str, n: int, min_frames: int) -> None:
    """:class:`BadSample` when a video of ``n`` frames is shorter than ``min_frames`` (at least 1)."""
    if n < max(1, min_frames):
        raise BadSample(key, f"too short: {n} frame(s) < min_frames={min_frames}")


def read_clip_frames(
    data: bytes, choose: Callable[[int], Sequence[int]], *, key: str = "?", min_frames: int = 1
) -> tuple[np.ndarray, list[int], str]:
    """Decode the frames ``choose(num_frames_in_video)`` selects from an in-memory video (``choose`` is called
    again, with PyAV's frame count, when decord fails part-way).

    Returns ``(frames_THWC uint8 [T, H, W, 3], indices, backend)`` with backend ``"decord"`` or ``"pyav"``.
    Raises :class:`BadSample` when neither backend decodes it or it has fewer than ``min_frames`` frames.
    """
    if not data:
        raise BadSample(key, "empty video")

    def checked(n: int) -> Sequence[int]:
        check_length(key, n, min_frames)
        return choose(n)

    try:
        frames, indices = _decord_frames(data, checked)
        return frames, indices, "decord"
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - any decord failure means "decord cannot open this file"
        log.debug("decord failed on %s (%s); falling back to PyAV", key, _short(e))
    try:
        frames, indices = _pyav_frames(data, checked)
        return frames, indices, "pyav"
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - undecodable by both backends
        raise BadSample(key, f"undecodable: {_short(e)}") from e


def parse_label(sample: dict[str, Any]) -> int:
    """Class label of a shard sample: ``.cls`` (ASCII int), else ``.json``'s ``label``, else -1."""
    key = sample.get("__key__", "?")
    raw = sample.get("cls")
    if raw is not None:
        try:
            return int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as e:
            raise BadSample(key, f"bad .cls label {raw[:20]!r}") from e
    meta = sample.get("json")
    if meta is not None:
        try:
            label = json.loads(meta).get("label")
        except (json.JSONDecodeError, AttributeError) as e:
            raise BadSample(key, "bad .json metadata") from e
        if label is not None and not isinstance(label, str):
            return int(label)
    return -1


def iter_shard(
    url: str,
    *,
    want: Callable[[str], bool],
    cfg: storage.StorageConfig | None = None,
    on_error: Callable[[str], None] | None = None,
    expect: tuple[int, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream the samples of one tar shard whose key satisfies ``want`` (dicts: ``__key__``, ``mp4``, ...).

    Members of unwanted samples are skipped by the tar reader (never kept in memory). Read errors (missing
    shard, truncated tar) are reported through ``on_error`` and end the shard early instead of raising:
    the caller accounts for the samples it expected and did not get. ``expect = (size, sha256)`` from the
    manifest: a shard of another size yields nothing (reported); with a ``sha256`` the whole shard is read
    and hashed first, and a mismatch yields nothing (reported).
    """
    errors: list[str] = []

    def handler(exc: BaseException) -> bool:
        errors.append(_short(exc))
        return True  # webdataset: continue with what can still be read

    def keep(fname: str) -> bool:
        prefix, _ = base_plus_ext(fname)
        return prefix is not None and want(prefix)

    try:
        fs, path = storage.get_fs(url, cfg)
        if expect is not None and expect[0] >= 0:
            size = storage.retry(lambda: fs.size(path), cfg=cfg)
            if size != expect[0]:
                if on_error:
                    on_error(f"shard {url} failed verification: {size} bytes, the manifest says {expect[0]}")
                return
        if expect is not None and expect[1]:
            data = storage.retry(lambda: fs.cat_file(path), cfg=cfg)
            if hashlib.sha256(data).hexdigest() != expect[1]:
                if on_error:
                    on_error(f"shard {url} failed verification: its sha256 differs from the manifest's")
                return
            stream = io.BytesIO(data)
        else:
            # 8 MiB read-ahead: a remote shard arrives in a few range requests, never whole in memory
            stream = storage.retry(lambda: fs.open(path, "rb", block_size=READ_BLOCK), cfg=cfg)
    except Exception as e:  # noqa: BLE001 - reported, the shard's samples count as missing
        if on_error:
            on_error(f"cannot open shard {url}: {_short(e)}")
        return
    with stream:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=handler, select_files=keep)
        yield from group_by_keys(files, handler=handler)
    for err in errors:
        if on_error:
            on_error(f"shard {url}: {err}")


def stream_in_order(
    urls: list[str],
    inputs: list[tuple[int, str]],
    order: list[str],
    *,
    cfg: storage.StorageConfig | None = None,
    expect: list[tuple[int, str]] | None = None,
) -> Iterator[tuple[str, dict[str, Any] | BadSample]]:
    """Yield ``(key, sample)`` for every key of ``order``, in that order, reading each shard once.

    ``inputs`` lists ``(shard index into urls, key)`` in read order (shards contiguous, tar order inside).
    Samples read ahead of their turn wait in memory; when ``order`` is a bounded-buffer shuffle of
    ``inputs`` that wait is bounded by the buffer size. Shards holding no key of ``order`` are not opened.
    A key its shard did not deliver (missing member, truncated or unreadable shard) comes as a
    :class:`BadSample` instead of a sample. ``expect[i]`` is ``iter_shard``'s check of ``urls[i]``.
    """
    left = Counter(order)  # a key may repeat (``remainder="pad"``): keep it until its last turn
    shard_keys: dict[int, set[str]] = {}  # insertion order = read order
    for s, key in inputs:
        if key in left:
            shard_keys.setdefault(s, set()).add(key)
    if sum(len(v) for v in shard_keys.values()) != len(left):
        raise ValueError("stream_in_order: order names keys that inputs does not list")
    pending: dict[str, dict[str, Any] | BadSample] = {}
    errors: list[str] = []
    pos = 0

    def ready() -> Iterator[tuple[str, dict[str, Any] | BadSample]]:
        nonlocal pos
        while pos < len(order) and order[pos] in pending:
            key = order[pos]
            left[key] -= 1
            yield key, (pending[key] if left[key] else pending.pop(key))
            pos += 1

    for s, expected in shard_keys.items():
        seen: set[str] = set()
        check = expect[s] if expect is not None else None
        for sample in iter_shard(urls[s], want=expected.__contains__, cfg=cfg, on_error=errors.append,
                                 expect=check):  # fmt: skip
            key = sample["__key__"]
            if key not in seen:
                seen.add(key)
                pending[key] = sample
                yield from ready()
        why = f"missing from shard ({errors[-1]})" if errors else "missing from shard"
        for key in expected - seen:
            pending[key] = BadSample(key, why)
        yield from ready()
    assert pos == len(order) and not pending, "every requested key is yielded"
