"""Per-sample pieces of the loader against independent computations: frame indices (hand-derived from the
official sampler), multi-scale crop candidates (hand-computed), crop+resize+normalise (PIL), decoding and
the decord -> PyAV fallback."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.ingest.encode import encode_mp4
from pipeline.loader.clips import make_clips, sample_frame_indices, sample_generator
from pipeline.loader.config import LoaderConfig
from pipeline.loader.decode import BadSample, read_clip_frames
from pipeline.loader.masking import ClipSpec, tube_mask
from pipeline.loader.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Crop,
    apply_crop,
    multiscale_crop_candidates,
    normalize,
    sample_crop,
)
from tests.pipeline.shardset_helpers import frame_level, video_frames


def test_frame_indices_long_video_cover_every_start():
    # duration 100, 16 x stride 4 spans 64 frames: start uniform in [0, 36], then start + 4i
    starts = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        idx = sample_frame_indices(100, 16, 4, g)
        assert idx == [idx[0] + 4 * i for i in range(16)]
        starts.add(idx[0])
    assert starts == set(range(37))


def test_frame_indices_short_video_clamp_like_official():
    g = torch.Generator().manual_seed(0)
    # 40 frames < 64: start 0, step while offset+4 < 40 (1-based) -> 0..36 then repeats 36
    assert sample_frame_indices(40, 16, 4, g) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 36, 36, 36, 36, 36, 36]
    assert sample_frame_indices(5, 4, 2, g) == [0, 2, 2, 2]
    assert sample_frame_indices(1, 4, 2, g) == [0, 0, 0, 0]
    # exactly the span: only start 0 fits
    assert sample_frame_indices(8, 4, 2, g) == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="duration"):
        sample_frame_indices(0, 4, 2, g)


def test_crop_candidates_hand_computed():
    # 320x240 frame, 224 output: base 240 -> sizes int(240*s) = 240, 210, 180, 158 (none within 3 of 224)
    sizes, offsets = multiscale_crop_candidates(320, 240, 224, (1, 0.875, 0.75, 0.66))
    expected = [(240, 240), (210, 240), (240, 210), (210, 210), (180, 210), (210, 180), (180, 180), (158, 180),
                (180, 158), (158, 158)]  # fmt: skip
    assert sizes == expected
    # (w, h) = (240, 240): w_step = (320-240)//4 = 20, h_step = 0
    assert offsets[0][:5] == [(0, 0), (80, 0), (0, 0), (80, 0), (40, 0)]
    assert len(offsets[0]) == 13
    # a side within 3 px of the output size snaps to it: base 226 -> 226 -> 224
    sizes, _ = multiscale_crop_candidates(300, 226, 224, (1.0,))
    assert sizes == [(224, 224)]
    with pytest.raises(ValueError, match="no crop"):
        multiscale_crop_candidates(2, 2, 224, (0.3,))


def test_sample_crop_reproducible_and_flip_gated():
    a = sample_crop(320, 240, input_size=224, generator=torch.Generator().manual_seed(3))
    b = sample_crop(320, 240, input_size=224, generator=torch.Generator().manual_seed(3))
    assert a == b
    flips = {
        sample_crop(320, 240, input_size=224, generator=torch.Generator().manual_seed(s)).flip
        for s in range(40)
    }
    assert flips == {True, False}
    no = {sample_crop(320, 240, input_size=224, flip=False, generator=torch.Generator().manual_seed(s)).flip
          for s in range(40)}  # fmt: skip
    assert no == {False}


@pytest.mark.parametrize("flip", [False, True])
def test_apply_crop_matches_pil(flip):
    rng = np.random.default_rng(0)
    # smooth random image (PIL's and torchvision's bilinear filters agree to ~1 level on smooth content)
    small = rng.integers(0, 256, (3, 12, 16, 3)).astype(np.float32)
    frames = np.stack(
        [np.asarray(Image.fromarray(f.astype(np.uint8)).resize((160, 120), Image.BICUBIC)) for f in small]
    )
    crop = Crop(top=10, left=30, height=100, width=90, flip=flip)
    out = apply_crop(torch.from_numpy(frames).permute(0, 3, 1, 2), crop, input_size=64)
    assert out.shape == (3, 3, 64, 64) and out.dtype == torch.float32
    for t in range(3):
        img = Image.fromarray(frames[t]).crop((30, 10, 120, 110)).resize((64, 64), Image.BILINEAR)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        ref = (np.asarray(img, np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
        got = out[:, t].permute(1, 2, 0).numpy()
        assert np.abs(got - ref).mean() < 1.5 / 255 / 0.225
        assert np.abs(got - ref).max() < 6 / 255 / 0.224


def test_apply_crop_rejects_bad_frames():
    with pytest.raises(ValueError, match="uint8"):
        apply_crop(torch.zeros(2, 3, 8, 8), Crop(0, 0, 8, 8), input_size=8)


def test_decode_fallback_to_pyav_on_decord_width_quirk():
    frames = video_frames(0, 10, 48, 32, "index")  # 48 px wide: decord 0.6 mis-decodes this width
    data = encode_mp4(frames, fps=25, crf=10)
    out, idx, backend = read_clip_frames(data, lambda n: [0, 3, n - 1], backend="decord")
    assert backend == "full" and idx == [0, 3, 9]
    assert np.abs(out[:, 5, 5, 0].astype(int) - [frame_level(i) for i in idx]).max() <= 2
    data64 = encode_mp4(video_frames(0, 10, 64, 32, "index"))
    out64, _, backend64 = read_clip_frames(data64, lambda n: [2], backend="decord")
    assert backend64 == "decord" and out64.shape == (1, 32, 64, 3)
    assert read_clip_frames(data, lambda n: [0, 3, n - 1])[2] == "pyav"  # the default backend reads it


def test_decode_bad_inputs_raise_bad_sample():
    with pytest.raises(BadSample, match="undecodable"):
        read_clip_frames(b"\x00junk" * 100, lambda n: [0], key="k")
    with pytest.raises(BadSample, match="empty"):
        read_clip_frames(b"", lambda n: [0], key="k")
    data = encode_mp4(video_frames(0, 6, 64, 32, "index"))
    with pytest.raises(BadSample, match="too short"):
        read_clip_frames(data, lambda n: [0], key="k", min_frames=8)


def test_make_clips_values_indices_and_masks():
    """Flat frames with a known grey level per frame: the clip must hold the levels of the frames the
    official sampler picks, normalised per channel, and the masks of ``pipeline.loader.masking.tube_mask``."""
    spec = ClipSpec(
        num_frames=4, input_size=32, patch_size=16, tubelet_size=2, mask_ratio=0.5, mask_type="tube"
    )
    aug = LoaderConfig(manifest="unused", sampling_rate=3, num_sample=3, batch_size=3)
    data = encode_mp4(video_frames(0, 30, 64, 48, "index"), fps=25, crf=10)
    video, mask = make_clips(data, "vidA", spec, aug, seed=7, epoch=2)
    assert video.shape == (3, 3, 4, 32, 32) and video.dtype == torch.uint8
    video = normalize(video)
    assert mask.shape == (3, 8) and mask.dtype == torch.bool
    expected_idx = sample_frame_indices(30, 4, 3, sample_generator(7, 2, "vidA", "time"))
    assert expected_idx == [expected_idx[0] + 3 * i for i in range(4)] and 0 <= expected_idx[0] <= 18
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None], torch.tensor(IMAGENET_STD)[:, None]
    for r in range(3):
        levels = (video[r].mean(dim=(2, 3)) * std + mean) * 255  # [C, T]: back to grey levels
        want = torch.tensor([frame_level(i) for i in expected_idx], dtype=torch.float32)
        assert (levels - want).abs().max() < 2.5
        assert video[r].std(dim=(2, 3)).max() < 0.05  # flat frames stay flat through crop and resize
        g = sample_generator(7, 2, "vidA", f"mask{r}")
        assert torch.equal(mask[r], tube_mask(1, 2, 2, 2, 0.5, g)[0])
    # same key, other epoch: other start frame or crop, other masks
    video2, mask2 = make_clips(data, "vidA", spec, aug, seed=7, epoch=3)
    again, _ = make_clips(data, "vidA", spec, aug, seed=7, epoch=2)
    again = normalize(again)
    assert torch.equal(again, video) and not torch.equal(mask2, mask)
