"""Clips/s per CPU core of the training loader, side by side with today's loader and the official VideoMAE way.

Why: one GPU eats ~1900 ViT-B clips/s, i.e. 76-158 clips/s for each CPU core of a GPU node, so the loader's cost
per clip decides how many GPUs a node can feed. Every path runs in this one process on one core
(``torch.set_num_threads(1)``, one decoder thread, no DataLoader workers), in alternating turns so all of them
see the same machine load, with the same clip spec (16 frames, stride 4, multi-scale crop to 224, tube mask):

* ``official``: per clip, ``decord.VideoReader(path)`` on the original 1280x720 file (GOP 250, like typical
  uploads), the official sampler, crop and normalise on the CPU (float32), one clip.
* ``today``: the loader as it was before issue 12, on shards of its encoder settings (``TODAY_SHARDS``): decord
  ``get_batch``, crop + normalise to float32 per clip, float collate.
* ``new R=1/2/4``: ``pipeline.loader.loader`` with its defaults on shards of the default ``TranscodeConfig``: the
  ``auto`` decode backend, uint8 clips (normalised later on the training device), ``num_sample`` R clips per
  decode. ``backend=...`` rows (full run) change only the decode backend.

Then the shard encoder settings (``pipeline.ingest.encode.encode_mp4`` with the transcoder's rate control on the same
320p / 256p frames): bytes per video and decode + crop cost per clip, relative to today's settings; and the loader's RSS over >= 2000 clips (PyAV's
frame iteration is known to leak in data loaders). Rates are clips per CPU-second of this process (= clips/s on
one core); ratios are medians over rounds of the per-round ratios. The machine's load average is recorded
before and after: on a shared box, trust the ratios, not the absolute rates.

    python benchmarks/loader_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import statistics
import tempfile
import time

import decord
import pyarrow as pa
import torch
import webdataset as wds
from common import machine, source_frames

from model.config import get_config
from pipeline import storage
from pipeline.ingest.encode import encode_mp4
from pipeline.ingest.manifest import INDEX_NAME, Manifest, ShardInfo, write_manifest, write_table_atomic
from pipeline.ingest.transcode import TranscodeConfig, transcode
from pipeline.loader.clips import make_clips, sample_frame_indices, sample_generator
from pipeline.loader.config import LoaderConfig
from pipeline.loader.decode import AUTO_ORDER, backend_error, parse_label, read_clip_frames, stream_in_order
from pipeline.loader.loader import make_loader
from pipeline.loader.masking import clip_masks
from pipeline.loader.plan import load_shards
from pipeline.loader.transforms import apply_crop, sample_crop

NAME = "loader_throughput"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{NAME}.json")
# the clip of the paper's recipe: 16 frames of 224^2 in 2 x 16^2 tubelets, tube mask 0.9 (model/config.py)
SPEC = get_config("vit_b").clip_spec()
TODAY_SHARDS = TranscodeConfig(
    short_side=320, fps=30.0, gop=16, tune=""
)  # the shard job settings before issue 12
# encoder settings compared on the same frames: (short side, encode_mp4 keyword arguments)
ENCODINGS = {
    "today: gop 16": (320, dict(gop=16)),
    "gop 16 fastdecode": (320, dict(gop=16, tune="fastdecode")),
    "gop 16 no B-frames": (320, dict(gop=16, bframes=0)),
    "gop 32": (320, dict(gop=32)),
    "gop 32 fastdecode (default)": (320, dict(gop=32, tune="fastdecode")),
    "gop 32 fastdecode no B": (320, dict(gop=32, tune="fastdecode", bframes=0)),
    "gop 32 fastdecode crf 26": (320, dict(gop=32, tune="fastdecode", crf=26)),
    "gop 64 fastdecode": (320, dict(gop=64, tune="fastdecode")),
    "gop 300 fastdecode": (320, dict(gop=300, tune="fastdecode")),
    "256p gop 16": (256, dict(gop=16)),
    "256p gop 32 fastdecode": (256, dict(gop=32, tune="fastdecode")),
}
QUICK_ENCODINGS = (
    "today: gop 16",
    "gop 16 fastdecode",
    "gop 32 fastdecode (default)",
    "256p gop 32 fastdecode",
)


def write_shard_set(root: str, mp4s: list[bytes], copies: int) -> str:
    """One shard holding ``copies`` keys per video (so an epoch is long enough to amortise its set-up, as in
    real data); returns the folder URL."""
    keys, buf = [], io.BytesIO()
    with wds.TarWriter(buf) as tar:
        for i, mp4 in enumerate(mp4s):
            meta = {"fps": 30, "label": i % 3, "domain": "synthetic"}
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
    data, name = buf.getvalue(), "shard-000000.tar"
    storage.write_bytes_atomic(storage.join(root, name), data)
    info = ShardInfo(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest(), num_samples=len(keys),
                     keys=tuple(keys))  # fmt: skip
    write_table_atomic(storage.join(root, INDEX_NAME), pa.table({"key": keys, "shard": [name] * len(keys)}))
    write_manifest(storage.join(root, "manifest.json"),
                   Manifest(shards=(info,), num_samples=len(keys), config={}, code_version="bench", created="bench"))  # fmt: skip
    return root


def make_data(root: str, n: int, frames: int, copies: int) -> dict:
    """``n`` 1280x720 sources and two shard sets of their 320p transcodes: today's settings and the defaults."""
    paths, today, new = [], [], []
    for i in range(n):
        path = os.path.join(root, f"src{i:03d}.mp4")
        with open(path, "wb") as f:
            f.write(encode_mp4(source_frames(i, frames), fps=30, gop=250, crf=23, threads=0))  # not measured
        paths.append(path)
        today.append(transcode(path, TODAY_SHARDS)[0])
        new.append(transcode(path, TranscodeConfig())[0])
    return {"paths": paths, "source_bytes": statistics.mean(os.path.getsize(p) for p in paths),
            "today": write_shard_set(os.path.join(root, "today"), today, copies), "today_bytes": statistics.mean(map(len, today)),
            "new": write_shard_set(os.path.join(root, "new"), new, copies), "new_bytes": statistics.mean(map(len, new))}  # fmt: skip


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def official_clips(paths: list[str]):
    """Endless: open the full-resolution file, sample, decode with decord, crop and normalise (float32)."""
    epoch = 0
    while True:
        for i, path in enumerate(paths):
            key = f"v{i:05d}"
            vr = decord.VideoReader(path, num_threads=1)
            idx = sample_frame_indices(len(vr), SPEC.num_frames, 4, sample_generator(0, epoch, key, "time"))
            frames = torch.from_numpy(vr.get_batch(idx).asnumpy()).permute(0, 3, 1, 2)
            g = sample_generator(0, epoch, key, "aug0")
            crop = sample_crop(frames.shape[-1], frames.shape[-2], input_size=SPEC.input_size, generator=g)
            video = apply_crop(frames, crop, input_size=SPEC.input_size)[None]
            mask = clip_masks(SPEC, [sample_generator(0, epoch, key, "mask0")])
            assert video.shape[0] == mask.shape[0] == 1
            yield 1
        epoch += 1


