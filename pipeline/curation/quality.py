"""Per-video quality metrics for curation, computed from a few sampled frames (not all) for speed.

Why these: each catches a way real video data goes bad and is cheap enough to run over every sample.

* motion (mean |dY| between consecutive sampled frames, luma levels 0..255) and the fraction of pixels
  that change by more than ``static_delta`` levels: ~0 for a static video. The static flag uses the
  fraction, not the mean: codec noise on detailed static content moves the mean as much as a small
  moving object does, but rarely moves a pixel by 12 levels;
* sharpness (variance of the Laplacian of luma, averaged over non-black frames): low when blurred;
* exposure (mean luma / 255 over non-black frames) and black-frame fraction (frames with mean luma below
  a threshold);
* a 64-bit DCT perceptual hash (pHash) of a few frames: re-encoded or lightly noised copies land within a
  few bits of each other; near-duplicate groups come from union-find over those pairs.

Luma is BT.601 (Y = 0.299 R + 0.587 G + 0.114 B) on 0..255. Arrays: frames ``[T, H, W, 3]`` uint8 RGB,
luma ``[T, H, W]`` float32.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.curation.semantic import components
from pipeline.ingest.scenes import raw_cuts
from pipeline.loader.decode import BadSample, iter_shard, parse_label, read_clip_frames

HASH_BITS = 64
_HASH_SIDE, _HASH_LOW = 32, 8  # pHash: luma resized to 32x32, DCT, keep the 8x8 lowest frequencies

CURATION_SCHEMA = pa.schema(
    [
        ("key", pa.string()), ("shard", pa.string()), ("label", pa.int64()), ("domain", pa.string()),
        ("source", pa.string()), ("decoder", pa.string()), ("frames", pa.int64()), ("fps", pa.float64()),
        ("width", pa.int64()), ("height", pa.int64()), ("duration", pa.float64()),
        ("motion", pa.float64()), ("moving_fraction", pa.float64()), ("sharpness", pa.float64()),
        ("exposure", pa.float64()),
        ("black_fraction", pa.float64()), ("is_static", pa.bool_()), ("is_dark", pa.bool_()),
        ("has_black", pa.bool_()), ("has_cut", pa.bool_()), ("phash", pa.list_(pa.int64())),
        ("quality_score", pa.float64()),
        ("error", pa.string()),
    ]
)  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class QualityConfig:
    """Sampling, flag thresholds and the references of the combined quality score.

    Motion is measured between consecutive *sampled* frames, ``~T / (num_frames - 1)`` frames apart, so the
    static thresholds hold for that spacing: measured between adjacent frames, slow motion reads as static.
    """

    num_frames: int = 8  # frames decoded per video, evenly spaced
    hash_frames: int = 3  # of those, frames hashed for near-duplicate search
    # max differing bits (of 64), mean over hashed frames, for a near-duplicate; on synthetic clips copies
    # measured <= 4.7 and distinct clips >= 6 (benchmarks/curate_metrics.py)
    hash_distance: int = 5
    black_luma: float = 10.0  # a frame with mean luma below this is black
    static_delta: float = 12.0  # a pixel whose luma changes by more than this (levels) is moving
    static_fraction: float = 0.005  # a video with fewer moving pixels than this fraction is static
    dark_exposure: float = 0.2  # exposure below this flags a dark video (the score also punishes > 1 - this)
    motion_ref: float = 2.0  # motion at which the motion factor of the score saturates at 1
    sharpness_ref: float = 50.0  # sharpness at which the sharpness factor of the score is 1/2
    # PySceneDetect's ContentDetector score (0..255, its default threshold 27) between consecutive sampled lit
    # frames at or above which a video has a hard cut; on 32 px synthetic clips (8 of 16 frames sampled),
    # clean clips scored <= 27 in 99 % and cut clips >= 27 in 97 % (tests/pipeline/curation/test_quality.py)
    cut_threshold: float = 27.0

    def __post_init__(self) -> None:
        if self.num_frames < 2:
            raise ValueError(f"quality.num_frames must be >= 2 (motion needs a pair), got {self.num_frames}")
        if not 1 <= self.hash_frames <= self.num_frames:
            raise ValueError(f"quality.hash_frames must be in [1, num_frames], got {self.hash_frames}")
        if not 0 <= self.hash_distance < HASH_BITS:
            raise ValueError(f"quality.hash_distance must be in [0, 63], got {self.hash_distance}")
        if not 0 <= self.dark_exposure < 0.5:
            raise ValueError(f"quality.dark_exposure must be in [0, 0.5), got {self.dark_exposure}")
        for name in (
            "black_luma",
            "static_delta",
            "static_fraction",
            "motion_ref",
            "sharpness_ref",
            "cut_threshold",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"quality.{name} must be > 0, got {getattr(self, name)}")


def sample_indices(total: int, n: int) -> np.ndarray:
    """``min(n, total)`` distinct frame indices evenly spaced over ``[0, total)``, first and last included."""
    if total < 1 or n < 1:
        raise ValueError(f"need total >= 1 frames and n >= 1 samples, got total={total}, n={n}")
    return np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(np.int64))


def read_frames(data: bytes, num_frames: int, *, key: str = "?") -> tuple[np.ndarray, int, str]:
    """Decode ``num_frames`` evenly spaced frames (decord, PyAV when decord cannot open the video).

    Returns ``(frames uint8 [N, H, W, 3], frames in the video, decoder name)``; raises
    :class:`pipeline.loader.decode.BadSample` when neither decoder can read it.
    """
    total = 0

    def choose(n: int) -> list[int]:
        nonlocal total
        total = n
        return sample_indices(n, num_frames).tolist()

    frames, _, backend = read_clip_frames(data, choose, key=key)
    return frames, total, backend


def luma(frames: np.ndarray) -> np.ndarray:
    """BT.601 luma ``[..., H, W]`` float32 (0..255) of RGB ``[..., H, W, 3]``."""
    return np.asarray(frames, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def laplacian_variance(y_THW: np.ndarray) -> np.ndarray:
    """Per-frame variance of the 4-neighbour Laplacian over interior pixels, ``[T]`` (luma levels^2)."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    lap = F.conv2d(torch.from_numpy(np.ascontiguousarray(y_THW, np.float32))[:, None], kernel)
    return lap.flatten(1).var(dim=1, unbiased=False).numpy()


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``[n, n]``: ``C @ x`` is the DCT of column vector x."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    c[0] /= np.sqrt(2.0)
    return c


