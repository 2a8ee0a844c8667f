"""Synthetic labelled videos in several visual domains, with controllable quality defects.

Why: studies (domain shift, curation, data scaling, masking) must run on a laptop or CI without downloading
data, and must be about structure a video model can learn. Each clip is one sprite moving over a background.
The *class* sets how the sprite moves (left/right, up/down, rotate_cw/rotate_ccw, zoom_in/zoom_out: pairs
that are each other's time reversal, so a model must use temporal order). The *domain* sets how the clip
looks and how it moves, so domains differ in both appearance and motion statistics (``DOMAIN_STYLES``):

- ``shapes``: flat background and sprite, hard edges, fast moves, a still camera;
- ``textures``: a smooth two-grating background that drifts (a panning camera), a sprite striped in its own
  frame (the stripes move and turn with it), medium moves;
- ``gradients``: smooth colour ramps, a soft-edged radial sprite, slow moves and small turns/zooms.

Everything in a clean clip is predictable from what a masked autoencoder sees: no per-pixel noise, and every
spatial frequency is set in cycles per frame (at most ~4 per short side, <= 0.15 cycles/px at 32 px), so a
clip rendered straight at the study's size has no detail finer than the pixels can hold and no aliasing.

A *defect* degrades a clean clip the way real data goes bad: static (no motion), black runs, dark
exposure, blur, exact re-encodes and near-duplicates (which cut diversity), and a hard cut (a fixed-length
clip cut from a multi-shot video: from a frame in its middle half on, an unrelated scene of another content
seed, domain and class takes over). ``DefectFractions`` sets the
share of each; their sum is the share of low-quality clips (0.5-0.75 makes them dominate a set).

Geometry: pixel centres, x to the right, y down; a positive angle turns clockwise on screen. Sizes are
``(width, height)`` in pixels; frames are uint8 RGB ``[T, H, W, 3]``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from tqdm import tqdm

from pipeline import storage
from pipeline.curation.quality import luma
from pipeline.ingest import manifest
from pipeline.ingest.encode import encode_mp4

DOMAINS = ("textures", "shapes", "gradients")
MOTIONS = ("left", "right", "up", "down", "rotate_cw", "rotate_ccw", "zoom_in", "zoom_out")
DEFECTS = ("blur", "static", "duplicate", "near_duplicate", "black", "dark", "cut")
LABELS_NAME = "labels.csv"
SUMMARY_NAME = "synth.json"
FORMAT = "vmae-synth/1"

# Convex sprite outlines in sprite units (half-extent ~1); none is symmetric under a quarter turn, so
# rotation is visible, and the triangle/kite also show which way they point.
_POLYGONS = (
    ((1.0, 0.0), (-0.6, 0.7), (-0.6, -0.7)),
    ((1.0, 0.5), (-1.0, 0.5), (-1.0, -0.5), (1.0, -0.5)),
    ((1.0, 0.0), (0.0, 0.6), (-0.8, 0.0), (0.0, -0.45)),
    ((0.9, 0.2), (0.1, 0.8), (-0.8, 0.4), (-0.6, -0.6), (0.5, -0.7)),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DefectFractions:
    """Fraction of all clips that get each defect (each clip has at most one)."""

    blur: float = 0.05  # Gaussian blur, sigma 1.5-2.5 px
    static: float = 0.05  # one frame repeated: no motion at all
    duplicate: float = 0.05  # a clean clip's frames re-encoded (different bytes, same content)
    near_duplicate: float = 0.05  # a clean clip's frames + small noise and brightness shift
    black: float = 0.05  # a contiguous 40-100% of the frames are black
    dark: float = 0.05  # whole clip scaled to a mean luma of 15-35 (of 255)
    cut: float = 0.0  # from frame k in [T/4, 3T/4) on, a second scene (own content; domain, class drawn anew)

    def __post_init__(self) -> None:
        values = dataclasses.asdict(self)
        for name, v in values.items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"defects.{name} must be a fraction in [0, 1], got {v}")
        if sum(values.values()) > 1.0 + 1e-9:
            raise ValueError(f"defect fractions sum to {sum(values.values()):.3f} > 1")

    def counts(self, n: int) -> dict[str, int]:
        """Number of clips per defect among ``n`` (rounded; never more than ``n`` in total)."""
        out, left = {}, n
        for name, frac in dataclasses.asdict(self).items():
            out[name] = min(int(round(frac * n)), left)
            left -= out[name]
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """What to generate. Every clip draws its size, length and frame rate from the lists given."""

    seed: int = 0
    domains: tuple[str, ...] = DOMAINS
    classes: tuple[str, ...] = MOTIONS
    videos_per_class: int = 4  # per (domain, class)
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (96, 64), (128, 96))  # (width, height), even
    frames: tuple[int, ...] = (16, 24, 32)
    fps: tuple[float, ...] = (15.0, 24.0, 30.0)
    crf: int = 23
    defects: DefectFractions = dataclasses.field(default_factory=DefectFractions)
    workers: int = 0  # processes; 0 = one per CPU, 1 = in this process

    def __post_init__(self) -> None:
        for field, allowed in (("domains", DOMAINS), ("classes", MOTIONS)):
            values = getattr(self, field)
            bad = [v for v in values if v not in allowed]
            if not values or bad or len(set(values)) != len(values):
                raise ValueError(f"{field} must be distinct names from {allowed}, got {list(values)}")
        if self.videos_per_class < 1:
            raise ValueError(f"videos_per_class must be >= 1, got {self.videos_per_class}")
        if not self.sizes or any(
            len(s) != 2 or s[0] < 32 or s[1] < 32 or s[0] % 2 or s[1] % 2 for s in self.sizes
        ):
            raise ValueError(f"sizes must be (width, height) pairs, even and >= 32, got {self.sizes}")
        if not self.frames or min(self.frames) < 4:
            raise ValueError(f"frames must be a non-empty list of lengths >= 4, got {self.frames}")
        if not self.fps or min(self.fps) <= 0:
            raise ValueError(f"fps must be a non-empty list of positive rates, got {self.fps}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipSpec:
    """One planned clip. A duplicate copies its source's content seed, class, domain and geometry."""

    index: int
    domain: str
    motion: str
    label: int
    width: int
    height: int
    frames: int
    fps: float
    defect: str  # "" for a clean clip
    content_seed: tuple[int, int]  # seeds the rendering; shared by a clip and its duplicates
    duplicate_of: str = ""  # path of the source clip
    cut: tuple = ()  # a "cut" clip's (first frame of the second scene, its domain, its class)

    @property
    def path(self) -> str:
        return f"{self.domain}/{self.motion}/s{self.index:05d}.mp4"


