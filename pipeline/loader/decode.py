"""Bytes in, frames out: stream the selected samples of one WebDataset shard and decode clips from memory.

Why here and not in the loader: both halves are Ray-free and torch-free, so the loader, curation and the
benchmark share one reading path. Shards are *streamed* (one open fsspec file at a time, members read in tar
order); members of samples the caller does not want are skipped by the tar reader without being kept.

Videos are decoded from memory, one thread (the loader parallelises across DataLoader workers), by one of
:data:`BACKENDS` behind :func:`read_clip_frames`; all give bit-identical frames for the same indices (frame ``i``
= the ``i``-th in presentation order; tests/pipeline/loader/test_decode.py). ``auto`` is ``pyav``: a single seek and
one forward decode that skips the unneeded non-reference frames, 1.5-2x faster than decord's ``get_batch``
on the shards, and exact where decord is not (open GOPs, AVI; decord 0.6 also mis-decodes some frame widths).
``decord`` stays selectable (the official code's dependency); ``torchcodec`` when it is installed with
FFmpeg's libraries. A file the backend cannot read is decoded whole by PyAV (``"full"``, ~0.2x: never the
normal path); a file that cannot be decoded at all raises :class:`BadSample`.
"""

from __future__ import annotations

import functools
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
from av.video.reformatter import VideoReformatter
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from pipeline import storage
from pipeline.ingest.encode import encode_mp4

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
    """decord's ``get_batch``. Calling it differently does not make it cheaper: seeking once and stepping
    with ``skip_frames`` / ``next`` measured the same on 320p shards (82-98 vs 88-92 ms per clip, loaded box)."""
    vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
    indices = [int(i) for i in choose(len(vr))]
    frames = vr.get_batch(indices).asnumpy()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != len(indices):
        raise RuntimeError(f"decord returned frames of shape {frames.shape}")
    return frames, indices


def _pyav_frames(data: bytes, choose: Callable[[int], Sequence[int]]) -> tuple[np.ndarray, list[int]]:
    """Seek once, decode forward once: frame ``i`` is the ``i``-th packet in presentation (pts) order.

    Decoding starts at the last key frame (in decode order) presented no later than the first wanted frame,
    so every wanted frame and every frame it references is decoded; non-reference frames that are not
    wanted are skipped inside the decoder (``skip_frame``); only the wanted frames are converted to RGB, by
    the same swscale conversion decord uses (bit-identical frames). Stops at the last wanted frame.
    """
    with av.open(io.BytesIO(data)) as inp:
        stream = inp.streams.video[0]
        codec = stream.codec_context
        codec.thread_count = 1  # frame threading adds CPU per clip for no gain; workers parallelise instead
        packets = [p for p in inp.demux(stream) if p.size]  # the last, empty packet only flushes
        shown = sorted(p.pts for p in packets if not p.is_discard and p.pts is not None)
        if len(shown) != sum(not p.is_discard for p in packets) or len(set(shown)) != len(shown):
            raise RuntimeError("packets without distinct timestamps: cannot index frames")
        indices = [int(i) for i in choose(len(shown))]
        slots: dict[int, list[int]] = {}  # pts -> positions in the output
        for j, i in enumerate(indices):
            slots.setdefault(shown[i], []).append(j)
        first = shown[min(indices)]
        start = max((k for k, p in enumerate(packets) if p.is_keyframe and p.pts <= first), default=0)
        out_THWC: np.ndarray | None = None
        rgb = _RGB(len(indices))
        left = len(slots)
        for packet in [*packets[start:], None]:
            if packet is not None:
                codec.skip_frame = "DEFAULT" if packet.pts in slots else "NONREF"
            for frame in codec.decode(packet):
                js = slots.pop(frame.pts, None)
                if js:
                    out_THWC = rgb.put(frame, js)
                    left -= 1
            if not left:
                break
    if left or out_THWC is None:
        raise RuntimeError(f"{left} wanted frame(s) never came out of the decoder")
    return out_THWC, indices


class _RGB:
    """Frames -> one uint8 ``[T, H, W, 3]`` array: one swscale context for all of them (a context per frame
    costs more than the conversion), one thread, written in place (no per-frame array, no stack)."""

    def __init__(self, n: int) -> None:
        self.n, self.out, self.reformatter = n, None, VideoReformatter()

    def put(self, frame: av.VideoFrame, slots: Sequence[int]) -> np.ndarray:
        plane = self.reformatter.reformat(frame, format="rgb24", threads=1).planes[0]
        w, h = plane.width, plane.height
        if self.out is None:
            self.out = np.empty((self.n, h, w, 3), np.uint8)
        rows = np.frombuffer(plane, np.uint8).reshape(h, plane.line_size)[:, : 3 * w]
        for j in slots:
            self.out[j] = rows.reshape(h, w, 3)
        return self.out