_DCT = dct_matrix(_HASH_SIDE)
_BIT_WEIGHTS = np.uint64(1) << np.arange(
    HASH_BITS - 1, -1, -1, dtype=np.uint64
)  # bit 0 of the 8x8 is the MSB


def phash(y_THW: np.ndarray) -> np.ndarray:
    """64-bit DCT perceptual hash per frame, ``[T]`` uint64: luma area-resized to 32x32, 2-D DCT, the 8x8
    lowest frequencies compared with their median (1 = above), row-major, first coefficient = MSB."""
    small = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(y_THW, np.float32))[:, None],
        size=(_HASH_SIDE,) * 2,
        mode="area",
    )
    coeffs = _DCT @ small[:, 0].double().numpy() @ _DCT.T
    low = coeffs[:, :_HASH_LOW, :_HASH_LOW].reshape(len(coeffs), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _BIT_WEIGHTS).sum(axis=1, dtype=np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of differing bits between uint64 hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))


def quality_score(
    *, motion: float, sharpness: float, exposure: float, black_fraction: float, cfg: QualityConfig
) -> float:
    """Combined score in [0, 1], a product of factors so any one failure sinks it:
    (1 - black_fraction) * min(1, motion / motion_ref) * sharpness / (sharpness + sharpness_ref)
    * min(1, exposure / dark_exposure, (1 - exposure) / dark_exposure)."""
    if any(math.isnan(v) for v in (motion, sharpness, exposure, black_fraction)):
        return 0.0
    expo = (
        min(1.0, exposure / cfg.dark_exposure, (1.0 - exposure) / cfg.dark_exposure)
        if cfg.dark_exposure
        else 1.0
    )
    return float(
        (1.0 - black_fraction)
        * min(1.0, motion / cfg.motion_ref)
        * sharpness
        / (sharpness + cfg.sharpness_ref)
        * max(expo, 0.0)
    )


def video_metrics(frames: np.ndarray, cfg: QualityConfig) -> dict:
    """Metrics of sampled frames ``[N, H, W, 3]`` uint8. ``phash`` holds ``hash_frames`` signed-int64 views
    of the uint64 hashes, ``None`` where the frame is black or flat (its hash would say nothing)."""
    y = luma(frames)
    mean_y = y.reshape(len(y), -1).mean(axis=1)
    black = mean_y < cfg.black_luma
    lit = ~black
    pairs = lit[1:] & lit[:-1]
    diffs = np.abs(np.diff(y, axis=0)[pairs])  # [P, H, W] over pairs of consecutive non-black frames
    motion = float(diffs.mean()) if pairs.any() else 0.0
    moving = float((diffs > cfg.static_delta).mean()) if pairs.any() else 0.0
    sharpness = float(laplacian_variance(y[lit]).mean()) if lit.any() else 0.0
    exposure = float(mean_y[lit].mean() / 255.0) if lit.any() else 0.0
    black_fraction = float(black.mean())
    hidx = sample_indices(len(y), cfg.hash_frames)
    informative = lit[hidx] & (y[hidx].reshape(len(hidx), -1).std(axis=1) >= 1.0)
    hashes = phash(y[hidx]).view(np.int64)
    # a cut between two lit frames (a fade to black is has_black's); the detector takes BGR frames
    lit_bgr = np.ascontiguousarray(frames[lit][..., ::-1])
    has_cut = len(lit_bgr) >= 2 and bool(raw_cuts(lit_bgr, 1.0, threshold=cfg.cut_threshold))
    score = quality_score(
        motion=motion, sharpness=sharpness, exposure=exposure, black_fraction=black_fraction, cfg=cfg
    )
    return {
        "motion": motion,
        "moving_fraction": moving,
        "sharpness": sharpness,
        "exposure": exposure,
        "black_fraction": black_fraction,
        "is_static": moving < cfg.static_fraction,
        "is_dark": exposure < cfg.dark_exposure,
        "has_black": bool(black.any()),
        "has_cut": has_cut,
        "phash": [int(h) if ok else None for h, ok in zip(hashes, informative, strict=True)],
        "quality_score": score,
    }


