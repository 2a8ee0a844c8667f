"""What motion-guided masks would add to the loader's per-clip cost, on CPU, one core.

Why: :mod:`pipeline.loader.motion` reads the codec's motion vectors in a decode pass of its own
(``decode_motion``: the reference frames around the clip, ``flags2=+export_mvs``), then bins them on the
token grid (``motion_field``) and moves the masks along them (``motion_masks``). The loader's normal per-clip
work is ``pipeline.loader.clips.make_clips`` on the same bytes (decode the 16 frames, crop, tube mask). Both
run here on the same shard-like videos (``TranscodeConfig``'s encoder settings at 320p: GOP 32, fastdecode,
veryfast's B-frames), with the same frame indices and crop, in alternating turns so they see the same load;
rates are per clip, medians over rounds, and a ratio is the median of per-round ratios.
``refs_decode_no_export`` is the same decode pass without ``export_mvs``: ``decode_motion`` minus it is what
exporting the vectors from the loader's own decode pass would add (``wired_ratio``), instead of a second pass
(``extra_ratio``).

The loader as wired (``model.mask_type: motion``): ``make_clips`` with a motion spec against the same call with
the tube spec, on the same bytes, interleaved with the turns above, at ``num_sample`` 1 and 4 (repeated
sampling shares one motion decode among the clips of a video, as it shares the frame decode):
``loader_ratio_r1`` / ``loader_ratio_r4`` are the medians of per-round motion / tube ms per clip. Its masks are
checked against the path timed above (same clip, same mask).

    python benchmarks/motion_cost.py [--quick]

JSON to benchmarks/results/motion_cost.json; the last line is ``RESULT motion_cost key=value ...``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time

import av
import torch
from common import machine, source_frames

from model.config import get_config
from pipeline.ingest.encode import encode_mp4
from pipeline.ingest.transcode import TranscodeConfig
from pipeline.loader.clips import make_clips, sample_frame_indices, sample_generator
from pipeline.loader.config import LoaderConfig
from pipeline.loader.motion import decode_motion, motion_field, motion_masks
from pipeline.loader.transforms import sample_crop

NAME = "motion_cost"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{NAME}.json")
SPEC = get_config("vit_b").clip_spec()  # 16 x 224^2, 2 x 16^2 tubelets, tube mask 0.9
MOTION = get_config("vit_b", mask_type="motion").clip_spec()  # the same clips, motion-guided masks
REPEATS = (1, 4)  # loader.num_sample of the make_clips turns


def shard_like(i: int, frames: int) -> bytes:
    """A 568x320 panning video encoded as the shard transcoder encodes (its default settings)."""
    cfg = TranscodeConfig()
    return encode_mp4(source_frames(i, frames, 320, 568), fps=30, gop=cfg.gop, crf=cfg.crf, preset=cfg.preset,
                      tune=cfg.tune or None, bframes=cfg.bframes)  # fmt: skip


def refs_decode(data: bytes, first: int, last: int) -> int:
    """``decode_motion``'s decode pass without exporting vectors (the same frames decoded): the part of its
    cost that exporting from the loader's own pass would not add. Returns the frames decoded."""
    with av.open(io.BytesIO(data)) as inp:
        stream = inp.streams.video[0]
        codec = stream.codec_context
        codec.thread_count, codec.skip_frame = 1, "NONREF"
        packets = [p for p in inp.demux(stream) if p.size and not p.is_discard and p.pts is not None]
        shown = {pts: i for i, pts in enumerate(sorted(p.pts for p in packets))}
        start = max((k for k, p in enumerate(packets) if p.is_keyframe and shown[p.pts] <= first), default=0)
        out = []
        for packet in [*packets[start:], None]:
            out += [shown[f.pts] for f in codec.decode(packet)]
            if out and max(out) >= last:
                break
    return len(out)


