"""RandAugment of the official VideoMAE finetuning loader, with timm's implementation, reproducible per clip.

What the official loader does (``kinetics.py`` ``VideoClsDataset._aug_frame``, once per repeated clip): the
clip's decoded frames become PIL images, ``video_transforms.create_random_augment`` builds a RandAugment from
``args.aa`` (default ``rand-m7-n4-mstd0.5-inc1``) with ``translate_const = int(0.45 * crop_size)`` and
``train_interpolation`` (default bicubic), and its video version of timm's ``AugmentOp`` draws each op's
choice, probability, magnitude and sign *once* and applies the same op to every frame of the list. Only then
does it crop (random resized crop), flip, and normalise. So RandAugment sees the whole decoded frame (a rotation
turns about the frame's centre, equalize uses the whole frame's histogram) and each of the ``num_sample`` clips
of a video gets its own draw.

How it is reproduced here: :func:`rand_augment_frames` applies timm's own ``RandAugment`` to each frame, and
before every frame it puts Python's and NumPy's global generators (the ones timm draws from) in the same state,
seeded from the clip's ``torch.Generator``. Every frame therefore replays the same draws — the official
once-per-clip choice — and no draw depends on the image, so the frames get identical ops. The caller's global
generator states are restored afterwards, so the draws depend only on ``(seed, epoch, key, clip)``, never on the
worker or on what else ran in the process (a resumed run makes the same clips), and a loader running inside the
training process leaves the trainer's own random streams (mixup, erasing) untouched.

timm is imported on first use (~0.8 s): pretraining loaders without RandAugment never pay it.

Legend: ``T`` frames, ``H, W`` pixels of the decoded frame, uint8 RGB ``[T, H, W, 3]``.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import numpy as np
import torch
from PIL import Image

TRANSLATE_FRACTION = 0.45  # official create_random_augment: translate_const = int(crop size * 0.45)
INTERPOLATION = Image.Resampling.BICUBIC  # official train_interpolation default


def _hparams(input_size: int) -> dict[str, Any]:
    return {"translate_const": int(input_size * TRANSLATE_FRACTION), "interpolation": INTERPOLATION}


@functools.lru_cache(maxsize=8)
def rand_augment(config: str, input_size: int) -> Any:
    """timm's ``RandAugment`` for ``config`` (e.g. ``rand-m7-n4-mstd0.5-inc1``) built as the official loader
    builds it for crops of ``input_size``. Raises ``ValueError`` for a string timm does not parse."""
    from timm.data.auto_augment import rand_augment_transform

    if not isinstance(config, str) or not (config == "rand" or config.startswith("rand-")):
        raise ValueError(
            f"loader.rand_augment must be a RandAugment string 'rand-...' or null, got {config!r}"
        )
    try:
        return rand_augment_transform(config, _hparams(input_size))
    except (AssertionError, ValueError, KeyError) as e:
        raise ValueError(f"loader.rand_augment {config!r} is not a timm RandAugment string: {e!r}") from e


def rand_augment_frames(frames_THWC: np.ndarray, transform: Any, generator: torch.Generator) -> np.ndarray:
    """One clip's frames through ``transform`` (from :func:`rand_augment`), the same op draws for every frame,
    seeded from ``generator``: uint8 ``[T, H, W, 3]`` -> a new uint8 ``[T, H, W, 3]``."""
    py_seed = int(torch.randint(1 << 62, (), generator=generator))
    np_seed = int(torch.randint(1 << 32, (), generator=generator))
    py_state = random.Random(py_seed).getstate()
    np_state = np.random.RandomState(np_seed).get_state()
    saved = random.getstate(), np.random.get_state()
    out = np.empty_like(frames_THWC)
    try:
        for t, frame in enumerate(frames_THWC):
            random.setstate(py_state)
            np.random.set_state(np_state)
            out[t] = np.asarray(transform(Image.fromarray(frame)))
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    return out
