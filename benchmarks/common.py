"""What every benchmark shares: the machine description recorded beside each result, and the synthetic
'footage' the data benchmarks encode (a window panning over a textured canvas: codes like real video, not noise).

Benchmarks run as scripts (``python benchmarks/<name>.py``), so this module is imported as ``common``.
"""

from __future__ import annotations

import os
import platform

import numpy as np


def machine(**extra: object) -> dict:
    """CPU model and count, GPU (or "no GPU"), versions and the 1-minute load average (a load above the core
    count means the timings were contended). ``extra`` adds benchmark-specific fields."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        torch_version = torch.__version__
    except ImportError:
        gpu, torch_version = "no GPU", None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch_version,
        "load_avg_1m": os.getloadavg()[0],
        **extra,
    }


def source_frames(i: int, frames: int, height: int = 720, width: int = 1280) -> np.ndarray:
    """uint8 [T, H, W, 3]: a window panning 3 px/frame right and 2 px/frame down over a textured canvas."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0 : height + 2 * frames, 0 : width + 3 * frames]
    tex = (
        rng.integers(0, 40, (yy.shape[0] // 8 + 1, xx.shape[1] // 8 + 1), dtype=np.uint8)
        .repeat(8, 0)
        .repeat(8, 1)
    )
    base = ((xx // 4 + yy // 6 + 17 * i) % 200).astype(np.uint8) + tex[: yy.shape[0], : xx.shape[1]]
    canvas = np.stack([base, base // 2 + 20, 255 - base], -1)
    return np.stack([canvas[2 * t : 2 * t + height, 3 * t : 3 * t + width] for t in range(frames)])
