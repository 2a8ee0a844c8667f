"""Clips/s a training rank receives when its decode workers run on other nodes (``loader.decode: remote``),
side by side with the local loader on the same cores.

Why: a GPU node's own cores cannot decode what its GPUs eat (issue 21), so decoding moves to CPU-only nodes;
this measures what the move costs and what it buys. A local multi-node Ray cluster runs on this machine
(``ray.cluster_utils.Cluster``: a head with no CPUs for tasks and two decode nodes of 1 CPU and one ``decode``
unit each, every node its own raylet and object store); this process is the consuming rank. Alternatives,
all on the same shards and clip spec (ViT-B: 16 x 224^2, stride 4, ``num_sample`` R clips per decode), each
loader built once and measured in interleaved turns (so all see the same machine load), medians over turns:

* ``local K=1`` / ``local K=2``: the loader's own worker processes (0 decode nodes), 1 or 2 of them;
* ``remote K=1`` / ``remote K=2``: 1 or 2 decode actors, one on each decode node.

A turn first takes the batches the workers made while another alternative ran (their prefetch / in-flight
window), then times ``batches`` more: delivered clips per wall-second. Per-decode-core ratio = remote K=1 /
local K=1 (one decoding core each). Also: array bytes per clip that cross the network, the rank's receive time
per batch once the window is full (the latency remote decode adds: ``ray.get`` + one copy, against a local
worker's shared-memory hand-over), the rank's CPU per clip, and what compression (zlib level 1; lz4/zstd are not
installed here) or shipping the crop before its resize would change. What it leaves out: a real network (the
nodes share this machine's memory, so a transfer is a local object-store copy); on 2 cores the consumer, the
raylets and the decoders share the CPUs, so growth from 1 to 2 decode nodes is bounded by them.

    python benchmarks/remote_decode.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import zlib

import ray
import torch
from common import machine, source_frames
from loader_throughput import write_shard_set
from ray.cluster_utils import Cluster

from jobs.train.remote_decode import make_loader
from model.config import get_config
from pipeline.ingest.encode import encode_mp4
from pipeline.ingest.transcode import TranscodeConfig
from pipeline.loader.clips import sample_generator
from pipeline.loader.config import LoaderConfig, RemoteDecodeConfig
from pipeline.loader.transforms import VIDEOMAE_SCALES, sample_crop

NAME = "remote_decode"
HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = get_config("vit_b").clip_spec()
GPU_CLIPS_PER_S = 1900  # one H200 at 40 % MFU on ViT-B 16x224^2 (issue 21)


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU seconds of these processes so far (Linux ``/proc``; all nodes run on this machine)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError):
            pass  # exited (a closed loader's workers)
    return total


def make_shards(root: str, videos: int, frames: int, copies: int) -> str:
    """``videos`` 320p clips encoded as the shard transcoder does (the default TranscodeConfig's GOP, CRF,
    preset, B-frames, tune), in one shard, ``copies`` keys each."""
    tc = TranscodeConfig()
    mp4s = [
        encode_mp4(source_frames(i, frames, height=tc.short_side, width=tc.short_side * 16 // 9 // 2 * 2),
                   fps=tc.fps, gop=tc.gop, crf=tc.crf, preset=tc.preset, bframes=tc.bframes, tune=tc.tune,
                   mbtree=True)
        for i in range(videos)
    ]  # fmt: skip
    return write_shard_set(root, mp4s, copies) + "/manifest.json"


class Turns:
    """One loader, iterated across epochs; each turn drains its window, then times ``n`` batches."""

    def __init__(self, loader, window: int) -> None:
        t0 = time.perf_counter()
        self.loader, self.window, self.it = loader, window, iter(loader)
        self.gen = self._batches()  # one for the run: a dropped generator would close the loader's pass
        next(self.gen)
        self.start_s = time.perf_counter() - t0  # to the first batch: workers/actors started, first decode
        self.cpu0 = 0.0
        self.rates: list[float] = []
        self.receive_ms: list[float] = []
        self.cpu_ms_per_clip: list[float] = []
        self.clips = 0  # taken by the rank in all (decode CPU per clip is over the whole run)

    def mark(self) -> None:
        """Start counting decode CPU and clips here, with the workers idle on a full window (the caller waited):
        an actor's start-up (seconds of imports) is not decoding, and a forked local worker inherits its
        imports. Marked again the same way at the end, clips taken = clips decoded in between."""
        self.cpu0, self.clips = cpu_seconds(self.loader.worker_pids), 0

    def _batches(self):
        while True:
            yield from self.it
            self.it = iter(self.loader)

    def turn(self, n: int, settle_s: float) -> None:
        gen = self.gen
        for _ in range(self.window):
            self.clips += len(next(gen)["key"])
        t0, c0, clips = time.perf_counter(), time.process_time(), 0
        for _ in range(n):
            clips += len(next(gen)["key"])
        wall = time.perf_counter() - t0
        self.clips += clips
        self.rates.append(clips / wall)
        self.cpu_ms_per_clip.append(1e3 * (time.process_time() - c0) / clips)
        time.sleep(settle_s)  # the workers fill their window: what follows is hand-over only
        for _ in range(self.window):
            t = time.perf_counter()
            b = next(gen)
            self.receive_ms.append(1e3 * (time.perf_counter() - t) / len(b["key"]))
            self.clips += len(b["key"])

    def summary(self) -> dict:
        return {"clips_per_s": statistics.median(self.rates), "turns": self.rates, "start_s": self.start_s,
                "receive_ms_per_clip": statistics.median(self.receive_ms),
                "rank_cpu_ms_per_clip": statistics.median(self.cpu_ms_per_clip),
                "decode_clips_per_cpu_s": self.clips / max(cpu_seconds(self.loader.worker_pids) - self.cpu0, 1e-9),
                "decode_processes": len(self.loader.worker_pids)}  # fmt: skip


def compression(video: torch.Tensor, rounds: int) -> dict:
    """zlib level 1 on one batch's uint8 clips: bytes ratio and ms per clip to compress / decompress."""
    raw = video.numpy().tobytes()
    comp_s, dec_s = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        packed = zlib.compress(raw, 1)
        comp_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        zlib.decompress(packed)
        dec_s.append(time.perf_counter() - t)
    n = video.shape[0]
    return {"codec": "zlib-1", "ratio": len(packed) / len(raw),
            "compress_ms_per_clip": 1e3 * statistics.median(comp_s) / n,
            "decompress_ms_per_clip": 1e3 * statistics.median(dec_s) / n}  # fmt: skip