def today_clips(cfg: LoaderConfig):
    """Endless: today's per-sample path (before issue 12) over a shard set, one video per step: stream the
    shard, decord ``get_batch``, crop + normalise each clip to float32 on the CPU, stack, masks, float collate."""
    shards, epoch = load_shards(cfg), 0
    urls, inputs = [s.url for s in shards], [(i, k) for i, s in enumerate(shards) for k in s.keys]
    while True:
        for key, sample in stream_in_order(urls, inputs, [k for _, k in inputs]):
            parse_label(sample)
            g_time = sample_generator(0, epoch, key, "time")
            frames, _, _ = read_clip_frames(
                sample["mp4"],
                lambda n, g=g_time: sample_frame_indices(n, SPEC.num_frames, 4, g),
                backend="decord",
            )
            frames_TCHW = torch.from_numpy(frames).permute(0, 3, 1, 2)
            g = sample_generator(0, epoch, key, "aug0")
            crop = sample_crop(
                frames_TCHW.shape[-1], frames_TCHW.shape[-2], input_size=SPEC.input_size, generator=g
            )
            video = torch.cat([torch.stack([apply_crop(frames_TCHW, crop, input_size=SPEC.input_size)])])
            mask = clip_masks(SPEC, [sample_generator(0, epoch, key, "mask0")])
            assert video.dtype == torch.float32 and mask.shape[0] == 1
            yield 1
        epoch += 1


def loader_clips(cfg: LoaderConfig):
    """Endless: clips per batch of the shard loader, epoch after epoch."""
    loader = make_loader(cfg, SPEC)
    while True:
        for batch in loader:
            assert batch["video"].dtype == torch.uint8
            yield batch["video"].shape[0]


def encoding_clips(mp4s: list[bytes]):
    """Endless: one decode + crop of the default loader's per-sample path (``make_clips``, R=1)."""
    cfg, k = LoaderConfig(manifest="unused", batch_size=1), 0
    while True:
        make_clips(mp4s[k % len(mp4s)], f"k{k}", SPEC, cfg, seed=0, epoch=0)
        k += 1
        yield 1


