"""Encode frames to H.264 MP4 bytes in memory with PyAV (FFmpeg's libraries; no ffmpeg binary needed).

Used by the transcoder, the synthetic data generator and the tests' fixtures, so every MP4 this project
writes is made the same way: yuv420p, constant frame rate, a short GOP for fast random access, no audio.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np


def encode_mp4(
    frames_THWC: np.ndarray,
    *,
    fps: float | Fraction = 30,
    crf: int = 23,
    gop: int = 16,
    preset: str = "veryfast",
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    container: str = "mp4",
    threads: int = 1,
    bframes: int | None = None,
    tune: str | None = None,
    mbtree: bool = False,
) -> bytes:
    """``frames_THWC``: uint8 RGB frames [T, H, W, 3]. Returns the container bytes.

    H.264 in yuv420p needs even width and height; odd sizes raise ``ValueError`` (the transcoder rounds
    before calling). ``threads`` is per encoder: the pipeline parallelises across videos, not inside one.
    libx264 only: ``bframes`` caps consecutive B-frames (``None``: the preset's; 0: none) and ``tune`` is an
    x264 tune (``fastdecode``: no CABAC, no deblocking, no weighted prediction; ``None``: none); ``mbtree``
    turns x264's macroblock-tree rate control back on (the shard transcoder keeps it: ~25-40% fewer bytes,
    but the same frames no longer always encode to the same bytes).
    """
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3 or frames_THWC.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames_THWC.dtype} {frames_THWC.shape}")
    t, h, w, _ = frames_THWC.shape
    if t == 0:
        raise ValueError("cannot encode zero frames")
    if pix_fmt == "yuv420p" and (h % 2 or w % 2):
        raise ValueError(f"yuv420p needs even dimensions, got {w}x{h}")
    buf = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            # mbtree off by default: with it, this x264 build's SIMD path makes the same frames encode to
            # different bytes from run to run (seen on ~1 clip in 12); without it, encoding is deterministic.
            stream.options = {
                "crf": str(crf), "preset": preset, "g": str(gop), "keyint_min": str(gop),
                "x264-params": f"mbtree={int(mbtree)}",
                **({"bf": str(bframes)} if bframes is not None else {}), **({"tune": tune} if tune else {}),
            }  # fmt: skip
            stream.codec_context.gop_size = gop
        stream.thread_count = threads
        for frame in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def decode_all(data: bytes) -> np.ndarray:
    """Decode every frame of a video held in memory to uint8 RGB [T, H, W, 3] (tests and probes)."""
    with av.open(io.BytesIO(data)) as inp:
        frames = [f.to_ndarray(format="rgb24") for f in inp.decode(video=0)]
    if not frames:
        raise ValueError("no video frames decoded")
    return np.stack(frames)