def _torchcodec_frames(data: bytes, choose: Callable[[int], Sequence[int]]) -> tuple[np.ndarray, list[int]]:
    """torchcodec's exact-seek CPU decoder (optional: needs the ``torchcodec`` package and FFmpeg's shared
    libraries on the library path)."""
    from torchcodec.decoders import VideoDecoder  # local import: optional backend

    dec = VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC", device="cpu")
    indices = [int(i) for i in choose(int(dec.metadata.num_frames))]
    return dec.get_frames_at(indices).data.numpy(), indices


def _full_frames(data: bytes, choose: Callable[[int], Sequence[int]]) -> tuple[np.ndarray, list[int]]:
    """Decode and convert every frame (the fallback: ~0.2x the speed of the backends, for files they reject)."""
    with av.open(io.BytesIO(data)) as inp:
        stream = inp.streams.video[0]
        stream.codec_context.thread_count = 1
        reformatter = VideoReformatter()
        frames = [reformatter.reformat(f, format="rgb24", threads=1).to_ndarray() for f in inp.decode(stream)]
    indices = [int(i) for i in choose(len(frames))]
    return np.stack([frames[i] for i in indices]), indices


# name -> decoder; ``auto`` takes the first usable one of AUTO_ORDER (fastest first: the figures of
# benchmarks/loader_throughput.py on CPU, where pyav decodes ~1.5x faster than decord, torchcodec ~1.0x)
DECODERS: dict[str, Callable[[bytes, Callable[[int], Sequence[int]]], tuple[np.ndarray, list[int]]]] = {
    "pyav": _pyav_frames,
    "decord": _decord_frames,
    "torchcodec": _torchcodec_frames,
}
BACKENDS = ("auto", *DECODERS)
AUTO_ORDER = ("pyav", "torchcodec", "decord")


@functools.cache
def backend_error(name: str) -> str | None:
    """Why backend ``name`` cannot decode in this process (``None``: it can). Tried once per process, on a
    tiny video."""
    if name not in DECODERS:
        return f"unknown decode backend {name!r} (one of {BACKENDS})"
    try:
        probe = encode_mp4(np.zeros((2, 32, 64, 3), np.uint8), gop=2)
        DECODERS[name](probe, lambda n: [n - 1])
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
        return _short(e)
    return None


def resolve_backend(name: str) -> str:
    """The backend ``name`` stands for (``auto``: the first usable one of :data:`AUTO_ORDER`).
    ``ValueError`` for an unknown or unusable backend."""
    if name == "auto":
        return next(b for b in AUTO_ORDER if backend_error(b) is None)
    why = backend_error(name)
    if why is not None:
        raise ValueError(f"decode backend {name!r} is not usable here: {why}")
    return name


def check_length(key: str, n: int, min_frames: int) -> None:
    """:class:`BadSample` when a video of ``n`` frames is shorter than ``min_frames`` (at least 1)."""
    if n < max(1, min_frames):
        raise BadSample(key, f"too short: {n} frame(s) < min_frames={min_frames}")


def read_clip_frames(
    data: bytes,
    choose: Callable[[int], Sequence[int]],
    *,
    key: str = "?",
    min_frames: int = 1,
    backend: str = "auto",
) -> tuple[np.ndarray, list[int], str]:
    """Decode the frames ``choose(num_frames_in_video)`` selects from an in-memory video with ``backend``
    (:data:`BACKENDS`; every backend gives bit-identical frames for the same indices).

    Returns ``(frames_THWC uint8 [T, H, W, 3], indices, used)`` with ``used`` the backend that decoded, or
    ``"full"`` when it failed and the full-decode fallback did (``choose`` is then asked again; for the same
    frame count it is not called twice, so a ``choose`` that draws random numbers picks the same frames).
    Raises :class:`BadSample` when neither decodes it or it has fewer than ``min_frames`` frames.
    """
    if not data:
        raise BadSample(key, "empty video")
    name = resolve_backend(backend)
    chosen: dict[int, Sequence[int]] = {}

    def checked(n: int) -> Sequence[int]:
        check_length(key, n, min_frames)
        if n not in chosen:
            chosen[n] = choose(n)
        return chosen[n]

    try:
        frames, indices = DECODERS[name](data, checked)
        return frames, indices, name
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - any backend failure means "this backend cannot read this file"
        log.debug("%s failed on %s (%s); decoding every frame with PyAV", name, key, _short(e))
    try:
        frames, indices = _full_frames(data, checked)
        return frames, indices, "full"
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - undecodable
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