def _colour(rng: np.random.Generator, lo: float = 40, hi: float = 215) -> np.ndarray:
    return rng.uniform(lo, hi, size=3).astype(np.float32)


def _contrasting(rng: np.random.Generator, ref: np.ndarray, min_diff: float = 70) -> np.ndarray:
    """A colour whose luma differs from ``ref``'s by at least ``min_diff`` levels (so the sprite shows)."""
    ref_y = float(luma(ref[None, None, None].astype(np.float32)).item())
    while True:
        c = _colour(rng, 10, 245)
        if abs(float(luma(c[None, None, None]).item()) - ref_y) >= min_diff:
            return c


@dataclasses.dataclass(frozen=True)
class DomainStyle:
    """Motion statistics of a domain (fractions of the short side ``m`` unless noted)."""

    travel: tuple[float, float]  # distance a translating sprite covers over the clip
    radius: tuple[float, float]  # sprite half-extent
    turn: tuple[float, float]  # radians a rotating sprite turns over the clip
    zoom: tuple[float, float]  # size factor of a zooming sprite over the clip
    pan: tuple[float, float]  # background (camera) drift over the clip, random direction
    edge: float  # anti-aliased edge width, in px at a 64 px short side (scales with the frame)


DOMAIN_STYLES = {
    "shapes": DomainStyle(travel=(0.45, 0.6), radius=(0.17, 0.23), turn=(0.6 * np.pi, np.pi),
                          zoom=(2.5, 3.0), pan=(0.0, 0.0), edge=1.0),
    "textures": DomainStyle(travel=(0.35, 0.5), radius=(0.2, 0.26), turn=(0.5 * np.pi, 0.8 * np.pi),
                            zoom=(2.2, 2.7), pan=(0.15, 0.3), edge=1.0),
    "gradients": DomainStyle(travel=(0.25, 0.38), radius=(0.24, 0.3), turn=(0.35 * np.pi, 0.6 * np.pi),
                             zoom=(1.8, 2.2), pan=(0.0, 0.0), edge=4.0),
}  # fmt: skip


