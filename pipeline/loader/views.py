"""Deterministic test-time views of one video: ``clips`` temporal clips x ``crops`` spatial crops.

Why a module of its own: multi-view testing (the VideoMAE protocol, e.g. 5 clips x 3 crops on Kinetics, 2 x 3
on SSv2) and feature extraction for probes must cut exactly the same views every time, on any worker, with no
randomness. The geometry follows the official ``VideoClsDataset`` test mode:

- Time: the video is read at stride ``sampling_rate`` from frame 0 (``range(0, duration, sampling_rate)``,
  padded with its last index up to ``num_frames``); clip ``i`` of ``clips`` takes ``num_frames`` consecutive
  strided frames starting at ``int(i * (n_strided - num_frames) / (clips - 1))``, so the clips are evenly
  spaced from the first to the last possible start (one clip: the centre start).
- Space: frames are resized so the short side is ``input_size`` (aspect kept, long side
  ``int(input_size * long / short)``); crop ``j`` of ``crops`` is an ``input_size`` square along the long side
  at ``int(j * (long - input_size) / (crops - 1))`` (left/centre/right, or top/centre/bottom for portrait
  video; one crop: the centre).

Views are ordered clip-major: ``view = clip * crops + crop``.

Legend: ``V`` = clips * crops views, ``C`` = 3, ``T`` = num_frames, ``S`` = input_size. Output views are
float32 ``[V, C, T, S, S]``, ImageNet-normalised like the training clips (``pipeline.loader.transforms``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

from pipeline.checks import positive_int
from pipeline.loader.decode import read_clip_frames
from pipeline.loader.normalize import IMAGENET_MEAN, IMAGENET_STD
from pipeline.loader.transforms import SAMPLING_RATE


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViewSpec:
    """Which views to cut: ``clips`` temporal x ``crops`` spatial, each a ``num_frames`` x ``input_size``^2 clip."""

    num_frames: int = 16
    sampling_rate: int = SAMPLING_RATE
    input_size: int = 224
    clips: int = 1
    crops: int = 1

    def __post_init__(self) -> None:
        for name in ("num_frames", "sampling_rate", "input_size", "clips", "crops"):
            positive_int(f"views.{name}", getattr(self, name))

    @property
    def num_views(self) -> int:
        return self.clips * self.crops

    @property
    def name(self) -> str:
        """``"{clips}x{crops}"``, the usual way papers name a multi-view protocol."""
        return f"{self.clips}x{self.crops}"


def _even_starts(span: int, count: int) -> list[int]:
    """``count`` integer starts spread evenly over ``[0, span]`` (``count == 1``: the centre)."""
    if count == 1:
        return [span // 2]
    return [int(i * span / (count - 1)) for i in range(count)]


def clip_frame_indices(duration: int, spec: ViewSpec) -> list[list[int]]:
    """Source frame indices of every temporal clip: ``clips`` lists of ``num_frames`` indices in
    ``[0, duration)`` (see the module docstring)."""
    if not isinstance(duration, int) or duration < 1:
        raise ValueError(f"duration must be a positive frame count, got {duration!r}")
    strided = list(range(0, duration, spec.sampling_rate))
    strided += [strided[-1]] * max(0, spec.num_frames - len(strided))
    starts = _even_starts(len(strided) - spec.num_frames, spec.clips)
    return [strided[s : s + spec.num_frames] for s in starts]


def resized_size(height: int, width: int, input_size: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to ``input_size`` (torchvision's rounding)."""
    if height < 1 or width < 1:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    if height <= width:
        return input_size, int(input_size * width / height)
    return int(input_size * height / width), input_size


def crop_offsets(height: int, width: int, spec: ViewSpec) -> list[tuple[int, int]]:
    """``(top, left)`` of every spatial crop in the *resized* frame (:func:`resized_size`)."""
    h, w = resized_size(height, width, spec.input_size)
    starts = _even_starts(max(h, w) - spec.input_size, spec.crops)
    return [(0, s) for s in starts] if w >= h else [(s, 0) for s in starts]


def views_from_frames(
    frames_NHWC: np.ndarray | torch.Tensor, indices: list[list[int]], spec: ViewSpec
) -> torch.Tensor:
    """Cut the views from decoded frames. ``frames_NHWC`` uint8 ``[N, H, W, 3]`` holds the frames that
    ``indices[clip][t]`` point into (positions in ``frames_NHWC``, not source frame numbers).
    Returns float32 ``[V, C, T, S, S]``, clip-major."""
    frames = torch.as_tensor(frames_NHWC)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if len(indices) != spec.clips or any(len(c) != spec.num_frames for c in indices):
        raise ValueError(f"indices must be {spec.clips} lists of {spec.num_frames} frame positions")
    height, width = frames.shape[1:3]
    size = resized_size(height, width, spec.input_size)
    x_NCHW = frames.permute(0, 3, 1, 2)
    if size != (height, width):
        x_NCHW = tvF.resize(x_NCHW, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    x_NCHW = tvF.normalize(
        tvF.to_dtype(x_NCHW, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD)
    )
    s = spec.input_size
    views = []
    for clip in indices:
        x_CTHW = x_NCHW[clip].permute(1, 0, 2, 3)
        for top, left in crop_offsets(height, width, spec):
            views.append(x_CTHW[:, :, top : top + s, left : left + s])
    return torch.stack(views).contiguous()


def video_views(data: bytes, spec: ViewSpec, *, key: str = "?") -> torch.Tensor:
    """Decode an in-memory video once (decord, PyAV fallback) and cut its views ``[V, C, T, S, S]``.

    Raises :class:`pipeline.loader.decode.BadSample` for a video neither backend decodes."""
    wanted: list[list[int]] = []

    def choose(n: int) -> list[int]:  # called again with the fallback backend's frame count: replace, not add
        wanted[:] = clip_frame_indices(n, spec)
        return sorted({i for clip in wanted for i in clip})

    frames, decoded, _ = read_clip_frames(data, choose, key=key)
    pos = {f: i for i, f in enumerate(decoded)}
    return views_from_frames(frames, [[pos[f] for f in clip] for clip in wanted], spec)