def interleaved(paths: dict[str, object], rounds: int, block_s: float) -> dict[str, dict]:
    """``rounds`` rounds; in each, every path runs for a turn of ``block_s`` CPU-seconds of this process
    (turns, not single steps: stepping the 720p path between loader steps evicts the loader's caches; CPU,
    not wall, so a slow path gets as many samples as a fast one however loaded the machine). Per turn: clips
    per CPU-second. Returns per path the turn rates, their median and totals."""
    acc = {name: {"clips": 0, "cpu_s": 0.0, "wall_s": 0.0, "rates": []} for name in paths}
    for it in paths.values():  # warm-up: first decode, loader set-up
        next(it)
    for _ in range(rounds):
        for name, it in paths.items():
            a, clips = acc[name], 0
            c0, w0 = time.process_time(), time.perf_counter()
            while True:
                clips += next(it)
                if time.process_time() - c0 >= block_s:
                    break
            cpu = time.process_time() - c0
            a["clips"] += clips
            a["cpu_s"] += cpu
            a["wall_s"] += time.perf_counter() - w0
            a["rates"].append(clips / max(cpu, 1e-9))
    for a in acc.values():
        a["clips_per_cpu_s"] = statistics.median(a["rates"])
        a["clips_per_wall_s"] = a["clips"] / a["wall_s"]
    return acc


def paired_ratio(acc: dict, num: str, den: str) -> float:
    """Median over rounds of ``num``'s rate / ``den``'s rate in the same round."""
    return statistics.median(a / b for a, b in zip(acc[num]["rates"], acc[den]["rates"], strict=True))