def _appearance(domain: str, h: int, w: int, frames: int, rng: np.random.Generator):
    """(background f(t) -> [H, W, 3] float32 for frame t, sprite fill f(u, v) -> [H, W, 3], edge width px)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    m = min(w, h)
    style = DOMAIN_STYLES[domain] if domain in DOMAIN_STYLES else None
    if style is None:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    edge = style.edge * m / 64
    c1 = _colour(rng, 70, 185)
    c2, c3, c4 = _contrasting(rng, c1), _contrasting(rng, c1), _contrasting(rng, c1)
    if domain == "shapes":
        bg = np.broadcast_to(c1, (h, w, 3))
        return (lambda t: bg), (lambda u, v: np.broadcast_to(c3, (*u.shape, 3))), edge
    if domain == "textures":
        phi, psi = rng.uniform(0, np.pi, 2), rng.uniform(0, 2 * np.pi, 2)
        freq = rng.uniform(1.5, 3.5, 2) / m  # cycles per px: 1.5-3.5 cycles over the short side
        pan, heading = rng.uniform(*style.pan) * m, rng.uniform(0, 2 * np.pi)
        tau = np.linspace(0.0, 1.0, frames, dtype=np.float32)

        def background(t: int) -> np.ndarray:  # the gratings give every patch structure; no ramp needed
            x, y = xs - pan * tau[t] * np.cos(heading), ys - pan * tau[t] * np.sin(heading)
            wave = sum(
                np.sin(2 * np.pi * f * (x * np.cos(p) + y * np.sin(p)) + s)
                for f, p, s in zip(freq, phi, psi, strict=True)
            )
            return c1 + (c2 - c1) * (0.5 + 0.25 * wave)[..., None]

        c4 = _contrasting(rng, c3, 60)  # the stripes show inside the sprite
        k, a = rng.uniform(0.8, 1.4), rng.uniform(0, np.pi)  # stripes per sprite unit, in the sprite's frame

        def fill(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            s = 0.5 + 0.5 * np.sin(2 * np.pi * k * (u * np.cos(a) + v * np.sin(a)))
            return c3 + (c4 - c3) * s[..., None]

        return background, fill, edge
    a = rng.uniform(0, 2 * np.pi)
    proj = (xs - w / 2) * np.cos(a) + (ys - h / 2) * np.sin(a)
    t = ((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6))[..., None]
    bg = c1 + (c2 - c1) * 0.7 * t
    return (lambda _t: bg), (lambda u, v: c3 + (c4 - c3) * np.clip(u * u + v * v, 0, 1)[..., None]), edge


def _trajectory(motion: str, domain: str, w: int, h: int, t: int, rng: np.random.Generator):
    """Per-frame sprite centre x, y [T] (px), angle [T] (rad, clockwise) and half-extent [T] (px), with the
    domain's motion statistics."""
    style = DOMAIN_STYLES[domain]
    tau = np.linspace(0.0, 1.0, t, dtype=np.float32)
    m = min(w, h)
    const = np.ones(t, np.float32)
    if motion in ("left", "right", "up", "down"):
        r = rng.uniform(*style.radius) * m
        along, across = (w, h) if motion in ("left", "right") else (h, w)
        travel = min(rng.uniform(*style.travel) * m, along - 2 * r)
        start = rng.uniform(r, max(r, along - r - travel))
        pos = start + travel * (tau if motion in ("right", "down") else 1 - tau)
        other = rng.uniform(r, across - r) * const
        cx, cy = (pos, other) if motion in ("left", "right") else (other, pos)
        return cx, cy, rng.uniform(0, 2 * np.pi) * const, r * const
    if motion in ("rotate_cw", "rotate_ccw"):
        r = (rng.uniform(*style.radius) + 0.07) * m
        turn = rng.uniform(*style.turn) * (1 if motion == "rotate_cw" else -1)
        angle = rng.uniform(0, 2 * np.pi) + turn * tau
        return rng.uniform(r, w - r) * const, rng.uniform(r, h - r) * const, angle, r * const
    if motion in ("zoom_in", "zoom_out"):
        # the sprite may grow past the frame's edges, as when a camera closes in
        r0, factor = (rng.uniform(*style.radius) - 0.03) * m, rng.uniform(*style.zoom)
        growth = factor ** (tau if motion == "zoom_in" else 1 - tau)
        cx, cy = rng.uniform(0.3 * m, w - 0.3 * m), rng.uniform(0.3 * m, h - 0.3 * m)
        return cx * const, cy * const, rng.uniform(0, 2 * np.pi) * const, r0 * growth
    raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")


