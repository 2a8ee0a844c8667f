"""Multi-view test cost, side by side in one process: one decode per video vs one decode per temporal clip.

Why: ``pipeline.loader.views.video_views`` asks the decoder once for the union of every clip's frames and cuts all
``clips x crops`` views from it; the straightforward alternative decodes each temporal clip separately (as a
per-clip dataset would). Both produce identical views; this measures what decoding once buys for the 2x3
(SSv2) and 5x3 (Kinetics) protocols, and the whole per-video cost (views + tiny-model forward).

* ``once``: ``video_views(data, spec)`` (what ``vmae eval`` does).
* ``per_clip``: for every temporal clip, ``read_clip_frames`` of that clip's frames, then its crops.

One core (``torch.set_num_threads(1)``, decord ``num_threads=1``). Videos: 64 frames of 160x120 H.264.

    python benchmarks/eval_views.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch
from common import machine

from model import VideoMAEClassifier, get_config
from pipeline.curation.synth import render_clip
from pipeline.ingest.encode import encode_mp4
from pipeline.loader.decode import read_clip_frames
from pipeline.loader.views import ViewSpec, clip_frame_indices, video_views, views_from_frames

NAME = "eval_views"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{NAME}.json")


def per_clip_views(data: bytes, spec: ViewSpec) -> torch.Tensor:
    """The same views, decoding each temporal clip on its own."""
    out = []
    one = dataclasses.replace(spec, clips=1)
    for c in range(spec.clips):
        frames, idx, _ = read_clip_frames(data, lambda n, c=c: clip_frame_indices(n, spec)[c])
        out.append(views_from_frames(frames, [list(range(len(idx)))], one))
    return torch.cat(out)


def time_per_video(fn, videos: list[bytes], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for data in videos:
            fn(data)
        best = min(best, (time.perf_counter() - t0) / len(videos))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 videos, 3 repeats (< 45 s on 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, repeats = (8, 3) if args.quick else (24, 5)
    videos = [
        encode_mp4(
            render_clip("shapes", "left", size=(160, 120), frames=64, rng=np.random.default_rng(i)), fps=30
        )
        for i in range(n)
    ]
    model = VideoMAEClassifier(get_config("tiny"), 10).eval()
    rows = []
    for clips, crops in ((2, 3), (5, 3)):
        spec = ViewSpec(num_frames=4, sampling_rate=4, input_size=32, clips=clips, crops=crops)
        assert torch.equal(video_views(videos[0], spec), per_clip_views(videos[0], spec)), (
            "same views either way"
        )
        once = time_per_video(lambda d, s=spec: video_views(d, s), videos, repeats)
        per_clip = time_per_video(lambda d, s=spec: per_clip_views(d, s), videos, repeats)
        cut = [video_views(d, spec) for d in videos]
        with torch.no_grad():
            fwd = time_per_video(model, cut, repeats)
        rows.append({"views": spec.name, "once_ms": 1e3 * once, "per_clip_ms": 1e3 * per_clip,
                     "speedup": per_clip / once, "tiny_forward_ms": 1e3 * fwd})  # fmt: skip
    print(f"{'views':>6} {'decode once ms':>15} {'per clip ms':>12} {'speedup':>8} {'tiny fwd ms':>12}")
    for r in rows:
        print(
            f"{r['views']:>6} {r['once_ms']:>15.1f} {r['per_clip_ms']:>12.1f} {r['speedup']:>7.2f}x {r['tiny_forward_ms']:>12.1f}"
        )
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"name": NAME, "quick": args.quick, "videos": n, "video": "64 frames 160x120 h264",
                   "machine": machine(), "rows": rows}, f, indent=1)  # fmt: skip
    print(f"RESULT {NAME} " + " ".join(f"speedup_{r['views']}={r['speedup']:.2f}" for r in rows)
          + " " + " ".join(f"once_ms_{r['views']}={r['once_ms']:.1f}" for r in rows))  # fmt: skip


if __name__ == "__main__":
    main()
