"""Clips/s per CPU core: the shard loader vs the official VideoMAE way of reading full-resolution sources.

Why: transcoding once to short side 320 with a short GOP should make every later epoch cheaper to decode.
Both sides run in this one process, one core each (``torch.set_num_threads(1)``, decord ``num_threads=1``,
no DataLoader workers), with the same clip spec (16 frames, stride 4), the same multi-scale crop to 224,
normalisation and tube masks:

* ``shards``: ``pipeline.loader`` over a shard set of the sources transcoded by ``pipeline.transcode``.
* ``source``: per clip, ``decord.VideoReader(path)`` on the original 1280x720 file (GOP 250, like typical
  uploads), the official sampler, then the same transforms - what the official loader does per sample.

Also records the loader's RSS over a longer multi-epoch run (goal: flat, i.e. no growth after warm-up).

    python benchmarks/loader_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tempfile
import time

import decord
import pyarrow as pa
import torch
import webdataset as wds
from common import machine, source_frames
from tqdm import tqdm

from model.config import get_config
from pipeline import storage
from pipeline.clips import sample_frame_indices, sample_generator
from pipeline.encode import encode_mp4
from pipeline.loader import LoaderConfig, make_loader
from pipeline.manifest import INDEX_NAME, Manifest, ShardInfo, write_manifest, write_table_atomic
from pipeline.masking import clip_masks
from pipeline.transcode import TranscodeConfig, transcode
from pipeline.transforms import apply_crop, sample_crop

NAME = "loader_throughput"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{NAME}.json")


def make_data(root: str, n: int, frames: int, copies: int) -> tuple[list[str], str]:
    """Write ``n`` 1280x720 sources and a one-shard set holding ``copies`` keys per 320p transcode (so an
    epoch is long enough to amortise its set-up, as in real data); return (source paths, manifest URL)."""
    paths, keys, tar_buf = [], [], io.BytesIO()
    tcfg = TranscodeConfig(short_side=320, fps=30.0)
    with wds.TarWriter(tar_buf) as tar:
        for i in tqdm(range(n), desc="sources: 1280x720 encode + 320p transcode"):
            path = os.path.join(root, f"src{i:03d}.mp4")
            with open(path, "wb") as f:
                f.write(encode_mp4(source_frames(i, frames), fps=30, gop=250, crf=23))
            mp4 = transcode(path, tcfg)[0]
            meta = {
                "fps": 30,
                "frames": frames,
                "width": 568,
                "height": 320,
                "label": i % 3,
                "domain": "synthetic",
            }
            for c in range(copies):
                key = f"v{i:03d}c{c:03d}"
                tar.write(
                    {
                        "__key__": key,
                        "mp4": mp4,
                        "json": json.dumps(meta).encode(),
                        "cls": str(i % 3).encode(),
                    }
                )
                keys.append(key)
            paths.append(path)
    data = tar_buf.getvalue()
    shards = os.path.join(root, "shards")
    storage.write_bytes_atomic(storage.join(shards, "shard-000000.tar"), data)
    info = ShardInfo(name="shard-000000.tar", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                     num_samples=len(keys), keys=tuple(keys))  # fmt: skip
    write_table_atomic(
        storage.join(shards, INDEX_NAME), pa.table({"key": keys, "shard": ["shard-000000.tar"] * len(keys)})
    )
    write_manifest(storage.join(shards, "manifest.json"),
                   Manifest(shards=(info,), num_samples=len(keys), config={}, code_version="bench", created="bench"))  # fmt: skip
    return paths, shards


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# the clip of the paper's recipe: 16 frames of 224^2 in 2 x 16^2 tubelets, tube mask 0.9 (model/config.py)
SPEC = get_config("vit_b").clip_spec()


def loader_clips(cfg: LoaderConfig):
    """Endless: clips per batch of the shard loader, epoch after epoch."""
    loader = make_loader(cfg, SPEC)
    while True:
        for batch in loader:
            yield batch["video"].shape[0]


def source_clips(paths: list[str], cfg: LoaderConfig):
    """Endless: the official path, one clip per step - open the full-resolution file, sample, decode, same
    transforms and mask."""
    spec, epoch = SPEC, 0
    while True:
        for i, path in enumerate(paths):
            key = f"v{i:05d}"
            vr = decord.VideoReader(path, num_threads=1)
            g_time = sample_generator(0, epoch, key, "time")
            idx = sample_frame_indices(len(vr), spec.num_frames, cfg.sampling_rate, g_time)
            frames = torch.from_numpy(vr.get_batch(idx).asnumpy()).permute(0, 3, 1, 2)
            g = sample_generator(0, epoch, key, "aug0")
            crop = sample_crop(frames.shape[-1], frames.shape[-2], input_size=spec.input_size, generator=g)
            video = apply_crop(frames, crop, input_size=spec.input_size)[None]
            mask = clip_masks(spec, [sample_generator(0, epoch, key, "mask0")])
            assert video.shape[0] == mask.shape[0] == 1
            yield 1
        epoch += 1


def interleaved(paths: dict[str, object], seconds: float, block_s: float) -> dict[str, dict]:
    """Run the paths in turns of ``block_s`` wall seconds until ``seconds`` pass, so all see the same machine
    load (turns, not single steps: stepping the 720p path between loader steps evicts the loader's caches).
    The rate is clips per CPU-second of this process (= clips/s on one core); the wall-clock rate alongside."""
    acc = {name: {"clips": 0, "cpu_s": 0.0, "wall_s": 0.0} for name in paths}
    for it in paths.values():  # warm-up: first decode, loader set-up
        next(it)
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or any(a["clips"] == 0 for a in acc.values()):
        for name, it in paths.items():
            a = acc[name]
            c0, w0 = time.process_time(), time.perf_counter()
            while True:
                a["clips"] += next(it)
                if time.perf_counter() - w0 >= block_s:
                    break
            a["cpu_s"] += time.process_time() - c0
            a["wall_s"] += time.perf_counter() - w0
    for a in acc.values():
        a["clips_per_cpu_s"] = a["clips"] / a["cpu_s"]
        a["clips_per_wall_s"] = a["clips"] / a["wall_s"]
    return acc


def rss_run(cfg: LoaderConfig, seconds: float) -> dict:
    """Whole epochs of the loader for ``seconds`` (at least one); RSS (MB) sampled every batch. Growth is
    measured after the first quarter of the batches (imports and first-use allocations done)."""
    loader = make_loader(cfg, SPEC)
    rss, t0 = [], time.perf_counter()
    while not rss or time.perf_counter() - t0 < seconds:
        for _ in loader:
            rss.append(rss_mb())
    warm = rss[len(rss) // 4]
    return {"epochs": loader.epoch, "batches": len(rss), "seconds": time.perf_counter() - t0,
            "rss_mb_after_warmup": warm, "rss_mb_peak": max(rss), "rss_mb_end": rss[-1],
            "rss_growth_mb": max(rss[len(rss) // 4 :]) - warm}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small run that ends within ~45 s on 2 cores")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    n, frames, copies, seconds, rss_seconds = (
        (2, 240, 8, 10.0, 4.0) if args.quick else (8, 240, 4, 90.0, 120.0)
    )
    with tempfile.TemporaryDirectory(prefix="vmae-bench-") as root:
        paths, shards = make_data(root, n, frames, copies)
        cfg = LoaderConfig(manifest=shards, batch_size=1, num_workers=0, shuffle_buffer=8, seed=0)
        cfg2 = LoaderConfig(manifest=shards, batch_size=2, num_sample=2, num_workers=0, shuffle_buffer=8)
        runs = {
            "source": source_clips(paths, cfg),
            "shards": loader_clips(cfg),
            "shards_num_sample_2": loader_clips(cfg2),
        }
        res = interleaved(runs, seconds, block_s=seconds / 6)
        long = rss_run(cfg, rss_seconds)
    source, shard, repeated = res["source"], res["shards"], res["shards_num_sample_2"]
    ratio = shard["clips_per_cpu_s"] / source["clips_per_cpu_s"]
    rows = [("source 1280x720, decord per clip", source), ("shards 320p (loader)", shard),
            ("shards 320p, num_sample=2", repeated)]  # fmt: skip
    print(
        f"\n{'path (16x4 clips -> 224)':<34} {'clips':>6} {'cpu s':>6} {'clips/cpu-s':>12} {'clips/wall-s':>13} {'ratio':>6}"
    )
    for name, r in rows:
        print(f"{name:<34} {r['clips']:>6} {r['cpu_s']:>6.1f} {r['clips_per_cpu_s']:>12.2f} "
              f"{r['clips_per_wall_s']:>13.2f} {r['clips_per_cpu_s'] / source['clips_per_cpu_s']:>5.2f}x")  # fmt: skip
    print(f"RSS over {long['epochs']} epochs ({long['seconds']:.0f} s): after warm-up "
          f"{long['rss_mb_after_warmup']:.0f} MB, peak {long['rss_mb_peak']:.0f} MB, "
          f"end {long['rss_mb_end']:.0f} MB, growth {long['rss_growth_mb']:.1f} MB")  # fmt: skip
    result = {"name": NAME, "quick": args.quick, "machine": machine(decord=decord.__version__), "sources": n, "frames_per_source": frames,
              "shard_keys_per_source": copies,
              "clip": {"num_frames": 16, "sampling_rate": 4, "input_size": 224},
              "rate_unit": "clips per CPU-second of one single-threaded process (= clips/s per core)",
              "source": source, "shards": shard, "shards_num_sample_2": repeated, "ratio": ratio, "rss": long}  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"RESULT {NAME} shard_clips_per_s_core={shard['clips_per_cpu_s']:.2f} "
        f"source_clips_per_s_core={source['clips_per_cpu_s']:.2f} ratio={ratio:.2f} "
        f"repeated_clips_per_s_core={repeated['clips_per_cpu_s']:.2f} rss_growth_mb={long['rss_growth_mb']:.1f}"
    )
    return result


if __name__ == "__main__":
    main()