def _polygon_sdf(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Signed distance (sprite units; < 0 inside) to a convex polygon, exact inside, a bound outside."""
    centre = poly.mean(0)
    d = np.full(u.shape, -np.inf, np.float32)
    for a, b in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        n = np.array([b[1] - a[1], a[0] - b[0]], np.float32)
        n /= np.linalg.norm(n)
        if n @ (centre - a) > 0:
            n = -n
        d = np.maximum(d, n[0] * (u - a[0]) + n[1] * (v - a[1]))
    return d


def _apply_defect(frames: np.ndarray, defect: str | None, rng: np.random.Generator) -> np.ndarray:
    """Degrade float32 frames [T, H, W, 3] in place of a copy; values stay in 0..255 after clipping."""
    t = frames.shape[0]
    if defect in (None, "", "duplicate"):
        return frames
    if defect == "blur":
        # local import: torch/torchvision cost start-up and only the blur defect needs them
        import torch
        from torchvision.transforms.v2.functional import gaussian_blur

        sigma = float(rng.uniform(1.5, 2.5))
        k = 2 * math.ceil(3 * sigma) + 1
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        return gaussian_blur(x, [k, k], [sigma, sigma]).permute(0, 2, 3, 1).numpy()
    if defect == "static":
        return np.repeat(frames[rng.integers(t)][None], t, axis=0)
    if defect == "black":
        n = max(1, int(round(rng.uniform(0.4, 1.0) * t)))
        start = int(rng.integers(0, t - n + 1))
        out = frames.copy()
        out[start : start + n] = 0
        return out
    if defect == "dark":
        return frames * (rng.uniform(15, 35) / max(float(luma(frames).mean()), 1e-3))
    if defect == "near_duplicate":
        return frames + rng.normal(0, 2.5, frames.shape).astype(np.float32) + rng.uniform(-4, 4)
    if defect == "cut":
        raise ValueError(
            "the cut defect renders a second scene: use render_clip(..., cut=(k, domain, motion))"
        )
    raise ValueError(f"defect must be one of {DEFECTS} or None, got {defect!r}")


def render_clip(
    domain: str,
    motion: str,
    *,
    size: tuple[int, int],
    frames: int,
    rng: np.random.Generator,
    defect: str | None = None,
    defect_rng: np.random.Generator | None = None,
    cut: tuple[int, str, str] | None = None,
) -> np.ndarray:
    """Render one clip: uint8 RGB ``[frames, height, width, 3]`` with ``size = (width, height)``.

    The content is drawn from ``rng`` first, then the defect from ``defect_rng`` (default: ``rng``), so the
    same content seed with another defect rng gives the same scene differently degraded (near-duplicates).
    ``defect="cut"`` needs ``cut=(k, domain, motion)``: frames ``k:`` are those of a second scene of that
    domain and motion, drawn from ``defect_rng`` (frames ``:k`` are the clean clip's, unchanged).
    """
    w, h = size
    if w < 8 or h < 8 or frames < 2:
        raise ValueError(f"size must be >= 8x8 px and frames >= 2, got size={size}, frames={frames}")
    if domain not in DOMAIN_STYLES:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    background, fill, edge_px = _appearance(domain, h, w, frames, rng)
    cx, cy, angle, scale = _trajectory(motion, domain, w, h, frames, rng)
    poly = np.asarray(_POLYGONS[rng.integers(len(_POLYGONS))], np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    out = np.empty((frames, h, w, 3), np.float32)
    for i in range(frames):
        c, s = np.cos(angle[i]), np.sin(angle[i])
        dx, dy = xs - cx[i], ys - cy[i]
        u, v = (c * dx + s * dy) / scale[i], (-s * dx + c * dy) / scale[i]
        alpha = np.clip(0.5 - _polygon_sdf(u, v, poly) * scale[i] / edge_px, 0, 1)[..., None]
        out[i] = background(i) * (1 - alpha) + fill(u, v) * alpha
    if defect == "cut":
        if cut is None or not 1 <= cut[0] < frames:
            raise ValueError(f"a cut clip needs cut=(k, domain, motion) with 1 <= k < {frames}, got {cut}")
        k, domain2, motion2 = cut
        second = render_clip(domain2, motion2, size=size, frames=frames, rng=defect_rng or rng)
        out[k:] = second[k:]
        defect = None
    out = _apply_defect(out, defect, defect_rng or rng)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def plan(cfg: SynthConfig) -> list[ClipSpec]:
    """Deterministic list of clips: ``videos_per_class`` per (domain, class), defects spread at random."""
    rng = np.random.default_rng(cfg.seed)
    slots = [(d, m) for d in cfg.domains for m in cfg.classes for _ in range(cfg.videos_per_class)]
    n = len(slots)
    defects = [""] * n
    order, pos = rng.permutation(n), 0
    for name, count in cfg.defects.counts(n).items():
        for i in order[pos : pos + count]:
            defects[i] = name
        pos += count
    size_i, frames_i = rng.integers(len(cfg.sizes), size=n), rng.integers(len(cfg.frames), size=n)
    fps_i = rng.integers(len(cfg.fps), size=n)
    specs = [
        ClipSpec(
            index=i,
            domain=d,
            motion=m,
            label=cfg.classes.index(m),
            width=cfg.sizes[size_i[i]][0],
            height=cfg.sizes[size_i[i]][1],
            frames=cfg.frames[frames_i[i]],
            fps=float(cfg.fps[fps_i[i]]),
            defect=defects[i],
            content_seed=(cfg.seed, i),
        )  # fmt: skip
        for i, (d, m) in enumerate(slots)
    ]
    clean = [s for s in specs if not s.defect]
    for i, s in enumerate(specs):
        if s.defect not in ("duplicate", "near_duplicate"):
            continue
        same_class = [c for c in clean if (c.domain, c.motion) == (s.domain, s.motion)]
        pool = same_class or [c for c in clean if c.domain == s.domain] or clean
        if not pool:
            raise ValueError("defect fractions leave no clean clip to duplicate; lower defects.*")
        src = pool[int(rng.integers(len(pool)))]
        specs[i] = dataclasses.replace(
            src, index=s.index, defect=s.defect, duplicate_of=src.path, content_seed=src.content_seed
        )
    # drawn after everything else, so a plan without cuts is the one this generator made before they existed
    for i, s in enumerate(specs):
        if s.defect == "cut":
            k = int(rng.integers(s.frames // 4, max(s.frames // 4 + 1, (3 * s.frames) // 4)))
            second = (
                cfg.domains[rng.integers(len(cfg.domains))],
                cfg.classes[rng.integers(len(cfg.classes))],
            )
            specs[i] = dataclasses.replace(s, cut=(k, *second))
    return specs


def _make_clip(spec: ClipSpec, crf: int, out_url: str) -> dict:
    """Render, encode and write one clip; returns its labels row. Runs in a worker process."""
    frames = render_clip(
        spec.domain, spec.motion, size=(spec.width, spec.height), frames=spec.frames,
        rng=np.random.default_rng(spec.content_seed), defect=spec.defect or None,
        defect_rng=np.random.default_rng((*spec.content_seed, spec.index, 1)), cut=spec.cut or None,
    )  # fmt: skip
    # An exact duplicate is the same content re-encoded: same frames, different bytes.
    data = encode_mp4(frames, fps=spec.fps, crf=crf - 4 if spec.defect == "duplicate" else crf)
    storage.write_bytes_atomic(storage.join(out_url, spec.path), data)
    return {
        "path": spec.path, "label": spec.label, "domain": spec.domain, "defect": spec.defect,
        "class": spec.motion, "duplicate_of": spec.duplicate_of, "width": spec.width,
        "height": spec.height, "frames": spec.frames, "fps": spec.fps, "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }  # fmt: skip


def synthesize(cfg: SynthConfig, out_url: str) -> pa.Table:
    """Write the clips under ``out_url/{domain}/{class}/s{index}.mp4`` (UCF101-like layout), then
    ``labels.csv`` and, last, ``synth.json`` (the summary; its presence marks a complete set).

    Returns one row per clip: path (relative), label (class index), domain, defect ("" = clean), class,
    duplicate_of, width, height, frames, fps, bytes, sha256. Deterministic in ``cfg.seed`` (byte-identical
    output whatever ``cfg.workers``).
    """
    specs = plan(cfg)
    workers = min(cfg.workers or os.cpu_count() or 1, len(specs))
    bar = tqdm(total=len(specs), desc="synth", unit="clip", disable=None)
    if workers <= 1:
        rows = []
        for s in specs:
            rows.append(_make_clip(s, cfg.crf, out_url))
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork after torch/ray started threads
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(_make_clip, s, cfg.crf, out_url) for s in specs]
            for f in concurrent.futures.as_completed(futures):
                f.result()
                bar.update()
            rows = [f.result() for f in futures]
    bar.close()
    table = pa.Table.from_pylist(rows)
    buf = io.BytesIO()
    pa_csv.write_csv(table.select(["path", "label", "domain", "defect", "class", "duplicate_of"]), buf)
    storage.write_bytes_atomic(storage.join(out_url, LABELS_NAME), buf.getvalue())
    summary = {
        "format": FORMAT,
        "num_videos": len(rows),
        "classes": list(cfg.classes),
        "domains": list(cfg.domains),
        "counts": {
            col: dict(sorted(collections.Counter(r[col] or "clean" for r in rows).items()))
            for col in ("domain", "class", "defect")
        },
        "total_bytes": int(sum(r["bytes"] for r in rows)),
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
        "code_version": manifest.code_version(),
    }
    storage.write_bytes_atomic(storage.join(out_url, SUMMARY_NAME), json.dumps(summary, indent=1).encode())
    return table
