"""One video's bytes -> ``num_sample`` augmented clips and their token masks, reproducible per sample.

Why per-sample generators: every random draw for a sample (temporal start, crop, flip, mask) comes from a
``torch.Generator`` seeded by ``(seed, epoch, key, stream)``. The result therefore does not depend on the
worker, the world size or the position in the epoch, which is what lets a resumed (or elastically re-split)
run produce bit-identical clips.

Repeated sampling (VideoMAE V2): the frames are decoded once; each of the ``num_sample`` clips gets its own
crop, flip and mask.

Decoded-clip cache (``loader.cache``): a sample can also come :class:`Decoded` — every frame of its video,
decoded once and kept by the loader — and its clips are then cut from memory. The frames a clip takes are
the same either way (decoding is deterministic), so cached and uncached clips are bit-identical.

What a clip is (frames, size, tubelets, masks) comes from the model config as a
:class:`pipeline.loader.masking.ClipSpec`; how it is sampled and augmented (stride, repeats, flip, crop scales) from the
:class:`pipeline.loader.config.LoaderConfig`.

Decoder masks (VideoMAE V2 dual masking, ``spec.decoder_mask_type != "none"``): clip ``r`` of a sample draws its
decoder mask from stream ``dmask{r}``, so adding them leaves every other draw (and so every run without them)
unchanged; a batch then carries ``decoder_mask`` (bool ``[B, L]``, True = not reconstructed).

Legend: ``R`` = num_sample, ``C`` = 3, ``T`` = num_frames, ``S`` = input_size,
``L`` = (T / tubelet_size) * (S / patch_size)**2 tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.loader.config import LoaderConfig
from pipeline.loader.decode import BadSample, check_length, parse_label, read_clip_frames
from pipeline.loader.decoder_masking import decoder_masks
from pipeline.loader.masking import ClipSpec, clip_masks
from pipeline.loader.motion import VideoMotion, decode_motion, motion_field, motion_masks
from pipeline.loader.rand_augment import rand_augment, rand_augment_frames
from pipeline.loader.transforms import crop_clip, sample_crop, stack_clips


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


@dataclasses.dataclass(frozen=True, eq=False)
class Decoded:
    """A sample decoded once (the loader's cache): every frame of its video, uint8 ``[N, H, W, 3]``, and its
    label — or the :class:`BadSample` that says why it cannot become a clip (a verdict on the data itself)."""

    frames: np.ndarray | None
    label: int = -1
    error: BadSample | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self.frames is None else int(self.frames.nbytes)


def decode_sample(key: str, sample: dict[str, Any], *, backend: str = "auto") -> Decoded:
    """Every frame and the label of a shard sample, or the reason it is unusable."""
    try:
        if "mp4" not in sample:
            raise BadSample(key, "no .mp4 member")
        label = parse_label(sample)
        frames, _, _ = read_clip_frames(sample["mp4"], lambda n: range(n), key=key, backend=backend)
    except BadSample as e:
        return Decoded(frames=None, error=e)
    return Decoded(frames=frames, label=label)


def make_clips(
    source: bytes | np.ndarray, key: str, spec: ClipSpec, cfg: LoaderConfig, *, seed: int, epoch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``cfg.num_sample`` clips of ``spec`` from one video: ``source`` is its MP4 bytes (decoded once,
    only the frames the clip needs) or all of its decoded frames (uint8 ``[N, H, W, 3]``, the cache).

    Returns ``(video_RCTSS uint8, mask_RL bool)``: the ``R`` clips share one decode (each has its own crop,
    flip and mask); :func:`pipeline.loader.transforms.normalize` makes the float input on the training device.
    With ``cfg.rand_augment`` set, clip ``r`` first gets its own RandAugment of the whole frames, drawn from
    stream ``ra{r}`` (:mod:`pipeline.loader.rand_augment`), so every other draw is the same as without it.

    ``spec.mask_type == "motion"``: the clip's motion vectors are read once (a decode pass of their own,
    :func:`pipeline.loader.motion.decode_motion`) and clip ``r``'s mask follows them through its crop and flip,
    from the same stream ``mask{r}`` (a motionless clip gets exactly its tube mask). RandAugment's geometric
    ops move content the field does not see (the field is the unaugmented video's). It needs the bytes:
    decoded frames (``loader.cache``) are a ``ValueError``.
    Raises :class:`pipeline.loader.decode.BadSample` for undecodable or too-short videos.
    """
    motion = spec.mask_type == "motion"
    if motion and isinstance(source, np.ndarray):
        raise ValueError(
            f"sample {key!r}: mask_type motion reads the video's motion vectors, but loader.cache gave decoded "
            "frames; set loader.cache=false"
        )
    g_time = sample_generator(seed, epoch, key, "time")
    if isinstance(source, np.ndarray):
        check_length(key, len(source), cfg.min_frames)
        indices = sample_frame_indices(len(source), spec.num_frames, cfg.sampling_rate, g_time)
        frames_THWC = source[indices]
    else:
        frames_THWC, indices, _ = read_clip_frames(
            source,
            lambda n: sample_frame_indices(n, spec.num_frames, cfg.sampling_rate, g_time),
            key=key,
            min_frames=cfg.min_frames,
            backend=cfg.decode_backend,
        )
    vectors = _clip_motion(source, indices, key) if motion else None
    frames_TCHW = torch.from_numpy(frames_THWC).permute(0, 3, 1, 2)
    height, width = frames_TCHW.shape[-2:]
    ra = None if cfg.rand_augment is None else rand_augment(cfg.rand_augment, spec.input_size)
    clips, mask_gens, masks = [], [], []
    for r in range(cfg.num_sample):
        g = sample_generator(seed, epoch, key, f"aug{r}")
        crop = sample_crop(
            width, height, input_size=spec.input_size, scales=cfg.scales, flip=cfg.flip, generator=g
        )
        source_TCHW = frames_TCHW
        if ra is not None:  # the official order: RandAugment on the whole frames, then crop and flip
            augmented = rand_augment_frames(frames_THWC, ra, sample_generator(seed, epoch, key, f"ra{r}"))
            source_TCHW = torch.from_numpy(augmented).permute(0, 3, 1, 2)
        clips.append(crop_clip(source_TCHW, crop, input_size=spec.input_size))
        mask_gens.append(sample_generator(seed, epoch, key, f"mask{r}"))
        if vectors is not None:
            field = motion_field(vectors, indices, crop, grid=spec.token_grid, tubelet_size=spec.tubelet_size)
            masks.append(motion_masks(field, spec.mask_ratio, mask_gens[-1]))
    return stack_clips(clips), torch.stack(masks) if masks else clip_masks(spec, mask_gens)


def _clip_motion(data: bytes, indices: Sequence[int], key: str) -> VideoMotion:
    """The motion vectors around a clip's frames; a video whose frames decode but whose vectors do not is a
    :class:`BadSample` (skipped like an undecodable one)."""
    try:
        return decode_motion(data, indices)
    except Exception as e:  # noqa: BLE001 - any failure to read the vectors is a verdict on this file
        raise BadSample(key, f"motion vectors unreadable: {type(e).__name__}: {e}") from e


def clip_decoder_masks(
    spec: ClipSpec, key: str, count: int, *, seed: int, epoch: int, stream: str = "dmask"
) -> torch.Tensor | None:
    """Decoder masks of a sample's ``count`` clips, bool ``[count, L]`` (True = not reconstructed), clip ``r``
    from stream ``f"{stream}{r}"``; ``None`` when ``spec`` has no decoder mask. They depend on
    ``(seed, epoch, key)`` only, never on the video, so a resumed run draws the same."""
    if spec.decoder_mask_type == "none":
        return None
    gens = [sample_generator(seed, epoch, key, f"{stream}{r}") for r in range(count)]
    return decoder_masks(spec.token_grid, spec.decoder_mask_type, spec.decoder_mask_ratio, gens)


def collate_clips(
    group: Sequence[tuple[str, dict[str, Any] | Decoded | BadSample]],
    spec: ClipSpec,
    cfg: LoaderConfig,
    *,
    seed: int,
    epoch: int,
    pad_id: str,
) -> dict[str, Any]:
    """``V`` shard samples (or their :class:`Decoded` frames) -> one batch of ``B = V * R`` clips (keys:
    ``video`` uint8 ``[B, 3, T, S, S]``, ``mask, label, valid, key, skipped``, and ``decoder_mask`` bool
    ``[B, L]`` when ``spec`` has a decoder mask type).

    ``decoder_mask`` is absent, not a placeholder, without one: the model's forward takes ``None`` there (every
    masked token reconstructed, VideoMAE's computation, bit for bit), so the key's presence says which
    objective the batch trains.

    A bad sample never stops training: its slots are refilled with copies of the batch's good clips, their
    masks and labels (or, if none, zeros with label -1 and fresh masks drawn from ``pad_id``) marked ``valid``
    False, so every batch has the same shape on every rank; ``skipped`` lists ``(key, reason)`` for the caller
    to count.
    """
    r = cfg.num_sample
    videos, masks, dmasks, labels, keys, valid, skipped = [], [], [], [], [], [], []
    for key, sample in group:
        try:
            if isinstance(sample, Exception):
                raise sample
            if isinstance(sample, Decoded):
                if sample.error is not None:
                    raise sample.error
                label, source = sample.label, sample.frames
            else:
                if "mp4" not in sample:
                    raise BadSample(key, "no .mp4 member")
                label, source = parse_label(sample), sample["mp4"]
            v, m = make_clips(source, key, spec, cfg, seed=seed, epoch=epoch)
            d = clip_decoder_masks(spec, key, r, seed=seed, epoch=epoch)
        except Exception as e:  # noqa: BLE001 - a bad sample is counted, never fatal
            skipped.append((key, e.reason if isinstance(e, BadSample) else f"{type(e).__name__}: {e}"))
            v, m, d, label = None, None, None, -1
        videos.append(v)
        masks.append(m)
        dmasks.append(d)
        labels.append(label)
        keys += [key] * r
        valid += [v is not None] * r
    good = [i for i, v in enumerate(videos) if v is not None]
    for n, i in enumerate(i for i, v in enumerate(videos) if v is None):
        if good:
            src = good[n % len(good)]
            videos[i], masks[i], dmasks[i], labels[i] = videos[src], masks[src], dmasks[src], labels[src]
        else:
            videos[i] = torch.zeros(
                r, 3, spec.num_frames, spec.input_size, spec.input_size, dtype=torch.uint8
            )
            pad_key = f"pad/{pad_id}/{i}"
            masks[i] = clip_masks(spec, [sample_generator(seed, epoch, pad_key, str(j)) for j in range(r)])
            dmasks[i] = clip_decoder_masks(spec, pad_key, r, seed=seed, epoch=epoch)
    batch = {
        "video": stack_clips(videos),
        "mask": torch.cat(masks),
        "label": torch.tensor(labels, dtype=torch.int64).repeat_interleave(r),
        "valid": torch.tensor(valid, dtype=torch.bool),
        "key": keys,
        "skipped": skipped,
    }
    if spec.decoder_mask_type != "none":
        batch["decoder_mask"] = torch.cat(dmasks)
    return batch
