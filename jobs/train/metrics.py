"""Per-step training metrics: throughput, MFU, data-wait fraction; JSONL + TensorBoard; reconstruction grids.

Why rank 0 writes a JSONL file besides TensorBoard: after a worker failure Ray Train replays the steps since
the last checkpoint, so a step may be logged twice. The JSONL reader keeps the last record per step, which
is the sequence an uninterrupted run would have produced (tests compare exactly that).

Units: times in seconds, throughput in clips/s summed over all workers, FLOPs as multiply-adds x 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
import torch
from einops import repeat

from model import VideoMAE

# Dense bf16 tensor-core peak per device (FLOP/s), from the vendors' data sheets, matched against
# torch.cuda.get_device_name by the longest name it contains ("NVIDIA H100 PCIe" is not an SXM H100).
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def peak_flops_for(name: str) -> float | None:
    """The data-sheet peak of a GPU by its device name (the longest matching entry), or None."""
    hits = [k for k in GPU_PEAK_FLOPS if k in name]
    return GPU_PEAK_FLOPS[max(hits, key=len)] if hits else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """What rank 0 logs and how often; ``peak_flops_per_worker`` overrides the MFU denominator."""

    log_every: int = 1
    image_every: int = 0  # steps between reconstruction PNGs; 0 = never
    tensorboard: bool = True
    peak_flops_per_worker: float | None = None

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"metrics.log_every must be >= 1, got {self.log_every}")
        if self.image_every < 0:
            raise ValueError(f"metrics.image_every must be >= 0, got {self.image_every}")
        if self.peak_flops_per_worker is not None and not self.peak_flops_per_worker > 0:
            raise ValueError(f"metrics.peak_flops_per_worker must be > 0, got {self.peak_flops_per_worker}")


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s of this process's torch threads: the CPU "peak" for MFU.

    CPUs have no single data-sheet number for torch's kernels; the best observed GEMM rate is the honest
    ceiling for what this worker could reach.
    """
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def device_peak_flops(device: torch.device, override: float | None = None) -> float:
    """Peak FLOP/s of one worker's device: ``override``, else the GPU table, else a measured CPU GEMM."""
    if override is not None:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = peak_flops_for(name)
        if flops is not None:
            return flops
        raise ValueError(f"no peak FLOP/s known for GPU {name!r}; set metrics.peak_flops_per_worker")
    return measure_cpu_peak_flops()