def duplicate_groups(
    hashes: np.ndarray, valid: np.ndarray, max_distance: int, *, block_elems: int = 2**22
) -> np.ndarray:
    """Near-duplicate groups from per-frame hashes ``[N, K]`` uint64 and their validity ``[N, K]`` bool.

    Two videos are near-duplicates when they share at least one valid position and their hashes differ, on
    average over the positions valid in both, in at most ``max_distance`` bits (the mean tolerates one
    frame whose low-contrast hash flips under noise); groups are the connected components
    (:func:`pipeline.curation.semantic.components`).
    Returns ``[N]`` int64: each video's group id = the smallest row index in its group.

    Every pair is compared, vectorised over blocks of rows (``block_elems`` bounds a block's [B, N, K]
    arrays): exact, and ~10 s CPU for 20k videos, but quadratic; sets of millions need an ANN index.
    """
    hashes, valid = np.asarray(hashes, np.uint64), np.asarray(valid, bool)
    if hashes.ndim != 2 or hashes.shape != valid.shape:
        raise ValueError(f"hashes and valid must both be [N, K], got {hashes.shape} and {valid.shape}")
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance must be in [0, 63], got {max_distance}")
    n, k = hashes.shape
    edges_i, edges_j = [], []
    start = 0
    while start < n:  # rows [start, start + b) against rows [start, n): each pair once, i < j
        m = n - start
        b = max(1, min(m, block_elems // max(m * k, 1)))
        both = valid[start : start + b, None, :] & valid[None, start:, :]  # [b, m, K]
        bits = np.where(both, hamming(hashes[start : start + b, None, :], hashes[None, start:, :]), 0).sum(-1)
        common = both.sum(-1)
        later = np.arange(m)[None, :] > np.arange(b)[:, None]
        i, j = np.nonzero((common > 0) & (bits <= max_distance * common) & later)
        edges_i.append(i + start)
        edges_j.append(j + start)
        start += b
    if not edges_i:
        return np.arange(n, dtype=np.int64)
    return components(n, np.concatenate(edges_i), np.concatenate(edges_j))


def _sample_row(sample: dict, shard: str, cfg: QualityConfig) -> dict:
    key = sample["__key__"]
    row = {"key": key, "shard": shard, "phash": [], "quality_score": 0.0, "error": ""}
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        row.update(label=parse_label(sample), domain=meta.get("domain", ""), source=meta.get("source", ""))
        if "mp4" not in sample:
            raise BadSample(key, "no .mp4 member")
        frames, total, backend = read_frames(sample["mp4"], cfg.num_frames, key=key)
        fps = float(
            meta.get("fps") or "nan"
        )  # the decoders' frame rate is the probe's, recorded at shard time
        row.update(
            decoder=backend, frames=total, fps=fps, width=frames.shape[2], height=frames.shape[1],
            duration=total / fps, **video_metrics(frames, cfg),
        )  # fmt: skip
    except (BadSample, ValueError) as e:  # a bad sample becomes a row with its error, not a failed job
        row["error"] = str(e)
    return row


def curate_shard(
    shard_url: str,
    cfg: QualityConfig,
    storage_cfg: storage.StorageConfig | None = None,
    keys: tuple[str, ...] = (),
) -> pa.Table:
    """Metrics of every sample of one WebDataset shard, one row per sample (``CURATION_SCHEMA``, without
    the duplicate groups, which need all shards). A sample that cannot be decoded gets its ``error``, and so
    does every one of ``keys`` (the manifest's) that a truncated or corrupt shard did not deliver: skipped
    and counted, as the loader does. A shard that cannot be opened at all (missing, store down) raises
    ``OSError``: that is not a verdict on its samples."""
    errors: list[str] = []
    shard = shard_url.rsplit("/", 1)[-1]
    samples = iter_shard(shard_url, want=lambda _: True, cfg=storage_cfg, on_error=errors.append)
    rows = [_sample_row(s, shard, cfg) for s in samples]
    if any(e.startswith("cannot open shard") for e in errors):
        raise OSError("; ".join(errors))
    seen = {r["key"] for r in rows}
    # a tar cut at a member boundary reads as a clean, shorter stream: what the manifest lists is the truth
    why = f"unreadable: {errors[-1][:200]}" if errors else "unreadable: the shard ended before this sample"
    for key in keys:
        if key not in seen:
            rows.append({"key": key, "shard": shard, "phash": [], "quality_score": 0.0, "error": why})
    return pa.Table.from_pylist(rows, schema=CURATION_SCHEMA)