def precrop_bytes_ratio(short_side: int, width: int, draws: int = 1000) -> float:
    """Mean pixels of the multi-scale crop *before* its resize to 224^2, over 224^2: what shipping uncropped-
    size crops (resized on the GPU node) would move instead, from the loader's own crop sampler."""
    g = sample_generator(0, 0, "precrop", "aug0")
    areas = [
        (c.height * c.width)
        for c in (sample_crop(width, short_side, input_size=SPEC.input_size, scales=VIDEOMAE_SCALES, generator=g)
                  for _ in range(draws))
    ]  # fmt: skip
    return statistics.mean(areas) / SPEC.input_size**2


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small run that ends within ~45 s on 2 cores")
    p.add_argument("--num-sample", type=int, default=4, help="clips per decode (R); the GPU configs use 4")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = args.out or os.path.join(HERE, "results", f"{NAME}{'_quick' if args.quick else ''}.json")
    t_start, load_before = time.perf_counter(), os.getloadavg()
    videos, frames, copies, rounds, batches, settle = (
        (2, 64, 8, 3, 3, 0.4) if args.quick else (4, 96, 16, 9, 8, 1.0)
    )
    r = args.num_sample
    # two decode nodes; remote K=1 decodes on node A (resource "decode_1"), remote K=2 on A and B ("decode_2"):
    # both loaders stay alive for interleaved turns (an idle one waits on a full window), and K=2 spans two
    # nodes whatever SPREAD decides
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for res in ({"decode_1": 1, "decode_2": 1}, {"decode_2": 1}):
        cluster.add_node(num_cpus=2, resources=res, object_store_memory=300 * 2**20)
    with tempfile.TemporaryDirectory(prefix="vmae-remote-") as root:
        manifest = make_shards(root, videos, frames, copies)
        phases_data = time.perf_counter() - t_start
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        torch.set_num_threads(1)
        base = dict(manifest=manifest, batch_size=2 * r, num_sample=r, shuffle_buffer=8, prefetch_factor=2)
        cfgs = {f"local K={k}": LoaderConfig(**base, num_workers=k) for k in (1, 2)}
        for k in (1, 2):
            remote = RemoteDecodeConfig(resource=f"decode_{k}", in_flight=2, start_timeout_s=60)
            cfgs[f"remote K={k}"] = LoaderConfig(**base, num_workers=k, decode="remote", remote=remote)
        runs = {name: Turns(make_loader(cfg, SPEC), window=2 * cfg.num_workers) for name, cfg in cfgs.items()}
        phases = {"to_data": phases_data, "to_loaders_started": time.perf_counter() - t_start}
        time.sleep(2 * settle)
        for t in runs.values():
            t.mark()
        for _ in range(rounds):
            for t in runs.values():
                t.turn(batches, settle)
        time.sleep(2 * settle)  # every window full again: decoded since mark() = taken since
        phases["to_turns_done"] = time.perf_counter() - t_start
        video = next(runs["local K=1"].gen)["video"]
        workers = runs["remote K=2"].loader.workers
        nodes = len(set(workers.nodes))
        bytes_per_clip = workers.received["bytes"] / workers.received["clips"]
        res = {name: t.summary() for name, t in runs.items()}  # before close: the decode processes' CPU
        for t in runs.values():
            t.loader.close()
        ray.shutdown()
    cluster.shutdown()
    phases["to_cluster_down"] = time.perf_counter() - t_start
    comp = compression(video, rounds=3)
    precrop = {side: precrop_bytes_ratio(side, side * 16 // 9) for side in (256, 320)}
    phases["to_end"] = time.perf_counter() - t_start
    load_after = os.getloadavg()
    per_core = res["remote K=1"]["decode_clips_per_cpu_s"] / res["local K=1"]["decode_clips_per_cpu_s"]
    delivered = res["remote K=1"]["clips_per_s"] / res["local K=1"]["clips_per_s"]
    growth = res["remote K=2"]["clips_per_s"] / res["remote K=1"]["clips_per_s"]
    gbps = GPU_CLIPS_PER_S * bytes_per_clip / 1e9
    print("phases (s from start):", {k: round(v, 1) for k, v in phases.items()})
    print(f"\nload average before {load_before[0]:.1f} / after {load_after[0]:.1f} on {os.cpu_count()} cores; "
          f"{rounds} rounds x {batches} batches of {2 * r} clips (R={r}); decode nodes used by remote K=2: {nodes}")  # fmt: skip
    print(f"{'loader':<12} {'delivered clips/s':>17} {'decode clips/CPU-s':>18} {'start s':>8} "
          f"{'receive ms/clip':>16} {'rank CPU ms/clip':>17}")  # fmt: skip
    for name, s in res.items():
        print(f"{name:<12} {s['clips_per_s']:>17.1f} {s['decode_clips_per_cpu_s']:>18.1f} {s['start_s']:>8.1f} "
              f"{s['receive_ms_per_clip']:>16.2f} {s['rank_cpu_ms_per_clip']:>17.2f}")  # fmt: skip
    print(f"\nper decode core (clips per CPU-second of the decoding processes): remote K=1 / local K=1 = "
          f"{per_core:.2f}x; delivered to the rank: remote K=1 / local K=1 = {delivered:.2f}x, "
          f"remote K=2 / K=1 = {growth:.2f}x")  # fmt: skip
    print(f"bytes per clip over the network: {bytes_per_clip / 2**20:.2f} MiB -> {GPU_CLIPS_PER_S} clips/s into one "
          f"GPU node = {gbps:.1f} GB/s ({8 * gbps:.0f} Gbit/s); zlib-1: x{comp['ratio']:.2f} bytes at "
          f"{comp['compress_ms_per_clip']:.1f} ms/clip to pack, {comp['decompress_ms_per_clip']:.1f} to unpack "
          f"(synthetic footage); crops shipped before their resize: x{precrop[320]:.2f} bytes at 320p, "
          f"x{precrop[256]:.2f} at 256p")  # fmt: skip
    result = {"name": NAME, "quick": args.quick, "machine": machine(ray=ray.__version__),
              "load_avg_before": load_before, "load_avg_after": load_after, "seconds": time.perf_counter() - t_start,
              "clip": {"num_frames": SPEC.num_frames, "input_size": SPEC.input_size, "num_sample": r},
              "rounds": rounds, "batches_per_turn": batches, "paths": res, "per_core_ratio": per_core,
              "delivered_ratio": delivered,
              "growth_1_to_2_nodes": growth, "decode_nodes_used": nodes, "bytes_per_clip": bytes_per_clip,
              "gpu_node_gbytes_per_s_at_1900_clips": gbps, "compression": comp,
              "precrop_bytes_ratio": precrop, "phases_s": phases}  # fmt: skip
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"RESULT {NAME} per_core_ratio={per_core:.2f} delivered_ratio={delivered:.2f} growth_2_nodes={growth:.2f} "
        f"local1={res['local K=1']['clips_per_s']:.1f} local2={res['local K=2']['clips_per_s']:.1f} "
        f"remote1={res['remote K=1']['clips_per_s']:.1f} remote2={res['remote K=2']['clips_per_s']:.1f} "
        f"mib_per_clip={bytes_per_clip / 2**20:.2f} receive_ms_per_clip_remote={res['remote K=1']['receive_ms_per_clip']:.2f} "
        f"receive_ms_per_clip_local={res['local K=1']['receive_ms_per_clip']:.2f} zlib_ratio={comp['ratio']:.2f} "
        f"load_before={load_before[0]:.1f} load_after={load_after[0]:.1f} seconds={time.perf_counter() - t_start:.0f}"
    )
    return result


if __name__ == "__main__":
    main()
