"""Transcoder: sizes, constant-rate resampling, rotation, clips, format, determinism, rejects."""

from __future__ import annotations

import io
import os
from fractions import Fraction

import av
import decord
import numpy as np
import pytest

from pipeline.ingest.encode import decode_all
from pipeline.ingest.probe import ProbeError, probe
from pipeline.ingest.transcode import TranscodeConfig, TranscodeError, output_size, transcode, transcode_file
from tests.videos import KINDS, encode, index_level, video_bytes

ACCEPT = {"ok", "with_audio", "odd_dims", "rotated", "vfr", "10bit", "vp9", "av1", "mjpeg", "wrong_ext"}
REJECT = {  # kind -> (exception, reason prefix) under the default limits
    "one_frame": (TranscodeError, "1 frame(s), fewer than transcode.min_frames=2"),
    "huge": (TranscodeError, "aspect ratio 62.5:1 exceeds transcode.max_aspect=4.0"),
    "zero_byte": (ProbeError, "empty file"),
    "not_video": (ProbeError, "cannot open"),
    "truncated": (ProbeError, "cannot open"),
    "audio_only": (ProbeError, "no video stream"),
}


def _source_index(frames_THWC: np.ndarray) -> list[int]:
    """Which ``"index"``-pattern source frame each decoded frame shows (nearest grey level)."""
    levels = np.array([index_level(i) for i in range(18)])
    return [int(np.argmin(np.abs(levels - f.mean()))) for f in frames_THWC]


def _nearest_rule(times: list[Fraction], end: Fraction, rate: Fraction) -> list[int]:
    """Reference resampler: slot k at k/rate shows the source frame nearest in time (earlier on ties);
    the output ends where a virtual frame at ``end`` would be nearest."""
    points = [*times, end]
    out, k = [], 0
    while True:
        t = Fraction(k) / rate
        j = min(range(len(points)), key=lambda i: abs(points[i] - t))
        if j == len(times):
            return out
        out.append(j)
        k += 1


def test_kinds_are_all_covered():
    assert ACCEPT | set(REJECT) == set(KINDS)


@pytest.mark.parametrize(
    "w, h, short, expected",
    [
        (1920, 1080, 320, (568, 320)),  # 1920 * 320 / 1080 = 568.9 -> nearest even 568
        (1080, 1920, 320, (320, 568)),
        (1280, 720, 360, (640, 360)),
        (64, 48, 320, (64, 48)),  # never upscale
        (65, 49, 320, (64, 48)),  # odd -> even by dropping a row/column
        (4000, 64, 32, (2000, 32)),
        (100, 100, 64, (64, 64)),
        (130, 98, 64, (84, 64)),  # 84.9 -> 84
    ],
)
def test_output_size(w, h, short, expected):
    assert output_size(w, h, short) == expected


@pytest.mark.parametrize("src_fps, out_fps", [(25, 30), (60, 30), (30, 30), (24, 12.5)])
def test_constant_rate_resampling_picks_nearest_frames(src_fps, out_fps):
    n = 16
    data = encode(np.stack([np.full((48, 64, 3), index_level(i), np.uint8) for i in range(n)]), fps=src_fps)
    (clip,) = transcode(data, TranscodeConfig(fps=out_fps))
    got = _source_index(decode_all(clip))
    times = [Fraction(i, 1) / Fraction(src_fps) for i in range(n)]
    expected = _nearest_rule(times, Fraction(n) / Fraction(src_fps), Fraction(out_fps))
    assert got == expected
    info = probe(clip)
    assert info.fps == pytest.approx(out_fps) and not info.vfr and info.frames == len(expected)


def test_variable_rate_source_becomes_constant():
    data = video_bytes("vfr", frames=16, pattern="index")
    src = probe(data)
    (clip,) = transcode(data, TranscodeConfig(fps=30))
    gaps = [20 if i % 3 else 80 for i in range(16)]
    times = [Fraction(int(t), 1000) for t in np.cumsum([0] + gaps[:-1])]
    expected = _nearest_rule(times, Fraction(src.duration).limit_denominator(1000), Fraction(30))
    assert _source_index(decode_all(clip)) == expected
    out = probe(clip)
    assert not out.vfr and out.fps == pytest.approx(30)


