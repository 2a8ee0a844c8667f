"""Decode backends against independent decodes: every backend gives the frames a full PyAV decode gives (and
decord's, where decord reads the file) for the same indices, on the shard format and on harder sources
(B-frames, odd sizes, variable frame rate, open GOPs, other containers); the fast path is the normal path;
repeated sampling decodes once; bad input gives one line naming the sample; memory stays flat."""

from __future__ import annotations

import io
import os
from fractions import Fraction

import av
import decord
import numpy as np
import pytest
import torch

import pipeline.loader.clips as clips
from pipeline.ingest.encode import decode_all, encode_mp4
from pipeline.loader.clips import make_clips, sample_frame_indices, sample_generator
from pipeline.loader.config import LoaderConfig
from pipeline.loader.decode import (
    AUTO_ORDER,
    BACKENDS,
    BadSample,
    backend_error,
    read_clip_frames,
    resolve_backend,
)
from pipeline.loader.masking import ClipSpec
from pipeline.loader.transforms import crop_clip, sample_crop
from tests.pipeline.shardset_helpers import video_frames

FAST = [b for b in BACKENDS if b != "auto"]


def _encode(frames: np.ndarray, *, pts_ms: list[int] | None = None, x264: str = "", gop: int = 12,
            container: str = "mp4", codec: str = "libx264") -> bytes:  # fmt: skip
    """Frames -> bytes with explicit presentation times (ms) and raw x264 parameters (what encode_mp4 does not
    offer: variable frame rate, open GOPs, long B-frame runs, other containers and codecs)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        s = out.add_stream(codec, rate=30)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        if codec == "libx264":
            s.options = {"g": str(gop), "x264-params": ":".join(filter(None, ["mbtree=0", x264]))}
        s.thread_count = 1
        for t, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = (pts_ms[t] if pts_ms else 33 * t), Fraction(1, 1000)
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return buf.getvalue()


def _vfr(n: int) -> list[int]:
    return np.cumsum(np.random.default_rng(3).integers(8, 90, n)).tolist()


MOVING = video_frames(1, 40, 96, 64, "moving")
# name -> (bytes, decord reads it bit-exactly)
VIDEOS = {
    "shard format: B-frames, gop 32, fastdecode": (
        encode_mp4(MOVING, gop=32, tune="fastdecode", bframes=3),
        True,
    ),
    "no B-frames, gop 8": (encode_mp4(MOVING, gop=8, bframes=0), True),
    "odd size 98x62": (encode_mp4(video_frames(2, 30, 98, 62, "moving"), gop=5), True),
    "odd size 50x34, one key frame": (encode_mp4(video_frames(3, 30, 50, 34, "moving"), gop=300), True),
    "48 px wide (decord mis-decodes)": (encode_mp4(video_frames(4, 20, 48, 32, "moving"), gop=4), False),
    "vfr mp4": (_encode(MOVING, pts_ms=_vfr(40)), True),
    "vfr mp4, 5 B-frames": (_encode(MOVING, pts_ms=_vfr(40), x264="bframes=5:b-pyramid=normal"), True),
    "vfr matroska": (_encode(MOVING, pts_ms=_vfr(40), container="matroska"), True),
    # decord seeks into these wrongly (after a jump it returns other frames than a full decode): decord bugs
    "open gop, 8 B-frames": (_encode(MOVING, x264="open-gop=1:bframes=8", gop=10), False),
    "mpeg4 in avi": (_encode(MOVING, container="avi", codec="mpeg4"), False),
}
INDEX_SETS = [[0], [39], [0, 4, 8, 12], [5, 5, 5, 6], [37, 38, 39, 39], [30, 2, 17, 2], list(range(0, 40, 3))]


@pytest.mark.parametrize("name", list(VIDEOS))
@pytest.mark.parametrize("backend", FAST)
def test_every_backend_gives_the_frames_of_a_full_decode(name, backend):
    if backend_error(backend):
        pytest.skip(f"{backend}: {backend_error(backend)}")
    data, decord_exact = VIDEOS[name]
    if backend == "decord" and not decord_exact:
        pytest.skip("decord does not read this file exactly (the other backends do)")
    full = decode_all(data)
    for idx in INDEX_SETS:
        idx = [i * len(full) // 40 for i in idx]  # the same positions on the 20- and 30-frame videos
        out, got, used = read_clip_frames(data, lambda n, idx=idx: idx, backend=backend)
        assert used == backend, "the fast path, not the full-decode fallback"
        assert got == idx and out.dtype == np.uint8 and out.shape == (len(idx), *full.shape[1:])
        assert np.array_equal(out, full[idx]), (name, idx)


@pytest.mark.parametrize("name", [n for n, (_, exact) in VIDEOS.items() if exact])
def test_pyav_equals_decord(name):
    data = VIDEOS[name][0]
    vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
    idx = sample_frame_indices(len(vr), 4, 3, torch.Generator().manual_seed(len(name)))
    want = vr.get_batch(idx).asnumpy()
    out, _, used = read_clip_frames(data, lambda n: idx, backend="pyav")
    assert used == "pyav" and np.array_equal(out, want)


@pytest.mark.parametrize("name", [n for n, (_, exact) in VIDEOS.items() if not exact and "48 px" not in n])
def test_decord_seeks_wrongly_where_pyav_does_not(name):
    """Why decord is not the default: on open GOPs and AVI it returns other frames than a full decode."""
    data = VIDEOS[name][0]
    full = decode_all(data)
    vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
    idx = [30, 2, 17, 2, 5, 33, 34, 12]
    assert not np.array_equal(vr.get_batch(idx).asnumpy(), full[idx]), f"decord now reads {name} exactly"
    assert np.array_equal(read_clip_frames(data, lambda n: idx, backend="pyav")[0], full[idx])


def test_auto_and_bad_backend_names():
    assert resolve_backend("auto") == AUTO_ORDER[0] == "pyav"
    data = VIDEOS["odd size 98x62"][0]
    assert read_clip_frames(data, lambda n: [n - 1])[2] == "pyav"
    with pytest.raises(ValueError, match="unknown decode backend 'nvdec'"):
        resolve_backend("nvdec")
    with pytest.raises(ValueError, match="decode_backend must be one of"):
        LoaderConfig(manifest="m", decode_backend="nvdec")
    if backend_error("torchcodec"):
        with pytest.raises(ValueError, match="decode backend 'torchcodec' is not usable here"):
            resolve_backend("torchcodec")


def test_fallback_asks_choose_once_and_keeps_its_draw():
    """decord fails on a 48-px-wide file after choosing: the full-decode fallback must cut the same frames
    (a second call would draw another start from the generator)."""
    data = VIDEOS["48 px wide (decord mis-decodes)"][0]
    g, calls = torch.Generator().manual_seed(0), []

    def choose(n):
        calls.append(n)
        return sample_frame_indices(n, 4, 2, g)

    out, idx, used = read_clip_frames(data, choose, backend="decord")
    assert used == "full" and calls == [20]
    assert idx == sample_frame_indices(20, 4, 2, torch.Generator().manual_seed(0))
    assert np.array_equal(out, decode_all(data)[idx])


def test_bad_input_is_one_line_naming_the_sample():
    data = VIDEOS["shard format: B-frames, gop 32, fastdecode"][0]
    for raw, reason in [(b"", "empty"), (b"\x00junk" * 100, "undecodable"), (data[: len(data) // 3], None)]:
        try:
            out, _, _ = read_clip_frames(raw, lambda n: [0, n - 1], key="shard-7/vid42")
        except BadSample as e:
            assert str(e).startswith("sample 'shard-7/vid42': ") and "\n" not in str(e) and len(str(e)) < 260
            assert reason is None or reason in str(e)
        else:
            assert reason is None and out.shape[0] == 2  # a truncated file may still hold its first frames


def test_repeated_sampling_decodes_once_and_cuts_each_clip_from_the_same_frames(monkeypatch):
    data = VIDEOS["shard format: B-frames, gop 32, fastdecode"][0]
    spec = ClipSpec(
        num_frames=4, input_size=32, patch_size=16, tubelet_size=2, mask_ratio=0.5, mask_type="tube"
    )
    cfg = LoaderConfig(manifest="m", sampling_rate=3, num_sample=4, batch_size=4)
    calls = []
    real = clips.read_clip_frames
    monkeypatch.setattr(clips, "read_clip_frames", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    video, mask = make_clips(data, "k", spec, cfg, seed=1, epoch=2)
    assert len(calls) == 1 and video.shape == (4, 3, 4, 32, 32) and video.dtype == torch.uint8
    idx = sample_frame_indices(40, 4, 3, sample_generator(1, 2, "k", "time"))
    frames = torch.from_numpy(decode_all(data)[idx]).permute(0, 3, 1, 2)
    for r in range(4):
        g = sample_generator(1, 2, "k", f"aug{r}")
        crop = sample_crop(96, 64, input_size=32, generator=g)
        assert torch.equal(video[r], crop_clip(frames, crop, input_size=32)), r
    assert len({tuple(m.tolist()) for m in mask}) > 1  # each clip its own mask


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_pyav_backend_does_not_leak():
    """PyAV frame iteration is known to leak in data loaders: 400 partial decodes (the loader's pattern, which
    stops decoding early) must not grow RSS (a leak of the 8 decoded 320x192 frames would be ~70 MB)."""
    data = encode_mp4(video_frames(5, 40, 320, 192, "moving"), gop=8)
    for i in range(50):  # warm-up: allocator pools, swscale tables
        read_clip_frames(data, lambda n, i=i: [i % 30, i % 30 + 9], backend="pyav")
    before = _rss_mb()
    for i in range(400):
        read_clip_frames(data, lambda n, i=i: [i % 30, i % 30 + 9], backend="pyav")
    assert _rss_mb() - before < 15
