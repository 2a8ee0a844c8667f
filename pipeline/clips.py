"""One video's bytes -> ``num_sample`` augmented clips and their token masks, reproducible per sample.

Why per-sample generators: every random draw for a sample (temporal start, crop, flip, mask) comes from a
``torch.Generator`` seeded by ``(seed, epoch, key, stream)``. The result therefore does not depend on the
worker, the world size or the position in the epoch, which is what lets a resumed (or elastically re-split)
run produce bit-identical clips.

Repeated sampling (VideoMAE V2): the frames are decoded once; each of the ``num_sample`` clips gets its own
crop, flip and mask.

Legend: ``R`` = num_sample, ``C`` = 3, ``T`` = num_frames, ``S`` = input_size,
``L`` = (T / tubelet_size) * (S / patch_size)**2 tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from model import random_mask, tube_mask
from pipeline.decode import BadSample, parse_label, read_clip_frames
from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, VIDEOMAE_SCALES, apply_crop, sample_crop

MASK_TYPES = ("tube", "random", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipSpec:
    """What a clip is: the part of :class:`pipeline.loader.LoaderConfig` the per-sample code needs."""

    num_frames: int = 16
    sampling_rate: int = 4
    input_size: int = 224
    patch_size: int = 16
    tubelet_size: int = 2
    mask_ratio: float = 0.9
    mask_type: str = "tube"
    num_sample: int = 1
    flip: bool = True
    scales: tuple[float, ...] = VIDEOMAE_SCALES
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    min_frames: int = 1

    def __post_init__(self) -> None:
        for name in ("num_frames", "sampling_rate", "input_size", "patch_size", "tubelet_size", "num_sample"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.min_frames, int) or self.min_frames < 1:
            raise ValueError(f"min_frames must be an int >= 1, got {self.min_frames!r}")
        if self.num_frames % self.tubelet_size:
            raise ValueError(
                f"num_frames={self.num_frames} is not a multiple of tubelet_size={self.tubelet_size}"
            )
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size={self.input_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {self.mask_type!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not self.scales or any(not 0 < s <= 1 for s in self.scales):
            raise ValueError(f"scales must be a non-empty list of values in (0, 1], got {self.scales!r}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {getattr(self, name)!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std!r}")

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """(t, h, w) tokens of one clip."""
        side = self.input_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side

    @property
    def num_tokens(self) -> int:
        t, h, w = self.token_grid
        return t * h * w


def sample_generator(seed: int, epoch: int, key: str, stream: str) -> torch.Generator:
    """A CPU generator seeded from a hash of ``(seed, epoch, key, stream)`` (stable across processes and
    Python versions, unlike ``hash()``)."""
    digest = hashlib.blake2b(f"{seed}\x1f{epoch}\x1f{key}\x1f{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def sample_frame_indices(
    duration: int, num_frames: int, sampling_rate: int, generator: torch.Generator
) -> list[int]:
    """Frame indices of one clip, following the official VideoMAE train sampler (``num_segments=1``).

    The clip spans ``skip = num_frames * sampling_rate`` frames. If the video is at least that long, the start
    is uniform in ``[0, duration - skip]`` and frames are ``start + i * sampling_rate``. Otherwise the clip
    starts at 0 and stops advancing once the next step would reach the last frame (the official loop's
    condition ``offset + step < duration`` with 1-based offsets), so short videos repeat their last sampled
    frame. Returns ``num_frames`` indices in ``[0, duration)``.
    """
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    skip = num_frames * sampling_rate
    average = duration - skip + 1
    start = int(torch.randint(average, (), generator=generator)) if average > 0 else 0
    offset = start + 1  # the official code works with 1-based offsets
    out = []
    for _ in range(num_frames):
        out.append(offset - 1)
        if offset + sampling_rate < duration:
            offset += sampling_rate
    return out


def clip_masks(spec: ClipSpec, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One mask per generator: bool ``[len(generators), L]``, True = masked (``model.masking`` contract)."""
    t, h, w = spec.token_grid
    if spec.mask_type == "none":
        return torch.zeros(len(generators), t * h * w, dtype=torch.bool)
    fn = tube_mask if spec.mask_type == "tube" else random_mask
    return torch.cat([fn(1, t, h, w, spec.mask_ratio, g) for g in generators])


