"""Curation, side by side in one process: sampled frames vs every frame, and pHash vs byte-hash dedup.

Why: ``vmae curate`` decodes only ``num_frames`` evenly spaced frames per video, and finds duplicates by
perceptual hash rather than by file hash. This measures what each choice buys and costs, on the same
synthetic clips (``pipeline.curation.synth``: all domains and motions, one ``static`` defect in four, and for one
clip in three an exact re-encode (crf 19) and a near-duplicate (noise + brightness) added):

* metrics, ``sampled``: ``read_frames(data, 8)`` + ``video_metrics`` (what curation does) vs
  ``all_frames``: every frame decoded and measured. CPU ms per clip, and static-flag accuracy of each.
* duplicates, ``phash``: ``duplicate_groups`` over the sampled frames' pHashes vs ``sha256``: equal file
  bytes. Recall of the planted copies and false merges of distinct clips.
* grouping cost: ``duplicate_groups`` CPU seconds on N random hashes with planted near-copies.

One core (``torch.set_num_threads(1)``, decord ``num_threads=1``).

    python benchmarks/curate_metrics.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import time

import numpy as np
import torch
from common import machine
from tqdm import tqdm

from pipeline.curation.quality import QualityConfig, duplicate_groups, read_frames, video_metrics
from pipeline.curation.synth import DOMAINS, MOTIONS, render_clip
from pipeline.ingest.encode import encode_mp4

NAME = "curate_metrics"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{NAME}.json")


def make_clips(n: int, frames: int, size: tuple[int, int]) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """mp4 bytes of ``n`` clips cycling through domains x motions (every 4th static); for every 3rd moving
    one, an exact re-encode (crf 19) and a near-duplicate follow. Returns (videos, is_static, content id)."""
    combos = list(itertools.product(DOMAINS, MOTIONS))
    videos, static, content = [], [], []
    for i in tqdm(range(n), desc="render", unit="clip", disable=None):
        d, m = combos[i % len(combos)]
        is_static = i % 4 == 3
        spec = dict(size=size, frames=frames, rng=np.random.default_rng(i))
        clip = render_clip(d, m, **spec, defect="static" if is_static else None)
        copies = [(clip, 23)]
        if not is_static and i % 3 == 0:  # same content draws, then noise from another rng
            spec["rng"] = np.random.default_rng(i)
            near = render_clip(
                d, m, **spec, defect="near_duplicate", defect_rng=np.random.default_rng((i, 1))
            )
            copies += [(clip, 19), (near, 23)]
        for c, crf in copies:
            videos.append(encode_mp4(c, fps=30, crf=crf))
            static.append(is_static)
            content.append(i)
    return videos, np.array(static), np.array(content)


def time_metrics(videos: list[bytes], num_frames: int, cfg: QualityConfig) -> tuple[float, list[dict]]:
    """CPU seconds per clip (decode ``num_frames`` frames + metrics) and the metrics."""
    t0 = time.process_time()
    rows = [video_metrics(read_frames(data, num_frames)[0], cfg) for data in videos]
    return (time.process_time() - t0) / len(videos), rows


def pair_scores(groups: np.ndarray, content: np.ndarray) -> tuple[float, int]:
    """(recall of same-content pairs, number of distinct-content pairs merged) for group ids per video."""
    same_group = groups[:, None] == groups[None, :]
    same_content = content[:, None] == content[None, :]
    upper = np.triu(np.ones_like(same_group), 1)
    recall = (same_group & same_content & upper).sum() / max((same_content & upper).sum(), 1)
    return float(recall), int((same_group & ~same_content & upper).sum())


def planted_hashes(n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[n, 3] uint64 hashes: 80% random, 20% copies of other rows with up to ``k`` bits flipped per frame."""
    h = rng.integers(0, 2**64, (n, 3), dtype=np.uint64, endpoint=False)
    for i in rng.choice(n, n // 5, replace=False):
        h[i] = h[rng.integers(0, n)]
        for p in range(3):
            for bit in rng.choice(64, rng.integers(0, k + 1), replace=False):
                h[i, p] ^= np.uint64(1) << np.uint64(bit)
    return h, rng.random((n, 3)) > 0.1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small workload, < 45 s on 2 cores")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(1)
    n_clips, frames, size, n_hashes = (24, 32, (128, 96), 2000) if args.quick else (96, 64, (128, 96), 20000)
    info = machine()
    cfg = QualityConfig()

    videos, static, content = make_clips(n_clips, frames, size)
    sampled_s, sampled = time_metrics(videos, cfg.num_frames, cfg)
    full_s, full = time_metrics(videos, frames, QualityConfig(num_frames=frames, hash_frames=cfg.hash_frames))
    runs = (("sampled", sampled), ("all", full))
    acc = {name: float((np.array([r["is_static"] for r in rows]) == static).mean()) for name, rows in runs}
    rel_sharp = np.median(
        [abs(a["sharpness"] / b["sharpness"] - 1) for a, b in zip(sampled, full, strict=True)]
    )

    ph = np.array([[h if h is not None else 0 for h in r["phash"]] for r in sampled], np.int64).view(
        np.uint64
    )
    valid = np.array([[h is not None for h in r["phash"]] for r in sampled])
    phash_recall, phash_false = pair_scores(duplicate_groups(ph, valid, cfg.hash_distance), content)
    digests = [hashlib.sha256(v).hexdigest() for v in videos]
    sha_recall, sha_false = pair_scores(np.array([digests.index(d) for d in digests]), content)

    hashes, hvalid = planted_hashes(n_hashes, cfg.hash_distance, np.random.default_rng(0))
    t0 = time.process_time()
    duplicate_groups(hashes, hvalid, cfg.hash_distance)
    group_s = time.process_time() - t0

    m = {
        "sampled_ms_per_clip": round(1e3 * sampled_s, 2),
        "all_frames_ms_per_clip": round(1e3 * full_s, 2),
        "speedup": round(full_s / sampled_s, 2),
        "static_flag_accuracy_sampled": acc["sampled"],
        "static_flag_accuracy_all_frames": acc["all"],
        "median_rel_sharpness_diff": round(float(rel_sharp), 4),
    }
    d = {
        "phash_pair_recall": round(phash_recall, 3),
        "phash_false_merges": phash_false,
        "sha256_pair_recall": round(sha_recall, 3),
        "sha256_false_merges": sha_false,
        "grouping_s_cpu": round(group_s, 3),
    }
    workload = {"videos": len(videos), "distinct_contents": len(set(content.tolist())), "frames": frames}
    workload |= {"size_wh": list(size), "hashes": n_hashes, "quality": dataclasses.asdict(cfg)}
    result = {
        "name": NAME,
        "quick": args.quick,
        "machine": info,
        "workload": workload,
        "metrics": m,
        "duplicates": d,
    }
    rows = [
        ("decode+metrics ms/clip (CPU)", m["all_frames_ms_per_clip"], m["sampled_ms_per_clip"], m["speedup"]),
        ("static flag accuracy", m["static_flag_accuracy_all_frames"], m["static_flag_accuracy_sampled"], ""),
        ("duplicate pair recall", d["sha256_pair_recall"], d["phash_pair_recall"], ""),
        ("false merges (pairs)", d["sha256_false_merges"], d["phash_false_merges"], ""),
    ]
    print(f"\n{'measure':<32}{'baseline':>10}{'curation':>10}{'ratio':>8}")
    for name, base, cur, ratio in rows:
        print(f"{name:<32}{base:>10}{cur:>10}{ratio:>8}")
    print(f"baseline: every frame / sha256 of bytes; curation: {cfg.num_frames} sampled frames / pHash")
    print(f"sharpness median rel. diff {m['median_rel_sharpness_diff']}; {n_hashes} hashes: {group_s:.2f} s")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    keys = {
        "sampled_ms_per_clip": m["sampled_ms_per_clip"],
        "all_frames_ms_per_clip": m["all_frames_ms_per_clip"],
        "metrics_speedup": m["speedup"],
        "static_acc": m["static_flag_accuracy_sampled"],
        "phash_recall": d["phash_pair_recall"],
        "sha256_recall": d["sha256_pair_recall"],
        "false_merges": d["phash_false_merges"],
        "grouping_s": d["grouping_s_cpu"],
    }
    print(f"RESULT {NAME} " + " ".join(f"{k}={v}" for k, v in keys.items()))


if __name__ == "__main__":
    main()