def motion_clip(data: bytes, n: int, key: str, cfg: LoaderConfig, timings: dict[str, float]) -> torch.Tensor:
    """The motion path for the clip ``make_clips`` cuts (same indices and crop); returns its mask."""
    g_time = sample_generator(0, 0, key, "time")
    indices = sample_frame_indices(n, SPEC.num_frames, cfg.sampling_rate, g_time)
    t0 = time.perf_counter()
    refs_decode(data, min(indices), max(indices))
    t1 = time.perf_counter()
    timings["refs_decode_no_export"] += t1 - t0
    t0 = time.perf_counter()
    motion = decode_motion(data, indices)
    t1 = time.perf_counter()
    crop = sample_crop(motion.width, motion.height, input_size=SPEC.input_size, scales=cfg.scales,
                       flip=cfg.flip, generator=sample_generator(0, 0, key, "aug0"))  # fmt: skip
    field = motion_field(motion, indices, crop, grid=SPEC.token_grid, tubelet_size=SPEC.tubelet_size)
    t2 = time.perf_counter()
    mask = motion_masks(field, SPEC.mask_ratio, sample_generator(0, 0, key, "mask0"))
    t3 = time.perf_counter()
    timings["decode_motion"] += t1 - t0
    timings["motion_field"] += t2 - t1
    timings["motion_masks"] += t3 - t2
    return mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 videos x 96 frames, 3 rounds (<= 45 s on 2 cores)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(1)
    videos, frames, rounds = (3, 96, 3) if args.quick else (8, 150, 7)
    cfg = LoaderConfig(manifest="unused", batch_size=1)  # only the clip settings are used
    cfgs = {n: LoaderConfig(manifest="unused", batch_size=n, num_sample=n) for n in REPEATS}
    data = [shard_like(i, frames) for i in range(videos)]
    load_before = os.getloadavg()[0]
    per_round: list[dict[str, float]] = []
    loader_turns = [f"{kind}_r{n}" for n in REPEATS for kind in ("tube", "motion")]  # make_clips turns
    for r in range(rounds):
        t = dict.fromkeys(
            (
                "make_clips",
                "decode_motion",
                "motion_field",
                "motion_masks",
                "refs_decode_no_export",
                *loader_turns,
            ),
            0.0,
        )
        for i, mp4 in enumerate(data):
            key = f"v{i:03d}"
            turns = ["loader", "motion", *loader_turns]
            shift = (r * len(data) + i) % len(turns)  # every turn takes every place in the order in turn
            masks = {}
            for turn in turns[shift:] + turns[:shift]:
                if turn == "loader":
                    t0 = time.perf_counter()
                    make_clips(mp4, key, SPEC, cfg, seed=0, epoch=0)
                    t["make_clips"] += time.perf_counter() - t0
                elif turn == "motion":
                    masks[turn] = motion_clip(mp4, frames, key, cfg, t)
                else:
                    kind, n = turn.split("_r")
                    t0 = time.perf_counter()
                    _, masks[turn] = make_clips(mp4, key, MOTION if kind == "motion" else SPEC, cfgs[int(n)],
                                                seed=0, epoch=0)  # fmt: skip
                    t[turn] += (time.perf_counter() - t0) / int(n)  # per clip
            assert int(masks["motion"].sum()) == SPEC.num_masked
            for n in REPEATS:  # clip 0 is the clip motion_clip cuts: the loader drew the same mask
                assert torch.equal(masks[f"motion_r{n}"][0], masks["motion"])
                assert (masks[f"motion_r{n}"].sum(1) == SPEC.num_masked).all()
        per_round.append({k: v / videos * 1e3 for k, v in t.items()})  # ms per clip
    med = {k: statistics.median(row[k] for row in per_round) for k in per_round[0]}
    extra = [row["decode_motion"] + row["motion_field"] + row["motion_masks"] for row in per_round]
    ratio = statistics.median(e / row["make_clips"] for e, row in zip(extra, per_round, strict=True))
    decode_ratio = statistics.median(row["decode_motion"] / row["make_clips"] for row in per_round)
    # what exporting from the loader's own decode pass would add instead: the export's share of decode_motion
    wired = [row["decode_motion"] - row["refs_decode_no_export"] + row["motion_field"] + row["motion_masks"]
             for row in per_round]  # fmt: skip
    wired_ratio = statistics.median(e / row["make_clips"] for e, row in zip(wired, per_round, strict=True))
    loader = {
        n: statistics.median(row[f"motion_r{n}"] / row[f"tube_r{n}"] for row in per_round) for n in REPEATS
    }
    result = {
        "quick": args.quick,
        "what": "ms per clip, one core: make_clips (loader's decode + crop + tube mask) vs the motion path",
        "videos": videos,
        "frames_per_video": frames,
        "size": "568x320",
        "rounds": rounds,
        "ms_per_clip_median": {k: round(v, 3) for k, v in med.items()},
        "motion_extra_over_make_clips": round(ratio, 3),
        "decode_motion_over_make_clips": round(decode_ratio, 3),
        "wired_extra_over_make_clips": round(wired_ratio, 3),
        "loader_motion_over_tube": {f"num_sample_{n}": round(v, 3) for n, v in loader.items()},
        "per_round": per_round,
        "machine": machine(load_avg_1m_before=load_before),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    keys = {f"{k}_ms": round(v, 2) for k, v in med.items()}
    keys |= {"extra_ratio": round(ratio, 3), "decode_ratio": round(decode_ratio, 3),
             "wired_ratio": round(wired_ratio, 3)}  # fmt: skip
    keys |= {f"loader_ratio_r{n}": round(v, 3) for n, v in loader.items()}
    keys["load"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result["ms_per_clip_median"]))
    print(f"RESULT {NAME} " + " ".join(f"{k}={v}" for k, v in keys.items()))


if __name__ == "__main__":
    main()
