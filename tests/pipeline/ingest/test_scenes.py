"""Scene-cut splitting: planted hard cuts are recovered within one frame, a video without cuts stays one clip,
short shots merge, long shots are cut to ``max_clip_s``, and keys/bytes are stable across reruns."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from pipeline.curation.synth import render_clip
from pipeline.ingest.encode import decode_all, encode_mp4
from pipeline.ingest.scenes import accept_cuts, segments
from pipeline.ingest.shards import prepare_sample
from pipeline.ingest.sources import SourceItem
from pipeline.ingest.transcode import TranscodeConfig, identity, transcode, transcode_file

SPLIT_FIELDS = ("split", "scene_threshold", "scene_min_s")  # what scene splitting added to TranscodeConfig
SHOTS = [  # (domain, motion, frames): neighbours differ in domain and colours, so every join is a hard cut
    ("shapes", "right", 23),
    ("textures", "up", 31),
    ("gradients", "rotate_cw", 17),
    ("shapes", "zoom_in", 29),
]


def _cut_video(shots=SHOTS, fps: float = 15.0, seed: int = 0) -> tuple[bytes, list[int]]:
    """An H.264 video of the shots back to back; returns its bytes and the planted cut frames."""
    parts = [
        render_clip(d, m, size=(64, 48), frames=n, rng=np.random.default_rng((seed, i)))
        for i, (d, m, n) in enumerate(shots)
    ]
    cuts = np.cumsum([len(p) for p in parts])[:-1].tolist()
    return encode_mp4(np.concatenate(parts), fps=fps, gop=8), cuts


def _cfg(**kw) -> TranscodeConfig:
    # threshold 15: on these synthetic shots cut scores measured >= 22.6, within-shot scores <= 11.1 (8 seeds)
    base = dict(
        short_side=48,
        fps=15.0,
        gop=8,
        preset="ultrafast",
        max_clip_s=10.0,
        split="scenes",
        scene_threshold=15.0,
    )
    return TranscodeConfig(**{**base, **kw})


def test_planted_cuts_are_recovered_within_one_frame(tmp_path):
    data, cuts = _cut_video()
    clips = transcode_file(data, str(tmp_path), "v", _cfg())
    starts = [round(c.start * 15) for c in clips]
    assert len(clips) == len(SHOTS)
    assert np.abs(np.array(starts[1:]) - np.array(cuts)).max() <= 1, (starts, cuts)
    assert sum(c.frames for c in clips) == sum(n for *_, n in SHOTS)  # no frame lost or repeated
    assert [c.index for c in clips] == list(range(len(SHOTS)))
    for c, (_, _, n) in zip(clips, SHOTS, strict=True):
        assert abs(c.frames - n) <= 1 and len(decode_all(open(c.path, "rb").read())) == c.frames


def test_cuts_on_a_resampled_timeline(tmp_path):
    """Source at 15 fps, output at 30 fps: cuts land at twice the source frame, within one output frame."""
    data, cuts = _cut_video()
    clips = transcode_file(data, str(tmp_path), "v", _cfg(fps=30.0))
    starts = [round(c.start * 30) for c in clips]
    assert len(clips) == len(SHOTS)
    assert np.abs(np.array(starts[1:]) - 2 * np.array(cuts)).max() <= 1, (starts, cuts)


def test_video_without_cuts_is_one_clip(tmp_path):
    for i, (domain, motion) in enumerate([("textures", "left"), ("shapes", "zoom_out"), ("gradients", "up")]):
        frames = render_clip(domain, motion, size=(64, 48), frames=60, rng=np.random.default_rng(i))
        clips = transcode_file(encode_mp4(frames, fps=15), str(tmp_path), f"v{i}", _cfg())
        assert [(c.start, c.frames) for c in clips] == [(0.0, 60)], domain


def test_long_shots_are_cut_to_max_clip_s_and_short_shots_merge(tmp_path):
    data, cuts = _cut_video()
    clips = transcode_file(data, str(tmp_path), "a", _cfg(max_clip_s=1.0))  # 15 frames per clip at most
    assert max(c.frames for c in clips) <= 15
    assert {round(c.start * 15) for c in clips} >= {0, *cuts} - {0} | {0}  # every shot still starts a clip
    # the 17-frame shot is shorter than scene_min_s=1.2 s (18 frames): its cut is ignored, it joins its neighbour
    merged = transcode_file(data, str(tmp_path), "b", _cfg(scene_min_s=1.2))
    assert len(merged) == len(SHOTS) - 1


def test_fixed_split_is_unchanged_and_keeps_its_identity(tmp_path):
    data, _ = _cut_video()
    fixed = TranscodeConfig(short_side=48, fps=15.0, gop=8, preset="ultrafast", max_clip_s=2.0)
    clips = transcode_file(data, str(tmp_path), "f", fixed)
    assert [round(c.start * 15) for c in clips] == [0, 30, 60, 90]
    assert [c.frames for c in clips] == [30, 30, 30, 10]
    assert "split" not in identity(fixed) and "scene_threshold" not in identity(fixed)
    assert identity(_cfg())["split"] == "scenes"


def test_scene_clips_are_byte_identical_across_reruns(tmp_path):
    data, _ = _cut_video(seed=1)
    assert transcode(data, _cfg()) == transcode(data, _cfg())
    src = tmp_path / "long.mp4"
    src.write_bytes(data)
    item = SourceItem(url=str(src), rel="long.mp4", key="long", size=len(data), version="v1")
    records = [prepare_sample(item, str(tmp_path / f"work{i}"), _cfg()) for i in range(2)]
    keys = [[c["key"] for c in r["clips"]] for r in records]
    assert keys[0] == keys[1] == [f"long_c{i:03d}" for i in range(len(SHOTS))]
    assert [c["sha256"] for c in records[0]["clips"]] == [c["sha256"] for c in records[1]["clips"]]


def test_accept_cuts_and_segments():
    assert accept_cuts([5, 6, 7, 30, 95], 100, 10) == [30]  # a dissolve near the start, a cut near the end
    assert accept_cuts([10, 20, 30], 40, 10) == [10, 20, 30]
    assert segments([10], 35, 10, 2) == [(0, 10), (10, 20), (20, 30), (30, 35)]
    assert segments([10], 21, 10, 2) == [(0, 10), (10, 20)]  # a 1-frame remainder is left out
    with pytest.raises(ValueError, match="min_frames"):
        accept_cuts([1], 10, 0)


def test_bad_split_settings():
    with pytest.raises(ValueError, match="transcode.split must be one of"):
        TranscodeConfig(split="shots")
    with pytest.raises(ValueError, match="needs transcode.max_clip_s"):
        TranscodeConfig(split="scenes")
    with pytest.raises(ValueError, match="scene_threshold"):
        _cfg(scene_threshold=0)


@pytest.mark.slow
def test_shard_job_splits_at_scenes_and_keeps_keys_on_rerun(tmp_path, ray_cluster):
    """``vmae shard transcode.split=scenes``: the long video gives one clip per shot (index.parquet), a rerun
    is a no-op, and the default split keeps the fingerprint it had before scene splitting existed."""
    from jobs.cli import main
    from jobs.config import to_dict
    from jobs.data.shard import ShardJobConfig, fingerprint
    from pipeline.ingest import manifest
    from pipeline.ingest.sources import list_sources

    data, cuts = _cut_video()
    (tmp_path / "raw" / "a").mkdir(parents=True)
    (tmp_path / "raw" / "a" / "long.mp4").write_bytes(data)
    single = render_clip("textures", "up", size=(64, 48), frames=40, rng=np.random.default_rng(9))
    (tmp_path / "raw" / "a" / "one.mp4").write_bytes(encode_mp4(single, fps=15))
    out = str(tmp_path / "shards")
    args = ["shard", "--input", str(tmp_path / "raw"), "--output", out, "--config", "configs/shard/debug.yaml",
            "transcode.split=scenes", "transcode.max_clip_s=10", "transcode.scene_threshold=15"]  # fmt: skip
    assert main(args) == 0
    index = manifest.read_table(f"{out}/index.parquet").to_pandas().sort_values("key")
    long = index[index.key.str.startswith("a_long")]
    assert [k.rsplit("_", 1)[1] for k in long.key] == [f"c{i:03d}" for i in range(len(SHOTS))]
    assert np.abs(np.round(long.clip_start.to_numpy()[1:] * 15) - cuts).max() <= 1
    assert len(index[index.key.str.startswith("a_one")]) == 1
    first = manifest.read_manifest(out).stats
    assert main(args) == 0 and manifest.read_manifest(out).stats == first  # no-op rerun, same keys
    # the default (fixed) split hashes the transcode section exactly as before the split settings existed
    cfg = ShardJobConfig()
    before = {k: v for k, v in dataclasses.asdict(cfg.transcode).items() if k not in SPLIT_FIELDS}
    listing = list_sources(str(tmp_path / "raw"), cfg.source)
    assert identity(cfg.transcode) == before
    conf = {k: v for k, v in to_dict(cfg).items() if k not in ("ray", "storage", "keep_work")} | {
        "transcode": before
    }
    items = [(i.url, i.size, i.version, i.label, i.label_name, i.domain) for i in listing.items]
    blob = json.dumps([conf, items, list(listing.missing), list(listing.classes)], sort_keys=True)
    assert fingerprint(cfg, listing) == hashlib.sha256(blob.encode()).hexdigest()
