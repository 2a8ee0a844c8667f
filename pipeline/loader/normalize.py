"""ImageNet pixel normalisation: the constants and the uint8 -> float32 step the model's input takes.

Why a module of its own: the model (``model.videomae`` un-normalises its target with these constants), the
training loop and the loaders all need them, and the model must not import torchvision
(``pipeline.loader.transforms`` does, for its crops). Pure torch; ``transforms`` re-exports everything here.

Legend: ``C`` = 3 RGB channels, ``T`` frames, ``H, W`` pixels; channels are dim -4 (``[C, T, H, W]`` or
``[B, C, T, H, W]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per RGB channel, of pixels in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(
    video: torch.Tensor, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 pixels -> float32 ``(x / 255 - mean) / std`` per channel, on the tensor's device. The same
    operations, in the same order, as torchvision's ``to_dtype(scale=True)`` + ``normalize``, so the result
    equals the float path's."""
    if video.dtype != torch.uint8 or video.ndim < 4 or video.shape[-4] != len(mean):
        raise ValueError(
            f"video must be uint8 [..., {len(mean)}, T, H, W], got {video.dtype} {tuple(video.shape)}"
        )
    m = torch.as_tensor(mean, dtype=torch.float32, device=video.device).view(-1, 1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=video.device).view(-1, 1, 1, 1)
    return video.to(torch.float32).mul_(1.0 / 255).sub_(m).div_(s)


def model_input(video: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A batch's video as the model takes it, on ``device``: uint8 pixels (the training loader's) are copied
    there (a quarter of float32's bytes) and normalised there in float32 (under bf16 autocast the first
    matmul casts; the pretraining target keeps float32 pixels); a floating video is already normalised
    (the float path) and is only moved."""
    video = video.to(device, non_blocking=True)
    return normalize(video.contiguous()) if video.dtype == torch.uint8 else video
