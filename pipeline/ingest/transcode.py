"""Transcode any decodable video to the training format: H.264 yuv420p, constant fps, short side N, short GOP.

Why this format: every later stage (curation, the loader, evaluation) decodes these files many times, so they
are made small (short side 320 by default, never upscaled), uniform (one codec, one pixel format, one frame
rate, display rotation already applied, no audio) and fast to seek into (a key frame every ``gop`` frames,
``moov`` atom first).

Memory stays flat for long inputs: frames stream one at a time from the decoder through the frame-rate
resampler, the scaler (``VideoFrame.reformat``) and the encoder straight into local files; long videos are
cut into clips of at most ``max_clip_s`` seconds, one file each. With ``split: scenes`` a first pass over the
same output timeline finds the shot boundaries (:mod:`pipeline.ingest.scenes`) and clips start at every kept cut as
well, so no clip straddles a hard cut; the second pass writes the clips (decoding twice costs less than
holding a long video's frames).
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import math
import os
import tempfile
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np

from pipeline.ingest import scenes
from pipeline.ingest.probe import ProbeError, VideoInfo, probe

SPLITS = ("fixed", "scenes")
X264_TUNES = ("", "fastdecode", "film", "animation", "grain", "stillimage", "psnr", "ssim", "zerolatency")
_SCENE_FIELDS = ("scene_threshold", "scene_min_s")  # only part of the identity when split=scenes


class TranscodeError(ValueError):
    """The input cannot be turned into a training sample; the message is the one-line reject reason."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TranscodeConfig:
    """Target format. Sizes in pixels, rates in frames/s, durations in seconds."""

    short_side: int = 320  # target short side (even); smaller videos keep their size
    fps: float | None = 30.0  # constant output rate; None keeps the source's average rate
    gop: int = 32  # key frame interval (frames): a random access decodes at most gop - 1 extra frames
    crf: int = 23
    preset: str = "veryfast"
    bframes: int | None = None  # most consecutive B-frames (0: none; None: the preset's, veryfast: 3)
    tune: str = "fastdecode"  # x264 tune ("": none); fastdecode: no CABAC or deblocking (benchmarks/loader_throughput.py)
    max_clip_s: float | None = None  # cut longer videos into clips of at most this length; None: one clip
    min_frames: int = 2  # fewer output frames than this: reject (a single still is not a video)
    max_aspect: float = 4.0  # long / short side; wider strips are not natural video: reject
    max_pixels: int = 7680 * 4320  # coded width * height above this (beyond 8K): reject before decoding
    faststart: bool = True  # moov atom first, so a reader needs no second seek
    threads: int = 1  # per decoder/encoder; the job parallelises across videos instead
    split: str = (
        "fixed"  # fixed: clips of max_clip_s; scenes: also cut at shot boundaries (pipeline.ingest.scenes)
    )
    scene_threshold: float = 27.0  # content-detector score (HSV mean change, 0..255) that counts as a cut
    scene_min_s: float = 1.0  # shortest shot (s): a cut closer than this to the previous one is ignored

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"transcode.split must be one of {SPLITS}, got {self.split!r}")
        if self.split == "scenes" and self.max_clip_s is None:
            raise ValueError(
                "transcode.split=scenes needs transcode.max_clip_s (the longest clip a shot may give)"
            )
        if not self.scene_threshold > 0 or not self.scene_min_s > 0:
            raise ValueError(
                f"transcode.scene_threshold and scene_min_s must be > 0, got {self.scene_threshold}, {self.scene_min_s}"
            )
        if self.short_side < 2 or self.short_side % 2:
            raise ValueError(f"transcode.short_side must be an even number >= 2, got {self.short_side}")
        if self.fps is not None and not (0 < self.fps <= 240):
            raise ValueError(f"transcode.fps must be in (0, 240] or null (keep), got {self.fps}")
        if self.gop < 1:
            raise ValueError(f"transcode.gop must be >= 1, got {self.gop}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"transcode.crf must be in [0, 51], got {self.crf}")
        if self.bframes is not None and not 0 <= self.bframes <= 16:
            raise ValueError(f"transcode.bframes must be in [0, 16] or null (preset's), got {self.bframes}")
        if self.tune not in X264_TUNES:
            raise ValueError(f"transcode.tune must be one of {X264_TUNES}, got {self.tune!r}")
        if self.min_frames < 1:
            raise ValueError(f"transcode.min_frames must be >= 1, got {self.min_frames}")
        if self.max_clip_s is not None and self.max_clip_s <= 0:
            raise ValueError(f"transcode.max_clip_s must be > 0 or null, got {self.max_clip_s}")
        if self.max_aspect < 1:
            raise ValueError(f"transcode.max_aspect must be >= 1, got {self.max_aspect}")
        if self.max_pixels < 4:
            raise ValueError(f"transcode.max_pixels must be >= 4, got {self.max_pixels}")
        if self.threads < 0:
            raise ValueError(f"transcode.threads must be >= 0 (0: codec default), got {self.threads}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipInfo:
    """One output file. ``start`` (s) is where the clip begins on the source timeline; ``duration`` (s) is
    ``frames / fps``; ``width``/``height`` are as displayed (rotation applied)."""

    index: int
    start: float
    frames: int
    fps: float
    width: int
    height: int
    duration: float
    path: str


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def identity(cfg: TranscodeConfig) -> dict:
    """The settings that decide the output, as a dict: every field, less the scene settings when
    ``split=fixed`` (so shard sets made before scene splitting existed keep their fingerprint)."""
    out = dataclasses.asdict(cfg)
    if cfg.split == "fixed":
        for name in ("split", *_SCENE_FIELDS):
            out.pop(name)
    return out


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Coded (width, height) after scaling: short side ``short_side`` unless already smaller (never
    upscale), aspect ratio kept, both even (4:2:0). Rotation is applied afterwards and swaps them."""
    short = min(width, height)
    if short > short_side:
        scale = short_side / short
        if width <= height:
            return short_side, _even(height * scale)
        return _even(width * scale), short_side
    return width - width % 2, height - height % 2


def output_rate(info: VideoInfo, cfg: TranscodeConfig) -> Fraction:
    """Constant output frame rate as an exact fraction (29.97 -> 30000/1001)."""
    fps = cfg.fps if cfg.fps is not None else info.fps
    if not fps or fps <= 0:
        raise TranscodeError("source frame rate is unknown and transcode.fps is null (keep)")
    return Fraction(fps).limit_denominator(1001)


def check(info: VideoInfo, cfg: TranscodeConfig) -> None:
    """Reject inputs the target format cannot hold, before anything is decoded."""
    w, h = info.width, info.height
    if w * h > cfg.max_pixels:
        raise TranscodeError(f"{w}x{h} exceeds transcode.max_pixels={cfg.max_pixels}")
    if min(w, h) < 2:
        raise TranscodeError(f"{w}x{h} is too small to hold 4:2:0 video")
    if max(w, h) / min(w, h) > cfg.max_aspect:
        raise TranscodeError(
            f"aspect ratio {max(w, h) / min(w, h):.1f}:1 exceeds transcode.max_aspect={cfg.max_aspect}"
        )
    if info.frames < cfg.min_frames:
        raise TranscodeError(f"{info.frames} frame(s), fewer than transcode.min_frames={cfg.min_frames}")


def resample(frames: Iterator[av.VideoFrame], rate: Fraction) -> Iterator[tuple[int, av.VideoFrame]]:
    """Constant-rate resampling: yields (k, frame) for output slots k = 0, 1, ... at times k / rate.

    Each slot shows the source frame whose timestamp is nearest to it (ties: the earlier frame); the stream
    ends where a frame after the last one would become nearest, so ``n_out ~= duration * rate``. Times are
    exact fractions relative to the first frame; frames whose timestamp does not increase are dropped."""
    k, prev, prev_t, gap = 0, None, Fraction(0), Fraction(0)
    t0: Fraction | None = None
    for frame in frames:
        if frame.pts is None:
            t = prev_t + (gap or 1 / rate) if prev is not None else Fraction(0)
        else:
            t = Fraction(frame.pts) * frame.time_base
            t0 = t if t0 is None else t0
            t -= t0
        if prev is not None:
            if t <= prev_t:
                continue
            gap, mid = t - prev_t, (prev_t + t) / 2
            while k / rate <= mid:
                yield k, prev
                k += 1
        prev, prev_t = frame, t
    if prev is None:
        return
    last = Fraction(prev.duration) * prev.time_base if prev.duration and prev.time_base else gap or 1 / rate
    while k / rate <= prev_t + last / 2:
        yield k, prev
        k += 1


def _to_display(frame: av.VideoFrame, width: int, height: int, rotation: int) -> av.VideoFrame:
    """Scale to coded (width, height) and apply the counter-clockwise display rotation."""
    if rotation == 0:
        return frame.reformat(width, height, format="yuv420p", interpolation="AREA")
    rgb_HWC = frame.reformat(width, height, format="rgb24", interpolation="AREA").to_ndarray()
    return av.VideoFrame.from_ndarray(
        np.ascontiguousarray(np.rot90(rgb_HWC, k=rotation // 90)), format="rgb24"
    )


class _ClipWriter:
    """One H.264 MP4 file being written, frame by frame."""

    def __init__(self, path: str, width: int, height: int, rate: Fraction, cfg: TranscodeConfig) -> None:
        options = {"movflags": "+faststart"} if cfg.faststart else {}
        self.path, self.frames = path, 0
        self.out = av.open(path, mode="w", format="mp4", options=options)
        self.stream = self.out.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.codec_context.time_base = 1 / rate
        gop = str(cfg.gop)
        self.stream.options = {"crf": str(cfg.crf), "preset": cfg.preset, "g": gop, "keyint_min": gop,
                               **({"bf": str(cfg.bframes)} if cfg.bframes is not None else {}),
                               **({"tune": cfg.tune} if cfg.tune else {})}  # fmt: skip
        self.stream.codec_context.gop_size = cfg.gop
        self.stream.thread_count = cfg.threads

    def write(self, frame: av.VideoFrame) -> None:
        frame.pts, frame.time_base = self.frames, self.stream.codec_context.time_base
        self.out.mux(self.stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        self.out.mux(self.stream.encode())
        self.out.close()


def _open(src: str | bytes) -> av.container.InputContainer:
    return av.open(src if isinstance(src, str) else io.BytesIO(src))


def _detect_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, scenes.DETECT_SIDE / max(width, height))
    return _even(width * scale), _even(height * scale)


def scene_segments(
    src: str | bytes, info: VideoInfo, rate: Fraction, cfg: TranscodeConfig, per_clip: int | None
) -> list[tuple[int, int]]:
    """First pass of ``split=scenes``: output-frame ``[start, stop)`` ranges of the clips (shots cut at
    the kept cuts, long shots cut into ``per_clip`` pieces)."""
    dw, dh = _detect_size(info.width, info.height)
    count = 0

    def frames() -> Iterator[np.ndarray]:
        nonlocal count
        with _open(src) as inp:
            stream = inp.streams.video[0]
            stream.thread_count = cfg.threads
            for _, frame in resample(inp.decode(stream), rate):
                count += 1
                yield frame.reformat(dw, dh, format="bgr24", interpolation="AREA").to_ndarray()

    cuts = scenes.raw_cuts(frames(), float(rate), threshold=cfg.scene_threshold)
    min_shot = max(1, math.ceil(cfg.scene_min_s * rate))
    return scenes.segments(scenes.accept_cuts(cuts, count, min_shot), count, per_clip, cfg.min_frames)


def transcode_file(
    src: str | bytes, out_dir: str, stem: str, cfg: TranscodeConfig, info: VideoInfo | None = None
) -> list[ClipInfo]:
    """Transcode local file ``src`` (or bytes) into ``out_dir/{stem}_c{NNN}.mp4`` clips (local paths).

    Raises ``TranscodeError`` (or ``ProbeError``) with a one-line reason; no clip files are left behind on
    error. A trailing clip shorter than ``min_frames`` is dropped (the rest of the video is kept)."""
    info = info or probe(src)
    check(info, cfg)
    width, height = output_size(info.width, info.height, cfg.short_side)
    out_w, out_h = (height, width) if info.rotation in (90, 270) else (width, height)
    rate = output_rate(info, cfg)
    per_clip = max(1, math.floor(cfg.max_clip_s * rate)) if cfg.max_clip_s else None
    clips: list[ClipInfo] = []
    writer: _ClipWriter | None = None

    def finish(w: _ClipWriter, first: int) -> None:
        w.close()
        clips.append(ClipInfo(index=len(clips), start=float(first / rate), frames=w.frames, fps=float(rate),
                              width=out_w, height=out_h, duration=float(w.frames / rate), path=w.path))  # fmt: skip

    try:
        try:
            if cfg.split == "scenes":
                planned = scene_segments(src, info, rate, cfg, per_clip)
                starts = [a for a, _ in planned]

                def segment_of(k: int) -> int | None:
                    i = bisect.bisect_right(starts, k) - 1
                    return i if i >= 0 and k < planned[i][1] else None
            else:

                def segment_of(k: int) -> int | None:
                    return k // per_clip if per_clip else 0

            current, first = -1, 0
            with _open(src) as inp:
                stream = inp.streams.video[0]
                stream.thread_count = cfg.threads
                for k, frame in resample(inp.decode(stream), rate):
                    seg = segment_of(k)
                    if seg is None:
                        continue
                    if writer is None or seg != current:
                        if writer is not None:
                            finish(writer, first)
                        path = os.path.join(out_dir, f"{stem}_c{len(clips):03d}.mp4")
                        writer, current, first = _ClipWriter(path, out_w, out_h, rate, cfg), seg, k
                    writer.write(_to_display(frame, width, height, info.rotation))
        except av.error.FFmpegError as e:
            raise TranscodeError(f"decoding {info.codec} failed: {' '.join(str(e).split())[:200]}") from e
        if writer is None:
            raise TranscodeError(f"{info.codec} stream decoded to no frames")
        finish(writer, first)
        writer = None
    except BaseException:
        if writer is not None:
            writer.out.close()
        for p in [c.path for c in clips] + ([writer.path] if writer else []):
            if os.path.exists(p):
                os.unlink(p)
        raise
    if len(clips) > 1 and clips[-1].frames < cfg.min_frames:
        os.unlink(clips.pop().path)
    if clips[0].frames < cfg.min_frames:
        os.unlink(clips[0].path)
        raise TranscodeError(
            f"{clips[0].frames} output frame(s) at {float(rate):g} fps, fewer than transcode.min_frames={cfg.min_frames}"
        )
    return clips


def transcode(src: str | bytes, cfg: TranscodeConfig) -> list[bytes]:
    """In-memory convenience for small inputs (tests, benchmarks): the bytes of each output clip."""
    with tempfile.TemporaryDirectory(prefix="vmae-transcode-") as tmp:
        clips = transcode_file(src, tmp, "clip", cfg)
        out = []
        for c in clips:
            with open(c.path, "rb") as f:
                out.append(f.read())
        return out


__all__ = [
    "ClipInfo",
    "ProbeError",
    "TranscodeConfig",
    "TranscodeError",
    "check",
    "identity",
    "output_rate",
    "output_size",
    "resample",
    "scene_segments",
    "transcode",
    "transcode_file",
]
