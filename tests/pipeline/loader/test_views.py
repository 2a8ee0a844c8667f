"""Test-time views against independent index arithmetic on frame-coded videos.

A coded frame stores its source frame number in channel 0, its column in channel 1 and its row in channel 2, so
un-normalising a view tells exactly which frame/pixel every output value came from.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.ingest.encode import encode_mp4
from pipeline.loader.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.loader.views import (
    ViewSpec,
    clip_frame_indices,
    crop_offsets,
    resized_size,
    video_views,
    views_from_frames,
)
from tests.pipeline.shardset_helpers import frame_level, video_frames


def coded_frames(n: int, height: int, width: int) -> np.ndarray:
    t, y, x = np.meshgrid(np.arange(n), np.arange(height), np.arange(width), indexing="ij")
    return np.stack([t, x, y], axis=-1).astype(np.uint8)


def unnormalise(views: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None, None]
    return torch.round((views * std + mean) * 255).to(torch.int64)


def test_clip_indices_hand_worked_examples():
    spec = ViewSpec(num_frames=4, sampling_rate=2, input_size=32, clips=2)
    # 40 frames at stride 2 -> 20 strided frames 0..38; starts at 0 and 20 - 4 = 16 (frame 32)
    assert clip_frame_indices(40, spec) == [[0, 2, 4, 6], [32, 34, 36, 38]]
    # 5 clips over 20 strided frames: starts int(i * 16 / 4) = 0, 4, 8, 12, 16 -> frames x2
    five = ViewSpec(num_frames=4, sampling_rate=2, input_size=32, clips=5)
    assert [c[0] for c in clip_frame_indices(40, five)] == [0, 8, 16, 24, 32]
    # one clip: the centre start, 16 // 2 = 8 strided -> frame 16
    one = ViewSpec(num_frames=4, sampling_rate=2, input_size=32, clips=1)
    assert clip_frame_indices(40, one) == [[16, 18, 20, 22]]
    # short video: 5 frames at stride 2 -> 0, 2, 4, padded with the last one; every clip is the same
    assert clip_frame_indices(5, spec) == [[0, 2, 4, 4], [0, 2, 4, 4]]
    # 3 clips over 7 strided frames: starts 0, int(1.5)=1, 3
    three = ViewSpec(num_frames=4, sampling_rate=1, input_size=32, clips=3)
    assert [c[0] for c in clip_frame_indices(7, three)] == [0, 1, 3]


@pytest.mark.parametrize("duration,sr,clips", [(37, 3, 5), (16, 4, 2), (9, 1, 3), (100, 4, 10)])
def test_clip_indices_match_the_official_formula(duration, sr, clips):
    spec = ViewSpec(num_frames=4, sampling_rate=sr, input_size=32, clips=clips)
    # the official VideoClsDataset test mode, written out with numpy
    strided = np.arange(0, duration, sr)
    if len(strided) < 4:
        strided = np.concatenate([strided, np.full(4 - len(strided), strided[-1])])
    step = max((len(strided) - 4) / (clips - 1), 0) if clips > 1 else None
    for i, got in enumerate(clip_frame_indices(duration, spec)):
        start = int(i * step) if step is not None else (len(strided) - 4) // 2
        assert got == strided[start : start + 4].tolist()
        assert all(0 <= f < duration for f in got)


def test_crop_offsets_landscape_and_portrait():
    spec = ViewSpec(num_frames=4, input_size=32, crops=3)
    assert resized_size(48, 64, 32) == (32, 42)  # int(32 * 64 / 48) = 42
    assert crop_offsets(48, 64, spec) == [(0, 0), (0, 5), (0, 10)]  # long side 42: 0, int(10/2), 10
    assert crop_offsets(64, 32, spec) == [(0, 0), (16, 0), (32, 0)]  # portrait: crops along the height
    assert crop_offsets(48, 64, ViewSpec(num_frames=4, input_size=32, crops=1)) == [(0, 5)]


@pytest.mark.parametrize("clips,crops", [(2, 3), (5, 3), (1, 1)])
def test_views_pick_the_right_frames_and_pixels(clips, crops):
    spec = ViewSpec(num_frames=4, sampling_rate=2, input_size=32, clips=clips, crops=crops)
    frames = coded_frames(30, 32, 80)  # short side already 32: no resize, values survive exactly
    views = views_from_frames(frames, clip_frame_indices(30, spec), spec)
    assert views.shape == (clips * crops, 3, 4, 32, 32) and views.dtype == torch.float32
    px = unnormalise(views, spec)
    strided = list(range(0, 30, 2))  # 15 strided frames; clip starts spread over [0, 11]
    for v in range(clips * crops):
        clip, crop = divmod(v, crops)  # clip-major
        start = clip * 11 // (clips - 1) if clips > 1 else 11 // 2
        left = crop * 48 // (crops - 1) if crops > 1 else 48 // 2
        want_t = torch.tensor(strided[start : start + 4])
        assert torch.equal(px[v, 0, :, 5, 7], want_t)
        assert torch.equal(px[v, 1, 0, 0], torch.arange(left, left + 32))
        assert torch.equal(px[v, 2, 0, :, 0], torch.arange(32))


def test_views_resize_short_side_then_crop():
    spec = ViewSpec(num_frames=2, sampling_rate=1, input_size=32, clips=1, crops=3)
    frames = np.zeros((2, 64, 96, 3), np.uint8)
    frames[:, :, :48] = 200  # left half bright: after resize to 32x48 the left 24 columns are bright
    views = views_from_frames(frames, [[0, 1]], spec)
    px = unnormalise(views, spec)[:, 0, 0, 10]  # row 10 of frame 0, channel 0, per crop: [3, 32]
    # resized 32x48: columns 0..23 bright, 24..47 dark (a pixel of blur either side of the edge);
    # crops start at 0, int(16/2) = 8, 16
    for crop, left in enumerate((0, 8, 16)):
        edge = 24 - left
        assert (px[crop, : edge - 1] == 200).all() and (px[crop, edge + 1 :] == 0).all(), (crop, px[crop])


def test_video_views_from_mp4_bytes_follow_source_frames():
    n = 40
    data = encode_mp4(video_frames(0, n, 64, 32, "index"), fps=25, crf=10, gop=8)
    spec = ViewSpec(num_frames=4, sampling_rate=3, input_size=32, clips=3, crops=2)
    views = video_views(data, spec, key="v")
    assert views.shape == (6, 3, 4, 32, 32)
    level = unnormalise(views, spec)[:, 0, :, 16, 16]  # grey level of every frame of every view
    for v in range(6):
        want = [frame_level(t) for t in clip_frame_indices(n, spec)[v // 2]]
        assert (level[v] - torch.tensor(want)).abs().max() <= 2, (v, level[v], want)


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="clips"):
        ViewSpec(clips=0)
    with pytest.raises(ValueError, match="duration"):
        clip_frame_indices(0, ViewSpec())
    with pytest.raises(ValueError, match="uint8"):
        views_from_frames(np.zeros((2, 8, 8, 3), np.float32), [[0]], ViewSpec(num_frames=1, input_size=8))


def test_video_views_when_decord_fails_part_way(monkeypatch):
    """decord fails after choosing its frames (get_batch raises): the PyAV fallback chooses again, and the
    views are those of its frame count, not both backends' choices stacked (which raised "indices must be")."""
    import decord

    n = 20
    data = encode_mp4(video_frames(0, n, 64, 32, "index"), fps=25, crf=10, gop=8)
    spec = ViewSpec(num_frames=4, sampling_rate=2, input_size=32, clips=2, crops=1)

    class Failing(decord.VideoReader):
        def get_batch(self, indices):
            raise RuntimeError("simulated decord failure")

    monkeypatch.setattr(decord, "VideoReader", Failing)
    views = video_views(data, spec, key="v")
    assert views.shape == (2, 3, 4, 32, 32)
    level = unnormalise(views, spec)[:, 0, :, 16, 16]
    for v in range(2):
        want = [frame_level(t) for t in clip_frame_indices(n, spec)[v]]
        assert (level[v] - torch.tensor(want)).abs().max() <= 2, (v, level[v], want)
