"""Tiny synthetic test videos, including the bad kinds a real bucket holds. Import from any test.

Why: the shard job must either transcode or reject every kind of input it meets in the wild; these
generators make each kind in a few milliseconds with PyAV (no ffmpeg binary), deterministically.

    from tests.videos import make_video, video_bytes, KINDS
    make_video(tmp_path / "a.mp4", kind="rotated", width=64, height=48, frames=12)

Frames are uint8 RGB [T, H, W, 3]. Pattern ``"moving"`` is a smooth gradient with a bright square that
moves one step per frame (survives 4:2:0 chroma and lossy coding); pattern ``"index"`` makes every frame
one flat grey level ``index_level(i)`` so a test can tell which source frame an output frame came from.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np

os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per encoder otherwise

# kind -> default file extension. Content is chosen by kind, never by the file name: "wrong_ext" is a
# plain H.264 MP4 meant to be saved under a misleading extension.
KINDS: dict[str, str] = {
    "ok": ".mp4",
    "with_audio": ".mp4",
    "one_frame": ".mp4",
    "odd_dims": ".mp4",
    "rotated": ".mp4",
    "vfr": ".mp4",
    "10bit": ".mp4",
    "vp9": ".webm",
    "av1": ".mkv",
    "mjpeg": ".avi",
    "huge": ".mp4",
    "wrong_ext": ".avi",
    "truncated": ".mp4",
    "zero_byte": ".mp4",
    "not_video": ".mp4",
    "audio_only": ".mp4",
}


def index_level(i: int) -> int:
    """Grey level of frame ``i`` in the ``"index"`` pattern: 12 levels apart, far above coding noise."""
    return 16 + (12 * i) % 224


def frames_THWC(
    frames: int, height: int, width: int, *, pattern: str = "moving", seed: int = 0
) -> np.ndarray:
    """uint8 RGB frames [T, H, W, 3] of a synthetic pattern (see module docstring)."""
    if pattern == "index":
        levels = np.array([index_level(i) for i in range(frames)], np.uint8)
        return np.broadcast_to(levels[:, None, None, None], (frames, height, width, 3)).copy()
    if pattern != "moving":
        raise ValueError(f"pattern must be 'moving' or 'index', got {pattern!r}")
    rng = np.random.default_rng(seed)
    tint = rng.integers(0, 96, size=3)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack(
        [xx * 160 // max(width, 1), yy * 160 // max(height, 1), (xx + yy) * 80 // (width + height)], -1
    )
    out = np.empty((frames, height, width, 3), np.uint8)
    side = max(2, min(height, width) // 4)
    for t in range(frames):
        img = (base + tint).clip(0, 255).astype(np.uint8)
        x0 = (2 * t) % max(1, width - side)
        y0 = (t) % max(1, height - side)
        img[y0 : y0 + side, x0 : x0 + side] = 255
        out[t] = img
    return out


def encode(
    frames: np.ndarray,
    *,
    codec: str = "libx264",
    container: str = "mp4",
    pix_fmt: str = "yuv420p",
    fps: float = 25,
    pts_ms: list[int] | None = None,
    rotation: int = 0,
    audio: bool = False,
) -> bytes:
    """Encode RGB frames [T, H, W, 3] with any PyAV encoder; ``pts_ms`` gives explicit (variable)
    timestamps in milliseconds; ``rotation`` writes a display matrix (counter-clockwise degrees)."""
    if codec.startswith("libvpx") and "decord" in sys.modules:
        kwargs = dict(
            codec=codec,
            container=container,
            pix_fmt=pix_fmt,
            fps=fps,
            pts_ms=pts_ms,
            rotation=rotation,
            audio=audio,
        )
        return _encode_isolated(frames, kwargs)
    buf = io.BytesIO()
    _, h, w, _ = frames.shape
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18"}
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        astream = out.add_stream("aac", rate=16000) if audio else None
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        if astream is not None:
            _write_audio(out, astream, seconds=len(frames) / fps)
    return buf.getvalue()


def _encode_isolated(frames: np.ndarray, kwargs: dict) -> bytes:
    """``encode`` in a fresh interpreter. decord loads its bundled (older) libvpx with RTLD_GLOBAL, and from
    then on PyAV's libvpx-vp9 encoder in this process fails to open (EINVAL)."""
    buf = io.BytesIO()
    np.save(buf, frames)
    code = (
        "import io, json, sys; import numpy as np; from tests.videos import encode; "
        "sys.stdout.buffer.write(encode(np.load(io.BytesIO(sys.stdin.buffer.read())), **json.loads(sys.argv[1])))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], input=buf.getvalue(), capture_output=True, cwd=root
    )
    if out.returncode:
        raise RuntimeError(f"isolated encode failed: {out.stderr.decode()[-500:]}")
    return out.stdout


