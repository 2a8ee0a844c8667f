"""probe(): exact numbers for every decodable kind, a one-line reason for every unusable one."""

from __future__ import annotations

import pytest

from pipeline.ingest.probe import ProbeError, normalize_rotation, probe
from tests.videos import KINDS, make_video, video_bytes

# kind -> (codec, pix_fmt) of the 64x48, 16-frame, 25 fps source
DECODABLE = {
    "ok": ("h264", "yuv420p"),
    "with_audio": ("h264", "yuv420p"),
    "wrong_ext": ("h264", "yuv420p"),
    "rotated": ("h264", "yuv420p"),
    "vfr": ("h264", "yuv420p"),
    "10bit": ("h264", "yuv420p10le"),
    "vp9": ("vp9", "yuv420p"),
    "av1": ("av1", "yuv420p"),
    "mjpeg": ("mjpeg", "yuvj420p"),
}
UNUSABLE = {
    "zero_byte": "empty file (0 bytes)",
    "not_video": "cannot open as a media file",
    "truncated": "cannot open as a media file",
    "audio_only": "no video stream (audio-only)",
}


def test_every_kind_is_classified():
    assert set(DECODABLE) | set(UNUSABLE) | {"one_frame", "odd_dims", "huge"} == set(KINDS)


@pytest.mark.parametrize("kind", sorted(DECODABLE))
def test_probe_decodable(kind):
    info = probe(video_bytes(kind, width=64, height=48, frames=16, fps=25))
    codec, pix_fmt = DECODABLE[kind]
    assert (info.codec, info.pix_fmt) == (codec, pix_fmt)
    assert (info.width, info.height, info.frames) == (64, 48, 16)
    assert info.has_audio == (kind == "with_audio")
    assert info.rotation == (90 if kind == "rotated" else 0)
    assert info.display_size == ((48, 64) if kind == "rotated" else (64, 48))
    assert info.vfr == (kind == "vfr")
    if kind == "vfr":
        # pts 0, 80, 100, 120, 200, ... ms (an 80 ms hole before every third frame); the last frame lasts
        # between one short gap and one long gap
        gaps = [20 if i % 3 else 80 for i in range(16)]
        last_pts = sum(gaps[:-1]) / 1000
        assert last_pts + 0.02 - 1e-6 <= info.duration <= last_pts + 0.08 + 1e-6
        assert info.fps == pytest.approx(16 / info.duration)
    else:
        assert info.duration == pytest.approx(16 / 25)
        assert info.fps == pytest.approx(25)


@pytest.mark.parametrize("kind", sorted(UNUSABLE))
def test_probe_rejects_with_one_line_reason(kind, tmp_path):
    path = make_video(tmp_path / f"x{KINDS[kind]}", kind)
    with pytest.raises(ProbeError) as err:
        probe(path)
    assert str(err.value).startswith(UNUSABLE[kind])
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_probe_path_equals_bytes_and_other_sizes(tmp_path):
    data = video_bytes("odd_dims", width=64, height=48, frames=7, fps=30)
    path = tmp_path / "odd.mkv"  # wrong extension on purpose: content decides
    path.write_bytes(data)
    a, b = probe(data), probe(str(path))
    assert a == b
    assert (a.width, a.height, a.frames, a.pix_fmt) == (65, 49, 7, "yuv444p")
    assert a.duration == pytest.approx(7 / 30) and a.size_bytes == len(data)


def test_probe_one_frame_and_huge():
    one = probe(video_bytes("one_frame", fps=25))
    assert one.frames == 1 and one.duration == pytest.approx(1 / 25)
    huge = probe(video_bytes("huge", frames=2))
    assert (huge.width, huge.height, huge.frames) == (4000, 64, 2)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_probe_rotations(rotation):
    assert probe(video_bytes("rotated", rotation=rotation, frames=2)).rotation == rotation


@pytest.mark.parametrize(
    "angle, expected", [(0, 0), (-90, 270), (90.4, 90), (180, 180), (-180, 180), (360, 0)]
)
def test_normalize_rotation(angle, expected):
    assert normalize_rotation(angle) == expected


def test_normalize_rotation_rejects_oblique():
    with pytest.raises(ProbeError, match="multiple of 90"):
        normalize_rotation(45)


def test_probe_missing_file(tmp_path):
    with pytest.raises(ProbeError, match="cannot stat"):
        probe(str(tmp_path / "nope.mp4"))
