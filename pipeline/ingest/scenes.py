"""Shot boundaries of a video, so a long video with hard cuts becomes one training clip per shot.

Why: a clip that spans a hard cut shows two unrelated scenes; a masked autoencoder cannot predict the second
from the first, and a probe learns nothing about motion from the jump. Cutting at fixed lengths
(``transcode.max_clip_s``) straddles cuts; cutting at shot boundaries does not.

The detector is PySceneDetect's ``ContentDetector`` (maintained, BSD): the mean absolute change of hue,
saturation and value between consecutive frames, a cut where it exceeds ``threshold`` (0..255 scale, its
default 27). It is fed the frames of the *output* timeline (after constant-rate resampling), small (long
side <= ``DETECT_SIDE``), so cut positions are output frame indices and the same on every run. Its own
minimum-scene filter is off: :func:`accept_cuts` applies the minimum shot length here, as a pure function
of the raw cut list (a flash or a dissolve fires on several frames in a row; only the first cut that leaves
both neighbouring shots at least ``min_frames`` long is kept).

Frames: uint8 BGR ``[H, W, 3]`` (OpenCV's order, what the detector expects).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

DETECT_SIDE = 256  # px: long side of the frames given to the detector (PySceneDetect's usual downscale)


def raw_cuts(frames_bgr: Iterable[np.ndarray], fps: float, *, threshold: float) -> list[int]:
    """Indices ``k`` (>= 1) of every frame whose content score against frame ``k - 1`` is >= ``threshold``."""
    # local import: scenedetect pulls in OpenCV (~0.5 s); only transcode.split=scenes uses it
    from scenedetect import ContentDetector
    from scenedetect.common import FrameTimecode

    if not threshold > 0:
        raise ValueError(f"scene threshold must be > 0, got {threshold}")
    detector = ContentDetector(threshold=threshold, min_scene_len=0)
    cuts: list[int] = []
    last = None
    for k, frame in enumerate(frames_bgr):
        last = FrameTimecode(k, fps=fps)
        cuts += [tc.frame_num for tc in detector.process_frame(last, frame)]
    if last is not None:
        cuts += [tc.frame_num for tc in detector.post_process(last)]
    return sorted({c for c in cuts if c > 0})


def accept_cuts(cuts: Iterable[int], num_frames: int, min_frames: int) -> list[int]:
    """Greedy, in order: keep cut ``c`` when the shot it closes (from the last kept cut) and the rest of the
    video after it are both at least ``min_frames`` long. A shorter shot stays part of its neighbour."""
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1, got {min_frames}")
    kept, last = [], 0
    for c in sorted(set(cuts)):
        if c - last >= min_frames and num_frames - c >= min_frames:
            kept.append(c)
            last = c
    return kept


def segments(
    cuts: list[int], num_frames: int, per_clip: int | None, min_frames: int
) -> list[tuple[int, int]]:
    """Clip ``[start, stop)`` frame ranges: the shots between ``cuts``, each cut into pieces of at most
    ``per_clip`` frames from its start; a piece shorter than ``min_frames`` (a shot's remainder) is left out."""
    bounds = [0, *cuts, num_frames]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        step = per_clip or (b - a)
        out += [(s, min(s + step, b)) for s in range(a, b, step) if min(s + step, b) - s >= min_frames]
    return out


__all__ = ["DETECT_SIDE", "accept_cuts", "raw_cuts", "segments"]