def _write_audio(out, astream, *, seconds: float) -> None:
    samples = np.sin(np.linspace(0, 440 * 2 * np.pi * seconds, int(16000 * seconds))).astype(np.float32)
    for start in range(0, len(samples), 1024):
        chunk = samples[start : start + 1024]
        if len(chunk) < 1024:
            chunk = np.pad(chunk, (0, 1024 - len(chunk)))
        frame = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, start
        out.mux(astream.encode(frame))
    out.mux(astream.encode())


def video_bytes(
    kind: str = "ok",
    *,
    width: int = 64,
    height: int = 48,
    frames: int = 16,
    fps: float = 25,
    pattern: str = "moving",
    seed: int = 0,
    rotation: int = 90,
) -> bytes:
    """The bytes of one test video of ``kind`` (see ``KINDS``). Size/length arguments apply where the kind
    allows: ``one_frame`` forces 1 frame, ``odd_dims`` adds 1 to even sizes, ``huge`` is 4000x64."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if kind == "zero_byte":
        return b""
    if kind == "not_video":
        return np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    if kind == "audio_only":
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="mp4") as out:
            _write_audio(out, out.add_stream("aac", rate=16000), seconds=frames / fps)
        return buf.getvalue()
    if kind == "one_frame":
        frames = 1
    if kind == "huge":
        width, height = 4000, 64
    if kind == "odd_dims":
        width, height = width | 1, height | 1
    rgb = frames_THWC(frames, height, width, pattern=pattern, seed=seed)
    if kind in ("ok", "one_frame", "huge", "wrong_ext"):
        return encode(rgb, fps=fps)
    if kind == "with_audio":
        return encode(rgb, fps=fps, audio=True)
    if kind == "truncated":
        data = encode(rgb, fps=fps)
        return data[: len(data) // 2]
    if kind == "odd_dims":  # 4:2:0 cannot hold odd sizes; real odd-sized files are 4:4:4 or MJPEG
        return encode(rgb, fps=fps, pix_fmt="yuv444p")
    if kind == "rotated":
        return encode(rgb, fps=fps, rotation=rotation)
    if kind == "vfr":
        gaps = [20 if i % 3 else 80 for i in range(frames)]  # 50 fps bursts with 80 ms holes
        return encode(rgb, fps=fps, pts_ms=[int(x) for x in np.cumsum([0] + gaps[:-1])])
    if kind == "10bit":
        return encode(rgb, fps=fps, pix_fmt="yuv420p10le")
    if kind == "vp9":
        return encode(rgb, codec="libvpx-vp9", container="webm", fps=fps)
    if kind == "av1":
        return encode(rgb, codec="libsvtav1", container="matroska", fps=fps)
    if kind == "mjpeg":
        return encode(rgb, codec="mjpeg", container="avi", pix_fmt="yuvj420p", fps=fps)
    raise AssertionError(f"unhandled kind {kind!r}")


def make_video(path: str | os.PathLike, kind: str = "ok", **kwargs) -> str:
    """Write ``video_bytes(kind, **kwargs)`` to ``path`` (parents created); returns the path as ``str``."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(video_bytes(kind, **kwargs))
    return path


def make_labelled_tree(
    root: str | os.PathLike,
    classes: tuple[str, ...] = ("jump", "run", "swim"),
    per_class: int = 2,
    **kwargs,
) -> list[str]:
    """A UCF101-style tree ``root/<class>/v_<class>_gNN.mp4`` of ``ok`` videos (distinct seeds)."""
    paths = []
    for c, name in enumerate(classes):
        for g in range(per_class):
            p = os.path.join(os.fspath(root), name, f"v_{name}_g{g:02d}.mp4")
            paths.append(make_video(p, "ok", seed=c * 100 + g, **kwargs))
    return paths