def make_clips(
    data: bytes, key: str, spec: ClipSpec, *, seed: int, epoch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``data`` (an MP4) once and cut ``num_sample`` clips from it.

    Returns ``(video_RCTSS float32, mask_RL bool)``. Raises :class:`pipeline.decode.BadSample` for
    undecodable or too-short videos.
    """
    g_time = sample_generator(seed, epoch, key, "time")
    frames_THWC, _, _ = read_clip_frames(
        data,
        lambda n: sample_frame_indices(n, spec.num_frames, spec.sampling_rate, g_time),
        key=key,
        min_frames=spec.min_frames,
    )
    frames_TCHW = torch.from_numpy(frames_THWC).permute(0, 3, 1, 2)
    height, width = frames_TCHW.shape[-2:]
    clips, mask_gens = [], []
    for r in range(spec.num_sample):
        g = sample_generator(seed, epoch, key, f"aug{r}")
        crop = sample_crop(
            width, height, input_size=spec.input_size, scales=spec.scales, flip=spec.flip, generator=g
        )
        clips.append(apply_crop(frames_TCHW, crop, input_size=spec.input_size, mean=spec.mean, std=spec.std))
        mask_gens.append(sample_generator(seed, epoch, key, f"mask{r}"))
    return torch.stack(clips), clip_masks(spec, mask_gens)


def collate_clips(
    group: Sequence[tuple[str, dict[str, Any] | BadSample]],
    spec: ClipSpec,
    *,
    seed: int,
    epoch: int,
    pad_id: str,
) -> dict[str, Any]:
    """``V`` shard samples -> one batch of ``B = V * R`` clips (keys: ``video, mask, label, valid, key,
    skipped``).

    A bad sample never stops training: its slots are refilled with copies of the batch's good clips (or,
    if none, zeros with a fresh mask drawn from ``pad_id``) marked ``valid`` False, so every batch has the
    same shape on every rank; ``skipped`` lists ``(key, reason)`` for the caller to count.
    """
    r = spec.num_sample
    videos, masks, labels, keys, valid, skipped = [], [], [], [], [], []
    for key, sample in group:
        try:
            if isinstance(sample, Exception):
                raise sample
            if "mp4" not in sample:
                raise BadSample(key, "no .mp4 member")
            label = parse_label(sample)
            v, m = make_clips(sample["mp4"], key, spec, seed=seed, epoch=epoch)
        except Exception as e:  # noqa: BLE001 - a bad sample is counted, never fatal
            skipped.append((key, e.reason if isinstance(e, BadSample) else f"{type(e).__name__}: {e}"))
            v, m, label = None, None, -1
        videos.append(v)
        masks.append(m)
        labels += [label] * r
        keys += [key] * r
        valid += [v is not None] * r
    good = [i for i, v in enumerate(videos) if v is not None]
    for n, i in enumerate(i for i, v in enumerate(videos) if v is None):
        if good:
            videos[i], masks[i] = videos[good[n % len(good)]], masks[good[n % len(good)]]
        else:
            videos[i] = torch.zeros(r, 3, spec.num_frames, spec.input_size, spec.input_size)
            masks[i] = clip_masks(
                spec, [sample_generator(seed, epoch, f"pad/{pad_id}/{i}", str(j)) for j in range(r)]
            )
    return {
        "video": torch.cat(videos),
        "mask": torch.cat(masks),
        "label": torch.tensor(labels, dtype=torch.int64),
        "valid": torch.tensor(valid, dtype=torch.bool),
        "key": keys,
        "skipped": skipped,
    }