def rss_run(cfg: LoaderConfig, clips: int) -> dict:
    """Whole epochs of the loader until ``clips`` clips; RSS (MB) sampled every batch. Growth is measured after
    the first quarter of the batches (imports and first-use allocations done)."""
    loader = make_loader(cfg, SPEC)
    rss, n, t0 = [], 0, time.perf_counter()
    while n < clips:
        for batch in loader:
            n += batch["video"].shape[0]
            rss.append(rss_mb())
    warm = rss[len(rss) // 4]
    return {"clips": n, "epochs": loader.epoch, "batches": len(rss), "seconds": time.perf_counter() - t0,
            "rss_mb_after_warmup": warm, "rss_mb_peak": max(rss), "rss_mb_end": rss[-1],
            "rss_growth_mb": max(rss[len(rss) // 4 :]) - warm}  # fmt: skip


def encodings(names: tuple[str, ...], frames: int, videos: int, rounds: int, block_s: float) -> dict:
    """Bytes per video and decode + crop rate of each encoder setting on the same synthetic frames."""
    mp4s = {}
    for name in names:
        side, kw = ENCODINGS[name]
        width = 2 * round(side * 16 / 9 / 2)
        # mbtree on, as the shard transcoder encodes (its bytes, not those of the deterministic test encoder)
        mp4s[name] = [
            encode_mp4(source_frames(i, frames, side, width), fps=30, mbtree=True, **kw)
            for i in range(videos)
        ]
    acc = interleaved({n: encoding_clips(m) for n, m in mp4s.items()}, rounds, block_s)
    base = names[0]
    return {n: {"short_side": ENCODINGS[n][0], **ENCODINGS[n][1], "bytes_per_video": statistics.mean(map(len, mp4s[n])),
                "bytes_vs_today": statistics.mean(map(len, mp4s[n])) / statistics.mean(map(len, mp4s[base])),
                "clips_per_cpu_s": acc[n]["clips_per_cpu_s"], "speed_vs_today": paired_ratio(acc, n, base)}
            for n in names}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small run that ends within ~45 s on 2 cores")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    # sources x frames, shard keys per source, rounds x turn (s), RSS clips at num_sample R, encodings: names,
    # videos x frames, rounds x turn (s)
    n, frames, copies, rounds, block_s, rss_clips, rss_r, enc_names, enc_videos, enc_frames, enc_rounds, enc_block = (
        (1, 160, 8, 3, 0.6, 160, 4, QUICK_ENCODINGS, 1, 120, 3, 0.25) if args.quick
        else (6, 240, 8, 12, 2.0, 2400, 1, tuple(ENCODINGS), 3, 240, 7, 1.0)
    )  # fmt: skip
    backends = [] if args.quick else [b for b in ("decord", "torchcodec") if backend_error(b) is None]
    with tempfile.TemporaryDirectory(prefix="vmae-bench-") as root:
        data = make_data(root, n, frames, copies)
        cfg = {r: LoaderConfig(manifest=data["new"], batch_size=4, num_sample=r, num_workers=0, shuffle_buffer=8)
               for r in (1, 2, 4)}  # fmt: skip
        runs = {"official": official_clips(data["paths"]),
                "today": today_clips(LoaderConfig(manifest=data["today"], num_workers=0)),
                **{f"new R={r}": loader_clips(c) for r, c in cfg.items()},
                **{f"new R=1 backend={b}": loader_clips(dataclasses.replace(cfg[1], decode_backend=b)) for b in backends}}  # fmt: skip
        res = interleaved(runs, rounds, block_s)
        enc = encodings(enc_names, enc_frames, enc_videos, enc_rounds, enc_block)
        long = {"num_sample": rss_r, **rss_run(cfg[rss_r], rss_clips)}
    load_after = os.getloadavg()
    ratio, ratio_r4 = paired_ratio(res, "new R=1", "official"), paired_ratio(res, "new R=4", "official")
    vs_today = paired_ratio(res, "new R=1", "today")
    bytes_per_clip = {"official": data["source_bytes"], "today": data["today_bytes"],
                      **{name: data["new_bytes"] / int(name.split("R=")[1][0]) for name in res if name.startswith("new")}}  # fmt: skip
    print(f"\nload average before {load_before[0]:.1f} / after {load_after[0]:.1f} on {os.cpu_count()} cores; "
          f"{rounds} rounds of {block_s:.2f} CPU-s turns; decode backend auto = {AUTO_ORDER[0]}")  # fmt: skip
    print(f"{'path (16x4 clips -> 224)':<30} {'clips':>6} {'clips/cpu-s':>11} {'clips/wall-s':>12} {'KB/clip':>8} "
          f"{'vs official':>11} {'vs today':>9}")  # fmt: skip
    for name, r in res.items():
        print(f"{name:<30} {r['clips']:>6} {r['clips_per_cpu_s']:>11.2f} {r['clips_per_wall_s']:>12.2f} "
              f"{bytes_per_clip[name] / 1024:>8.0f} {paired_ratio(res, name, 'official'):>10.2f}x "
              f"{paired_ratio(res, name, 'today'):>8.2f}x")  # fmt: skip
    print(
        f"\n{'shard encoder setting (crf 23 unless named)':<44} {'KB/video':>8} {'bytes':>6} {'clips/cpu-s':>11} {'speed':>6}"
    )
    for name, e in enc.items():
        print(f"{name:<44} {e['bytes_per_video'] / 1024:>8.0f} {e['bytes_vs_today']:>5.2f}x "
              f"{e['clips_per_cpu_s']:>11.2f} {e['speed_vs_today']:>5.2f}x")  # fmt: skip
    print(f"\nRSS over {long['clips']} clips (num_sample={rss_r}, {long['epochs']} epochs, {long['seconds']:.0f} s): after warm-up "
          f"{long['rss_mb_after_warmup']:.0f} MB, peak {long['rss_mb_peak']:.0f} MB, "
          f"end {long['rss_mb_end']:.0f} MB, growth {long['rss_growth_mb']:.1f} MB")  # fmt: skip
    result = {"name": NAME, "quick": args.quick, "machine": machine(decord=decord.__version__),
              "load_avg_before": load_before, "load_avg_after": load_after, "seconds": time.perf_counter() - t_start,
              "sources": n, "frames_per_source": frames, "shard_keys_per_source": copies, "rounds": rounds,
              "turn_s": block_s, "clip": {"num_frames": 16, "sampling_rate": 4, "input_size": 224},
              "today_shards": dataclasses.asdict(TODAY_SHARDS), "new_shards": dataclasses.asdict(TranscodeConfig()),
              "decode_backend_auto": AUTO_ORDER[0],
              "rate_unit": "clips per CPU-second of one single-threaded process (= clips/s per core), median of turns",
              "paths": res, "bytes_per_clip": bytes_per_clip, "encodings": enc, "rss": long,
              "ratio": ratio, "ratio_r4": ratio_r4, "vs_today": vs_today}  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"RESULT {NAME} ratio={ratio:.2f} ratio_r4={ratio_r4:.2f} vs_today={vs_today:.2f} "
        f"new_r1_clips_per_s_core={res['new R=1']['clips_per_cpu_s']:.1f} "
        f"new_r4_clips_per_s_core={res['new R=4']['clips_per_cpu_s']:.1f} "
        f"today_clips_per_s_core={res['today']['clips_per_cpu_s']:.1f} "
        f"official_clips_per_s_core={res['official']['clips_per_cpu_s']:.1f} "
        f"kb_per_clip_r1={bytes_per_clip['new R=1'] / 1024:.0f} kb_per_clip_today={bytes_per_clip['today'] / 1024:.0f} "
        f"rss_growth_mb={long['rss_growth_mb']:.1f} rss_clips={long['clips']} "
        f"load_before={load_before[0]:.1f} load_after={load_after[0]:.1f}"
    )
    return result


if __name__ == "__main__":
    main()
