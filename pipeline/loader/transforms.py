"""VideoMAE's pretraining augmentation on uint8 frame tensors, driven by an explicit ``torch.Generator``.

The official loader (TSN's ``GroupMultiScaleCrop`` on PIL images, then ``GroupNormalize``) draws from Python's
global ``random``; here every draw comes from a generator the caller seeds per sample, so an augmentation does
not depend on which worker made it or when (needed for exact resume). The crop is applied with
``torchvision.transforms.v2.functional`` to the whole clip at once (same crop for every frame).

Legend: ``T`` frames, ``C`` = 3 RGB channels, ``H, W`` pixels, ``S`` = ``input_size``. Inputs are uint8
``[T, C, H, W]``; :func:`crop_clip` gives uint8 ``[C, T, S, S]`` (the training loader's clips) and
:func:`normalize` (``pipeline.loader.normalize``, re-exported here) turns uint8 into ImageNet-normalised
float32 wherever the tensor lives (the training device); :func:`apply_crop` is both at once on the CPU (the float path of evaluation and the baselines).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

# the normalisation lives in a torchvision-free module (the model imports it); re-exported for existing users
from pipeline.loader.normalize import IMAGENET_MEAN, IMAGENET_STD, model_input, normalize  # noqa: F401

VIDEOMAE_SCALES = (1.0, 0.875, 0.75, 0.66)
# the default frame stride of a clip (official: 4 for Kinetics-like data, 2 for SSv2-like); a per-run setting of
# the data (training loader, eval views, embedding views each take one), with this one default
SAMPLING_RATE = 4


@dataclasses.dataclass(frozen=True)
class Crop:
    """A crop box in pixels of the source frame, plus whether the clip is mirrored after resizing."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False


def multiscale_crop_candidates(
    width: int, height: int, input_size: int, scales: Sequence[float], *, max_distort: int = 1
) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]]]:
    """The official ``GroupMultiScaleCrop`` candidate set for a ``width`` x ``height`` frame.

    Returns ``(sizes, offsets)``: ``sizes[i] = (crop_w, crop_h)`` pairs whose scale indices differ by at most
    ``max_distort`` (a side within 3 px of ``input_size`` snaps to it), and ``offsets[i]`` the 13 fixed
    ``(left, top)`` positions (corners, centre, edge centres, quarter points) for that size, duplicates kept
    as in the original so the draw has the same distribution.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    base = min(width, height)
    crop = [int(base * s) for s in scales]
    crop_h = [input_size if abs(c - input_size) < 3 else c for c in crop]
    crop_w = [input_size if abs(c - input_size) < 3 else c for c in crop]
    sizes = [
        (w, h)
        for i, h in enumerate(crop_h)
        for j, w in enumerate(crop_w)
        if abs(i - j) <= max_distort and 0 < w <= width and 0 < h <= height
    ]
    if not sizes:
        raise ValueError(f"no crop of scales {tuple(scales)} fits a {width}x{height} frame")
    offsets = []
    for w, h in sizes:
        ws, hs = (width - w) // 4, (height - h) // 4
        grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0)]
        grid += [(1, 1), (3, 1), (1, 3), (3, 3)]
        offsets.append([(a * ws, b * hs) for a, b in grid])
    return sizes, offsets


def sample_crop(
    width: int,
    height: int,
    *,
    input_size: int,
    scales: Sequence[float] = VIDEOMAE_SCALES,
    flip: bool = True,
    generator: torch.Generator,
) -> Crop:
    """Draw one multi-scale crop (size uniform over candidates, then position uniform over the 13 offsets)
    and, when ``flip`` is allowed, a horizontal flip with probability 1/2."""
    sizes, offsets = multiscale_crop_candidates(width, height, input_size, scales)
    i = int(torch.randint(len(sizes), (), generator=generator))
    j = int(torch.randint(len(offsets[i]), (), generator=generator))
    mirrored = bool(torch.rand((), generator=generator) < 0.5) if flip else False
    (w, h), (left, top) = sizes[i], offsets[i][j]
    return Crop(top=top, left=left, height=h, width=w, flip=mirrored)


def crop_clip(frames_TCHW: torch.Tensor, crop: Crop, *, input_size: int) -> torch.Tensor:
    """Crop, resize to ``input_size`` (bilinear with antialias, like PIL's) and flip, staying uint8 (what the
    training loader ships: 4x fewer bytes to collate, pin and copy than float32). uint8 ``[T, C, H, W]`` ->
    uint8 ``[C, T, S, S]``, a view of the resize's output: channels-last frames (``[T, S, S, C]`` in memory)
    when the input is (decoded ``[T, H, W, C]`` frames, permuted), so nothing is transposed on the CPU;
    :func:`stack_clips` keeps that layout and :func:`model_input` finishes the clip on the training
    device."""
    if frames_TCHW.dtype != torch.uint8 or frames_TCHW.ndim != 4 or frames_TCHW.shape[1] != 3:
        raise ValueError(
            f"frames must be uint8 [T, 3, H, W], got {frames_TCHW.dtype} {tuple(frames_TCHW.shape)}"
        )
    x = tvF.resized_crop(
        frames_TCHW,
        crop.top,
        crop.left,
        crop.height,
        crop.width,
        [input_size, input_size],
        interpolation=InterpolationMode.BILINEAR,
        antialias=True,
    )
    if crop.flip:
        x = tvF.horizontal_flip(x)
    return x.permute(1, 0, 2, 3)


def stack_clips(clips: Sequence[torch.Tensor]) -> torch.Tensor:
    """Clips ``[..., C, T, S, S]`` (``[C, T, S, S]`` or batches of them) -> one ``[N, C, T, S, S]`` tensor, a
    view of a contiguous ``[N, T, S, S, C]`` buffer: copied frame by frame in the layout :func:`crop_clip`
    leaves them in (a transposing copy costs ~2 ms per 16x224^2 clip on one core; the device does it free)."""
    frames_NTSSC = [c.reshape(-1, *c.shape[-4:]).permute(0, 2, 3, 4, 1) for c in clips]  # views, no copy
    return torch.cat(frames_NTSSC).permute(0, 4, 1, 2, 3)


def apply_crop(
    frames_TCHW: torch.Tensor,
    crop: Crop,
    *,
    input_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """The float path (the official loader's order: crop, resize, flip, scale to [0, 1], normalise, on the
    CPU): uint8 ``[T, C, H, W]`` -> float32 ``[C, T, S, S]``."""
    return normalize(crop_clip(frames_TCHW, crop, input_size=input_size).contiguous(), mean=mean, std=std)