def mfu(clips_per_s: float, train_flops_per_clip: float, peak_flops_total: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all workers together."""
    if peak_flops_total <= 0:
        raise ValueError(f"peak_flops_total must be > 0, got {peak_flops_total}")
    return clips_per_s * train_flops_per_clip / peak_flops_total


class StepTimer:
    """Splits each optimizer step's wall time into waiting for data and computing."""

    def __init__(self) -> None:
        self.data_s = 0.0
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self.data_s = 0.0
        self._t0 = time.perf_counter()

    def data(self, seconds: float) -> None:
        self.data_s += seconds

    def stop(self) -> tuple[float, float]:
        """(step seconds, data-wait fraction) since :meth:`start`."""
        total = max(time.perf_counter() - self._t0, 1e-12)
        return total, min(self.data_s / total, 1.0)


class MetricsLogger:
    """Rank 0's metric sink: one JSON line per step in ``metrics.jsonl`` and TensorBoard scalars."""

    def __init__(self, log_dir: str, *, tensorboard: bool = True) -> None:
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", buffering=1)  # noqa: SIM115
        self._tb = None
        if tensorboard:
            # local import: tensorboard costs ~1 s of start-up and only runs that ask for it need it
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._jsonl.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"train/{k}", v, global_step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> dict[int, dict[str, Any]]:
    """``metrics.jsonl`` as {step: record}, the last record of a step winning (replayed steps)."""
    out: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out[int(rec["step"])] = rec
    return dict(sorted(out.items()))


def _to_image(frame_CHW: torch.Tensor) -> np.ndarray:
    return frame_CHW.float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def pixel_mask(mask_L: torch.Tensor, *, grid: tuple[int, int, int], tubelet: int, patch: int) -> torch.Tensor:
    """Token mask ``[L]`` (tokens ordered ``(t, h, w)``) -> pixel mask ``[T, H, W]``."""
    t, h, w = grid
    if mask_L.shape != (t * h * w,):
        raise ValueError(f"mask must be [L] = [{t * h * w}] for grid {grid}, got {tuple(mask_L.shape)}")
    return repeat(mask_L.reshape(t, h, w), "t h w -> (t a) (h b) (w c)", a=tubelet, b=patch, c=patch)


# the two ways a norm_pix_loss prediction becomes pixels (``VideoMAE.reconstruct``), one labelled PNG row each
VISIBLE_STATS = "reconstruction: visible tubelets' mean/std (no ground truth)"
TRUE_STATS = "reconstruction: each tubelet's true mean/std (official visualisation)"


def reconstructions(
    model: torch.nn.Module, video_BCTHW: torch.Tensor, mask_BL: torch.Tensor, pred_BMP: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Both pixel reconstructions of ``VideoMAE(video, mask)``'s prediction ``pred`` ``[B, M, P]`` (every masked
    token), label -> ``[B, C, T, H, W]`` in ``[0, 1]`` units (CPU, float32): un-normalised with the mean of the
    visible tubelets' statistics, which shows what the model alone knows (with a young model, masked tubelets
    come out nearly flat), and with each masked tubelet's own true statistics, as the official VideoMAE
    visualisation does (it lends the prediction the true brightness and contrast of every tubelet)."""
    # the class function, not the instance method: FSDP registers the latter as a collective forward
    return {
        label: VideoMAE.reconstruct(model, video_BCTHW, pred_BMP, mask_BL, oracle_stats=oracle).float().cpu()
        for label, oracle in ((VISIBLE_STATS, False), (TRUE_STATS, True))
    }


def save_reconstruction_grid(
    path: str,
    video_CTHW: torch.Tensor,
    mask_THW: torch.Tensor,
    recon_CTHW: torch.Tensor | dict[str, torch.Tensor],
    *,
    max_frames: int = 8,
) -> list[str]:
    """PNG grid, one column per frame: original / masked (masked pixels grey) / one row per reconstruction
    (``recon_CTHW``: label -> clip, or one clip labelled "reconstruction"); returns the row labels drawn.

    Clips are RGB ``[3, T, H, W]`` in ``[0, 1]`` pixel units (clamped); ``mask_THW`` is a pixel mask
    ``[T, H, W]`` (True = masked).
    """
    # local import: matplotlib costs ~0.5 s of start-up (every Ray Train worker) and only logged steps draw
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recons = recon_CTHW if isinstance(recon_CTHW, dict) else {"reconstruction": recon_CTHW}
    if (
        not recons
        or any(r.shape != video_CTHW.shape for r in recons.values())
        or video_CTHW.shape[1:] != mask_THW.shape
    ):
        raise ValueError(
            f"grid shapes disagree: video {tuple(video_CTHW.shape)}, "
            f"recon {[tuple(r.shape) for r in recons.values()]}, mask {tuple(mask_THW.shape)}"
        )
    titles = ["original", "masked", *recons]
    frames = min(video_CTHW.shape[1], max_frames)
    fig, axes = plt.subplots(len(titles), frames, figsize=(1.6 * frames, 1.7 * len(titles)), squeeze=False)
    for t in range(frames):
        orig = _to_image(video_CTHW[:, t])
        masked = orig.copy()
        masked[mask_THW[t].cpu().numpy()] = 0.5
        for row, img in enumerate((orig, masked, *(_to_image(r[:, t]) for r in recons.values()))):
            axes[row, t].imshow(img)
            axes[row, t].axis("off")
    for row, title in enumerate(titles):
        axes[row, 0].set_title(title, fontsize=8, loc="left")
    drawn = [axes[row, 0].get_title(loc="left") for row in range(len(titles))]
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return drawn
