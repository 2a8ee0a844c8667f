"""Motion-guided masks from the codec's own motion vectors: masked tubes that follow what moves.

Why: a tube mask (:func:`pipeline.loader.masking.tube_mask`) hides the same positions in every time slice, so
a moving object slides out of its masked tube and the model can copy it from a neighbouring slice. Fan et al.,
"Motion-Guided Masking for Spatiotemporal Representation Learning" (ICCV 2023) move the masks along the motion
vectors the compressed stream already holds (MGMAE, Huang et al. ICCV 2023, does the same with optical flow,
which costs a flow network). H.264 stores one vector per (sub-)macroblock for every inter-coded frame; FFmpeg
exports them as frame side data (``flags2=+export_mvs``), so they cost a decode, not an estimation.

Three steps, each usable alone:

- :func:`decode_motion`: the vectors of the frames around a clip -> :class:`VideoMotion` (pixels, frames).
  Its own decode pass (the loader's PyAV path decodes the same reference frames and could export them too).
  Only reference frames are decoded (``skip_frame=NONREF``, as the loader skips frames it does not show):
  their intervals to their references tile the time axis, so the skipped B-frames add no coverage. A vector
  says where a block was in its reference frame, not which reference (FFmpeg does not export the index): the
  reference is taken to be the nearest already-decoded reference frame before (list 0) / after (list 1) in
  display order, x264's first reference with ``ref=1`` (its ``veryfast`` preset, the shards'); with more
  references a vector to an older frame reads as faster motion.
  :func:`collect_motion` is its second half, for vectors exported from another decode pass.
- :func:`motion_field`: :class:`VideoMotion` + the clip's frame indices + its crop -> float ``[t-1, h, w, 2]``,
  the mean displacement ``(dx, dy)`` in tokens of the content at each token of tubelet ``k`` until tubelet
  ``k+1`` (after crop, resize and flip). I-frames and intra blocks carry no vector: a token no vector lands
  on gets zero motion.
- :func:`motion_masks`: field + ratio + generator -> bool ``[L]`` with exactly the tube mask's count.

Legend: ``t, h, w`` token grid, ``L = t*h*w`` (tokens ordered ``(t, h, w)``), True = masked; ``N`` vectors.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import av
import numpy as np
import torch
from av.sidedata.sidedata import Type

from pipeline.loader.masking import tube_mask
from pipeline.loader.transforms import Crop


@dataclasses.dataclass(frozen=True, eq=False)
class VideoMotion:
    """Block motion of a video, one row per exported vector: the content of a ``block_w`` x ``block_h`` pixel
    block centred at ``(x, y)`` (pixels, in frame ``lo``) moves by ``(dx, dy)`` pixels from frame ``lo`` to
    frame ``hi > lo``, where ``(lo, hi) = spans[group]`` (display indices: frame ``i`` is the ``i``-th in
    presentation order; one span per frame and reference list). Row arrays ``[N]``, ``spans`` int ``[G, 2]``;
    ``width, height``: the frame size in pixels."""

    spans: np.ndarray
    group: np.ndarray
    x: np.ndarray
    y: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    block_w: np.ndarray
    block_h: np.ndarray
    width: int
    height: int


def decode_motion(data: bytes, frame_indices: Sequence[int]) -> VideoMotion:
    """The motion of a clip's frames ``frame_indices``: the vectors of every reference frame decoded from the
    key frame before ``min(frame_indices)`` until one shown at or after ``max(frame_indices)`` comes out, those
    whose spans reach into ``(min, max]``, as one :class:`VideoMotion` (:func:`collect_motion`).

    Frames are indexed as :func:`pipeline.loader.decode.read_clip_frames` indexes them (the ``i``-th packet in
    presentation order); ``ValueError`` for indices outside the video.
    """
    with av.open(io.BytesIO(data)) as inp:
        stream = inp.streams.video[0]
        codec = stream.codec_context
        codec.thread_count = 1
        codec.options = {"flags2": "+export_mvs"}
        codec.skip_frame = "NONREF"
        packets = [p for p in inp.demux(stream) if p.size and not p.is_discard and p.pts is not None]
        shown = {pts: i for i, pts in enumerate(sorted(p.pts for p in packets))}
        if not frame_indices or min(frame_indices) < 0 or max(frame_indices) >= len(shown):
            raise ValueError(f"frame indices must lie in [0, {len(shown)}), got {list(frame_indices)!r}")
        first, last = min(frame_indices), max(frame_indices)
        start = max((k for k, p in enumerate(packets) if p.is_keyframe and shown[p.pts] <= first), default=0)
        decode_pos = {shown[p.pts]: k for k, p in enumerate(packets)}
        width, height = codec.width, codec.height
        frames: dict[int, np.ndarray | None] = {}  # display index -> vectors (None: intra frame)
        for packet in [*packets[start:], None]:
            for frame in codec.decode(packet):
                mv = frame.side_data.get(Type.MOTION_VECTORS)
                frames[shown[frame.pts]] = None if mv is None else mv.to_ndarray()
            if frames and max(frames) >= last:
                break
    return collect_motion(frames, set(frames), decode_pos, (first, last), width=width, height=height)


def collect_motion(
    frames: dict[int, np.ndarray | None],
    references: set[int],
    decode_pos: dict[int, int],
    clip: tuple[int, int],
    *,
    width: int,
    height: int,
) -> VideoMotion:
    """The vectors of decoded ``frames`` (display index -> FFmpeg's ``AVMotionVector`` records as PyAV's
    ``to_ndarray`` gives them, ``None`` for none) whose spans reach into ``(clip[0], clip[1]]``, as one
    :class:`VideoMotion`. ``references``: the decoded frames that are reference frames (all of them when
    non-reference frames were skipped); ``decode_pos``: display index -> position in decode order. A decode
    pass that also shows non-reference frames (the loader's) passes only the reference ones in
    ``references``: a non-reference frame is never the reference of another.
    """
    first, last = clip
    spans: list[tuple[int, int]] = []  # one per frame and reference list that reaches into the clip
    parts, groups = [], []
    for i, mv in frames.items():
        if mv is None or not len(mv):
            continue
        before = [j for j in references if decode_pos[j] < decode_pos[i]]  # the possible references
        past = max((j for j in before if j < i), default=None)
        future = min((j for j in before if j > i), default=None)
        ids = [-1, -1]
        for side, ref in enumerate((past, future)):
            if ref is not None and max(i, ref) > first and min(i, ref) < last:
                ids[side] = len(spans)
                spans.append((min(i, ref), max(i, ref)))
        if ids != [-1, -1]:
            parts.append(mv)
            groups.append(np.where(mv["source"] > 0, ids[1], ids[0]))
    if not parts:  # intra frames only
        none = np.zeros(0)
        return VideoMotion(spans=np.zeros((0, 2), np.int64), group=np.zeros(0, np.int64), x=none, y=none,
                           dx=none, dy=none, block_w=none, block_h=none, width=width,
                           height=height)  # fmt: skip
    mv, group = np.concatenate(parts), np.concatenate(groups)
    mv, group = mv[group >= 0], group[group >= 0]
    # list 0 (source < 0): the block at dst was at src in the earlier reference, so it moved
    # dst - src = -motion since then; list 1: the block at dst is at src in the later one: it moves +motion
    ahead = mv["source"] > 0
    sign, scale = np.where(ahead, 1.0, -1.0), np.maximum(mv["motion_scale"], 1)
    return VideoMotion(spans=np.array(spans, np.int64).reshape(-1, 2), group=group.astype(np.int64),
                       x=np.where(ahead, mv["dst_x"], mv["src_x"]).astype(np.float64),
                       y=np.where(ahead, mv["dst_y"], mv["src_y"]).astype(np.float64),
                       dx=sign * mv["motion_x"] / scale, dy=sign * mv["motion_y"] / scale,
                       block_w=mv["w"].astype(np.float64), block_h=mv["h"].astype(np.float64),
                       width=width, height=height)  # fmt: skip


def motion_field(
    motion: VideoMotion,
    frame_indices: Sequence[int],
    crop: Crop,
    *,
    grid: tuple[int, int, int],
    tubelet_size: int,
) -> np.ndarray:
    """Per-token motion of one clip: float32 ``[t-1, h, w, 2]``, ``[k, i, j] = (dx, dy)`` in tokens, the mean
    displacement of the content at token ``(i, j)`` of tubelet ``k`` until tubelet ``k+1``.

    Tubelet ``k`` starts at source frame ``a = frame_indices[k*tubelet_size]``, the next at ``b``; each vector
    whose interval ``(lo, hi]`` overlaps ``(a, b]`` votes its velocity ``(dx, dy) / (hi - lo)`` for every token
    its block covers, weighted by the area covered times the frames overlapped, and the token's displacement
    is ``(b - a)`` times the weighted mean (zero where no vector votes). ``crop`` is the clip's box in source
    pixels, resized to the ``h x w`` token grid (so a token spans ``crop.width / w`` source pixels) and
    mirrored when ``crop.flip`` (columns reversed, ``dx`` negated).
    """
    t, h, w = grid
    if len(frame_indices) != t * tubelet_size:
        raise ValueError(f"{len(frame_indices)} frame indices for {t} tubelets of {tubelet_size} frames")
    starts = np.asarray(frame_indices[::tubelet_size], np.int64)
    a, b = starts[:-1], starts[1:]  # [t-1] spans (a, b]
    m, sx, sy, hw = motion, w / crop.width, h / crop.height, h * w  # sx, sy: tokens per source pixel
    lo, hi = m.spans[:, :1], m.spans[:, 1:]
    overlap = np.clip(np.minimum(hi, b[None]) - np.maximum(lo, a[None]), 0, None).astype(float)  # [G, t-1]
    x0, y0 = (m.x - m.block_w / 2 - crop.left) * sx, (m.y - m.block_h / 2 - crop.top) * sy  # token units
    x1, y1 = x0 + m.block_w * sx, y0 + m.block_h * sy
    keep = overlap.any(1)[m.group] & (x1 > 0) & (x0 < w) & (y1 > 0) & (y0 < h)
    group, x0, x1, y0, y1 = m.group[keep], x0[keep], x1[keep], y0[keep], y1[keep]
    cols, cover_x = _cover(x0, x1, w)  # [n, kx]: the token columns each block touches, and how much
    rows, cover_y = _cover(y0, y1, h)
    n, s = len(x0), rows.shape[1] * cols.shape[1]
    slot = (group[:, None] * hw + (rows[:, :, None] * w + cols[:, None, :]).reshape(n, s)).ravel()
    area = (cover_y[:, :, None] * cover_x[:, None, :]).reshape(n, s)  # [n, S] block area in each token
    length = (m.spans[:, 1] - m.spans[:, 0])[group]
    velocity = (m.dx[keep] / length * sx, m.dy[keep] / length * sy)  # tokens per frame
    size = len(m.spans) * hw
    per_span = [np.bincount(slot, area.ravel(), size)]  # per (span, token): area, then area x velocity
    per_span += [np.bincount(slot, (area * v[:, None]).ravel(), size) for v in velocity]
    total, vx, vy = (overlap.T @ q.reshape(-1, hw) for q in per_span)  # [t-1, hw], x frames overlapped
    field = np.stack([np.divide(v, total, out=np.zeros_like(v), where=total > 0) for v in (vx, vy)], -1)
    field = field.reshape(t - 1, h, w, 2) * (b - a)[:, None, None, None]
    if crop.flip:
        field = field[:, :, ::-1] * np.array([-1.0, 1.0])
    return np.ascontiguousarray(field, np.float32)


def motion_masks(field: np.ndarray | torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Masks that follow ``field`` (``[t-1, h, w, 2]``, :func:`motion_field`): bool ``[t*h*w]``, True = masked,
    exactly ``t * round(ratio*h*w)`` True (the tube count, ``num_masked(t, h, w, ratio, "tube")``).

    Tubelet 0 is the tube mask's spatial draw (the same ``generator`` calls, nothing else is drawn: with a zero
    field the result *is* ``tube_mask(1, t, h, w, ratio, generator)[0]``). Each masked token is then a particle
    at a real-valued position, moved by the field at its cell from each tubelet to the next and placed at its
    rounded (half up) position. Positions wrap around the borders: under a pan, masks leaving one side
    re-enter on the side where new content enters, so every time slice keeps the same density (clamping would
    pile them up on one side and leave the other visible). When particles land on one cell the one nearest to
    it keeps it; each other one (in particle order) takes the free cell nearest to its position (torus
    distance, lowest index on ties) and restarts from there, so the count stays exact.
    """
    field = np.asarray(field.cpu() if isinstance(field, torch.Tensor) else field, np.float64)
    if field.ndim != 4 or field.shape[-1] != 2 or not np.isfinite(field).all():
        raise ValueError(f"motion field must be a finite [t-1, h, w, 2] array, got shape {field.shape}")
    t, h, w = field.shape[0] + 1, field.shape[1], field.shape[2]
    first = tube_mask(1, 1, h, w, ratio, generator)[0].numpy()
    cells = np.flatnonzero(first)
    y, x = (cells // w).astype(np.float64), (cells % w).astype(np.float64)
    out = np.zeros((t, h * w), bool)
    out[0, cells] = True
    for k in range(t - 1):
        move = field[k, cells // w, cells % w]
        y, x = (y + move[:, 1]) % h, (x + move[:, 0]) % w
        cells, kept = _place(y, x, h, w)
        out[k + 1, cells] = True
        y, x = np.where(kept, y, cells // w), np.where(kept, x, cells % w)
    return torch.from_numpy(out.reshape(-1))


def _cover(lo: np.ndarray, hi: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Intervals ``[lo, hi)`` (``[N]``, token units) -> the token indices each may touch (``[N, k]``, clipped
    into ``[0, n)``) and the length of the interval inside each (``[N, k]``, 0 outside the grid)."""
    k = int(np.ceil((hi - lo).max(initial=0))) + 1
    idx = np.floor(lo).astype(np.int64)[:, None] + np.arange(k)
    cover = np.clip(np.minimum(hi[:, None], idx + 1) - np.maximum(lo[:, None], idx), 0, None)
    cover[(idx < 0) | (idx >= n)] = 0
    return np.clip(idx, 0, n - 1), cover


def _torus(d: np.ndarray, n: int) -> np.ndarray:
    d = np.abs(d) % n
    return np.minimum(d, n - d)


def _place(y: np.ndarray, x: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct cells (flat indices) for particles at ``(y, x)`` and whether each got its own rounded cell
    (collisions resolved as :func:`motion_masks` says)."""
    want = (np.floor(y + 0.5) % h).astype(np.int64) * w + (np.floor(x + 0.5) % w).astype(np.int64)
    dist = _torus(y - want // w, h) ** 2 + _torus(x - want % w, w) ** 2
    order = np.lexsort((np.arange(len(want)), dist, want))  # by cell, then nearest, then particle
    keep = np.zeros(len(want), bool)
    keep[order[np.r_[True, want[order][1:] != want[order][:-1]]]] = True
    cells = want.copy()
    taken = np.zeros(h * w, bool)
    taken[want[keep]] = True
    gy, gx = np.divmod(np.arange(h * w), w)
    for p in np.flatnonzero(~keep):
        d = _torus(gy - y[p], h) ** 2 + _torus(gx - x[p], w) ** 2
        d[taken] = np.inf
        cells[p] = int(np.argmin(d))
        taken[cells[p]] = True
    return cells, keep