@pytest.mark.parametrize(
    "rotation, bright_quadrant", [(0, (0, 0)), (90, (1, 0)), (180, (1, 1)), (270, (0, 1))]
)
def test_rotation_is_applied(rotation, bright_quadrant):
    """Stored frames are bright in the top-left quadrant; a player rotating them counter-clockwise by
    ``rotation`` shows that quadrant at (row, col) = ``bright_quadrant``."""
    frame = np.full((48, 64, 3), 40, np.uint8)
    frame[:24, :32] = 230
    data = encode(np.repeat(frame[None], 4, 0), rotation=rotation)
    (clip,) = transcode(data, TranscodeConfig(fps=25))
    out = decode_all(clip)
    h, w = out.shape[1:3]
    assert (w, h) == ((48, 64) if rotation in (90, 270) else (64, 48))
    quads = np.array(
        [
            [out[:, r * h // 2 : (r + 1) * h // 2, c * w // 2 : (c + 1) * w // 2].mean() for c in (0, 1)]
            for r in (0, 1)
        ]
    )
    assert np.unravel_index(np.argmax(quads), quads.shape) == bright_quadrant
    assert probe(clip).rotation == 0  # applied, not passed on


@pytest.mark.parametrize("kind", sorted(ACCEPT))
def test_accepted_kinds_become_the_training_format(kind):
    cfg = TranscodeConfig(short_side=32, fps=30, gop=8)
    src = probe(video_bytes(kind, frames=24)) if kind != "odd_dims" else None
    (clip,) = transcode(video_bytes(kind, frames=24), cfg)
    with av.open(io.BytesIO(clip)) as c:
        assert not c.streams.audio and len(c.streams.video) == 1
        keyframes = [i for i, p in enumerate(c.demux(c.streams.video[0])) if p.size and p.is_keyframe]
    info = probe(clip)
    assert (info.codec, info.pix_fmt, info.rotation) == ("h264", "yuv420p", 0)
    assert info.fps == pytest.approx(30) and not info.vfr
    assert min(info.width, info.height) == 32 and info.width % 2 == 0 and info.height % 2 == 0
    assert keyframes[0] == 0 and max(np.diff(keyframes + [info.frames])) <= 8
    assert clip.index(b"moov") < clip.index(b"mdat")  # faststart
    if src is not None:
        assert info.duration == pytest.approx(src.duration, abs=1 / 30 + 1e-6)


@pytest.mark.parametrize("kind", sorted(REJECT))
def test_rejected_kinds(kind):
    exc, reason = REJECT[kind]
    with pytest.raises(exc) as err:
        transcode(video_bytes(kind), TranscodeConfig())
    assert str(err.value).startswith(reason)


def test_huge_accepted_when_aspect_limit_allows():
    (clip,) = transcode(video_bytes("huge", frames=3), TranscodeConfig(short_side=32, max_aspect=100, fps=25))
    info = probe(clip)
    assert (info.width, info.height, info.frames) == (2000, 32, 3)


def test_downscale_matches_block_average_and_decord_reads_it():
    src = video_bytes("ok", width=128, height=96, frames=10, fps=25)
    (clip,) = transcode(src, TranscodeConfig(short_side=48, fps=25, crf=12))
    ref = decode_all(src).astype(float).reshape(10, 48, 2, 64, 2, 3).mean(axis=(2, 4))
    out = decode_all(clip).astype(float)
    assert out.shape == ref.shape
    assert np.abs(out - ref).mean() < 4
    vr = decord.VideoReader(io.BytesIO(clip))
    assert len(vr) == 10 and vr[0].shape == (48, 64, 3)


def test_clips_cut_at_max_clip_s(tmp_path):
    src = video_bytes("ok", frames=40, fps=25)  # 1.6 s -> 48 slots at 30 fps
    clips = transcode_file(src, str(tmp_path), "v", TranscodeConfig(fps=30, max_clip_s=0.5))
    assert [c.frames for c in clips] == [15, 15, 15, 3]
    assert [c.start for c in clips] == pytest.approx([0, 0.5, 1.0, 1.5])
    assert [os.path.basename(c.path) for c in clips] == [f"v_c{i:03d}.mp4" for i in range(4)]
    assert [probe(c.path).frames for c in clips] == [15, 15, 15, 3]
    os.makedirs(tmp_path / "b")
    short_tail = transcode_file(
        src, str(tmp_path / "b"), "v", TranscodeConfig(fps=30, max_clip_s=0.5, min_frames=4)
    )
    assert [c.frames for c in short_tail] == [15, 15, 15]
    assert sorted(os.listdir(tmp_path / "b")) == ["v_c000.mp4", "v_c001.mp4", "v_c002.mp4"]


def test_too_few_output_frames_leaves_no_files(tmp_path):
    src = video_bytes("ok", frames=16, fps=25)  # 0.64 s at 2 fps -> 2 frames
    with pytest.raises(TranscodeError, match="2 output frame"):
        transcode_file(src, str(tmp_path), "v", TranscodeConfig(fps=2, min_frames=3))
    assert os.listdir(tmp_path) == []


def test_transcode_is_deterministic():
    src = video_bytes("vp9", frames=12)
    cfg = TranscodeConfig(short_side=32)
    assert transcode(src, cfg) == transcode(src, cfg)


@pytest.mark.parametrize(
    "field, value, message",
    [("short_side", 33, "short_side must be an even"), ("fps", 0, "fps must be"), ("gop", 0, "gop must be"),
     ("crf", 60, "crf must be"), ("max_clip_s", -1.0, "max_clip_s must be"), ("min_frames", 0, "min_frames"),
     ("max_aspect", 0.5, "max_aspect")],
)  # fmt: skip
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        TranscodeConfig(**{field: value})
