"""What the official finetuning augmentation costs the loader, and where random erasing belongs.

Why: a decode worker's clips/s per CPU core decides how many GPUs a node can feed, and RandAugment (PIL ops on
uint8 frames) can only run there. Every path runs in this one process on one core (``torch.set_num_threads(1)``),
in alternating turns so all see the same machine load, on the ViT-B finetuning clip (16 frames of 224^2, stride
4, 2 clips per decode) cut from 320p MP4s (the shard job's short side):

* ``loader``: ``make_clips`` as today (decode, crop, uint8 clips).
* ``loader + RandAugment``: the same with ``loader.rand_augment: rand-m7-n4-mstd0.5-inc1``, which augments the
  whole 320p frames before the crop, as the official loader does.
* ``loader + RA after crop``: the same ops on the 224^2 crops instead (not the official order: what exactness
  costs).
* ``loader + erasing in the loader``: the alternative placement of random erasing: normalise each clip to
  float32 on the CPU and erase there (the official loader's place); the loader would then ship 4x the bytes.

Random erasing on the training device (what ``jobs.train.finetune`` does) costs the loader nothing; its CPU
cost per clip is measured too (``erase on device, CPU stand-in``), for scale. Rates are clips per CPU-second of
this process; ratios are medians over rounds of the per-round ratios to ``loader``.

    python benchmarks/finetune_augment.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from common import machine, source_frames

from jobs.train.config import AugmentSection
from jobs.train.finetune import erase_clips
from model.config import get_config
from pipeline.ingest.encode import encode_mp4
from pipeline.loader.clips import make_clips, sample_generator
from pipeline.loader.config import LoaderConfig
from pipeline.loader.normalize import normalize
from pipeline.loader.rand_augment import rand_augment, rand_augment_frames

NAME = "finetune_augment"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{NAME}.json")
SPEC = get_config("vit_b").clip_spec(masking=False)
OFFICIAL = AugmentSection(reprob=0.25, remode="pixel", recount=1)


def paths(mp4s: list[bytes]) -> dict:
    plain = LoaderConfig(manifest="unused", num_sample=2, batch_size=2)
    ra = LoaderConfig(manifest="unused", num_sample=2, batch_size=2, rand_augment="rand-m7-n4-mstd0.5-inc1")
    transform = rand_augment(ra.rand_augment, SPEC.input_size)

    def clips(cfg: LoaderConfig, i: int) -> torch.Tensor:
        return make_clips(mp4s[i % len(mp4s)], f"v{i}", SPEC, cfg, seed=0, epoch=0)[0]

    def ra_after_crop(i: int) -> None:
        for r, clip in enumerate(clips(plain, i)):  # [C, T, S, S] -> frames [T, S, S, C]
            rand_augment_frames(
                clip.permute(1, 2, 3, 0).numpy(), transform, sample_generator(0, 0, f"v{i}", f"ra{r}")
            )

    def erase_in_loader(i: int) -> None:
        erase_clips(normalize(clips(plain, i).contiguous()), OFFICIAL)

    normalise_only = lambda i: normalize(clips(plain, i).contiguous())  # noqa: E731
    return {
        "loader": lambda i: clips(plain, i),
        "loader + RandAugment": lambda i: clips(ra, i),
        "loader + RA after crop": ra_after_crop,
        "loader + erasing in the loader": erase_in_loader,
        "loader + normalise only": normalise_only,
    }


def interleaved(fns: dict, rounds: int, block_s: float) -> dict[str, dict]:
    """Each round runs every path for >= ``block_s`` CPU-seconds; clips/s per round (2 clips per call)."""
    rates: dict[str, list[float]] = {k: [] for k in fns}
    i = 0
    for _ in range(rounds):
        for name, fn in fns.items():
            c0, n = time.process_time(), 0
            while time.process_time() - c0 < block_s:
                fn(i)
                i, n = i + 1, n + 2
            rates[name].append(n / (time.process_time() - c0))
    base = rates["loader"]
    return {
        k: {"clips_per_cpu_s": statistics.median(v),
            "ratio_to_loader": statistics.median(x / b for x, b in zip(v, base, strict=True)), "rounds": v}
        for k, v in rates.items()
    }  # fmt: skip


def erase_cost(reps: int) -> float:
    """CPU ms per clip of erasing a batch of 12 normalised clips (the device's work, on the CPU for scale)."""
    x = torch.randn(12, 3, SPEC.num_frames, SPEC.input_size, SPEC.input_size)
    times = []
    for _ in range(reps):
        c0 = time.process_time()
        erase_clips(x, OFFICIAL)
        times.append((time.process_time() - c0) / 12 * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    videos, rounds, block_s = (2, 3, 1.0) if args.quick else (4, 7, 4.0)
    mp4s = [
        encode_mp4(source_frames(i, 96, 320, 568), fps=30, gop=32, tune="fastdecode") for i in range(videos)
    ]
    start = machine()
    rates = interleaved(paths(mp4s), rounds, block_s)
    out = {"machine_before": start, "rates": rates, "erase_ms_per_clip_cpu": erase_cost(5 if args.quick else 20),
           "load_avg_1m_after": os.getloadavg()[0], "frames": "16 x 224^2 from 320x568, 2 clips per decode"}  # fmt: skip
    if not args.quick:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w") as f:
            json.dump(out, f, indent=1)
    for k, v in rates.items():
        print(f"{k:34s} {v['clips_per_cpu_s']:7.1f} clips/CPU-s  x{v['ratio_to_loader']:.2f}")
    print(f"erasing (device work, on CPU): {out['erase_ms_per_clip_cpu']:.2f} ms/clip; "
          f"load {start['load_avg_1m']:.1f} -> {out['load_avg_1m_after']:.1f}")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
