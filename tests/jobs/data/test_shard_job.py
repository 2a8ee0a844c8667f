"""The shard job end to end on local Ray: local folder and loopback S3, read-back with webdataset and Ray Data,
index-vs-tar consistency, rejects, no-op reruns, resume after a crash and after kill -9."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import decord
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from jobs.cli import main as cli_main
from jobs.config import load_config
from jobs.data.shard import ShardJobConfig, shard
from pipeline import storage
from pipeline.ingest import manifest as mf
from tests.videos import KINDS, make_labelled_tree, video_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEBUG = os.path.join(ROOT, "configs", "shard", "debug.yaml")
BAD = ("truncated", "zero_byte", "not_video", "audio_only", "one_frame", "huge")  # rejected under debug.yaml
GOOD = ("with_audio", "odd_dims", "rotated", "vfr", "10bit", "vp9", "av1", "mjpeg", "wrong_ext")
REJECT_STAGE = {"truncated": "probe", "zero_byte": "probe", "not_video": "probe", "audio_only": "probe",
                "one_frame": "transcode", "huge": "transcode"}  # fmt: skip


def debug_config(*overrides: str) -> ShardJobConfig:
    return load_config(ShardJobConfig, DEBUG, list(overrides))


def test_config_files_load():
    assert (
        load_config(ShardJobConfig, os.path.join(ROOT, "configs", "shard", "default.yaml"))
        == ShardJobConfig()
    )
    cfg = debug_config()
    assert cfg.transcode.short_side == 64 and cfg.shards.max_samples == 4 and cfg.source.labels == "folder"
    with pytest.raises(ValueError, match="override 'transcode.short=3': transcode has no key 'short'"):
        debug_config("transcode.short=3")


def write_inputs(put) -> None:
    """12 labelled 128x96 videos (one 3.2 s long: 2 clips), every test-video kind under ``misc/``."""
    for c, name in enumerate(("jump", "run", "swim")):
        for g in range(4):
            frames = 80 if (c, g) == (0, 0) else 20
            put(
                f"{name}/v_{name}_g{g:02d}.mp4",
                video_bytes("ok", width=128, height=96, frames=frames, seed=10 * c + g),
            )
    for kind in BAD + GOOD:
        put(f"misc/{kind}{KINDS[kind]}", video_bytes(kind, frames=12))


@pytest.fixture(scope="module")
def local_inputs(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("raw")

    def put(rel, data):
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        (root / rel).write_bytes(data)

    write_inputs(put)
    return str(root)


def check_shard_set(out: str, st: storage.StorageConfig | None = None) -> tuple[mf.Manifest, list[dict]]:
    """Every manifest entry and index row agrees with the bytes of the tars; returns (manifest, rows)."""
    m = mf.read_manifest(out, st)
    rows = mf.read_table(storage.join(out, mf.INDEX_NAME), st).to_pylist()
    assert m.num_samples == len(rows) == sum(s.num_samples for s in m.shards)
    assert [r["key"] for r in rows] == [k for s in m.shards for k in s.keys]
    assert list(rows[0]) == list(mf.INDEX_COLUMNS)  # the schema of pipeline.ingest.manifest, in its order
    by_shard = {}
    for s in m.shards:
        raw = storage.read_bytes(m.shard_url(s), st)
        assert (len(raw), hashlib.sha256(raw).hexdigest()) == (s.size, s.sha256)
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            by_shard[s.name] = (raw, {m_.name: tf.extractfile(m_).read() for m_ in tf.getmembers()})
    for r in rows:
        raw, members = by_shard[r["shard"]]
        mp4 = raw[r["offset"] : r["offset"] + r["size"]]
        assert mp4 == members[f"{r['key']}.mp4"]
        meta = json.loads(members[f"{r['key']}.json"])
        assert meta["clip"]["sha256"] == hashlib.sha256(mp4).hexdigest()
        assert (meta["label"], meta["domain"], meta["source"]) == (r["label"], r["domain"], r["source"])
        assert (meta["clip"]["frames"], meta["clip"]["width"], meta["clip"]["height"]) == (
            r["frames"],
            r["width"],
            r["height"],
        )
        assert members.get(f"{r['key']}.cls") == (str(r["label"]).encode() if r["label"] >= 0 else None)
    return m, rows


def test_local_end_to_end(local_inputs, tmp_path, ray_cluster, capsys):
    out = str(tmp_path / "shards")
    stats = shard(local_inputs, out, debug_config())
    n_in = 12 + len(BAD) + len(GOOD)
    assert (stats["videos_in"], stats["rejected"], stats["videos_ok"]) == (n_in, len(BAD), n_in - len(BAD))
    assert stats["clips_out"] == n_in - len(BAD) + 1  # the 3.2 s video is cut into 2 clips of <= 2 s
    m, rows = check_shard_set(out)
    assert len(m.shards) == -(-len(rows) // 4) and all(s.num_samples <= 4 for s in m.shards)
    assert sorted(os.listdir(out)) == sorted(
        ["config.yaml", "index.parquet", "manifest.json", "rejects.parquet", *[s.name for s in m.shards]]
    )

    rejects = pq.read_table(os.path.join(out, "rejects.parquet")).to_pylist()
    got = {os.path.basename(r["source"]).split(".")[0]: r["stage"] for r in rejects}
    assert got == REJECT_STAGE and all(r["error"] and "\n" not in r["error"] for r in rejects)

    by_source = {}
    for r in rows:
        by_source.setdefault(os.path.relpath(r["source"], local_inputs), []).append(r)
    assert set(by_source) == {os.path.relpath(p, local_inputs) for p in _videos(local_inputs)} - {
        f"misc/{k}{KINDS[k]}" for k in BAD
    }
    long = by_source["jump/v_jump_g00.mp4"]  # 80 frames @ 25 fps = 3.2 s -> 48 frames @ 15 fps -> 30 + 18
    assert [(r["frames"], r["clip_start"]) for r in long] == [(30, 0.0), (18, 2.0)]
    assert (long[0]["label"], long[0]["label_name"], long[0]["width"], long[0]["height"]) == (
        0,
        "jump",
        86,
        64,
    )
    assert (by_source["misc/rotated.mp4"][0]["width"], by_source["misc/rotated.mp4"][0]["height"]) == (48, 64)
    assert m.stats["classes"] == ["jump", "misc", "run", "swim"]

    # plain webdataset, no decoding (no pickle): keys in index order, labels and metadata intact
    urls = [m.shard_url(s) for s in m.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [r["key"] for r in rows]
    first = samples[0]
    assert json.loads(first["json"])["key"] == first["__key__"] and int(first["cls"]) == rows[0]["label"]
    vr = decord.VideoReader(io.BytesIO(first["mp4"]))
    assert (len(vr), *vr[0].shape) == (rows[0]["frames"], rows[0]["height"], rows[0]["width"], 3)

    import ray

    ds = ray.data.read_webdataset(urls, decoder=None)
    recs = ds.take_all()
    assert sorted(r["__key__"] for r in recs) == sorted(r["key"] for r in rows)
    assert all(json.loads(r["json"])["key"] == r["__key__"] for r in recs)

    capsys.readouterr()
    assert cli_main(["shard", "--input", local_inputs, "--output", out, "--config", DEBUG]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (
        cli_main(["shard", "--input", local_inputs, "--output", out, "--config", DEBUG, "transcode.crf=30"])
        == 2
    )
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["shard", "--input", str(tmp_path / "nope"), "--output", out]) == 2


def _videos(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def test_resume_after_crash_between_shards_and_overwrite(local_inputs, tmp_path, ray_cluster):
    out = str(tmp_path / "s")
    cfg = debug_config("keep_work=true")
    shard(local_inputs, out, cfg)
    m, rows = check_shard_set(out)
    before = {s.name: open(os.path.join(out, s.name), "rb").read() for s in m.shards}
    # a crash after the 2nd shard: later shards, the index and the manifest never appeared
    for name in ["manifest.json", "index.parquet", "rejects.parquet", *[s.name for s in m.shards[2:]]]:
        os.unlink(os.path.join(out, name))
    stats = shard(local_inputs, out, cfg)
    assert stats["videos_cached"] == stats["videos_in"] and stats["shards_reused"] == 2
    m2, rows2 = check_shard_set(out)
    assert rows2 == rows and m2.shards == m.shards
    assert {s.name: open(os.path.join(out, s.name), "rb").read() for s in m2.shards} == before

    stats = shard(
        local_inputs,
        out,
        dataclasses.replace(cfg, keep_work=False, shards=dataclasses.replace(cfg.shards, max_samples=100)),
        overwrite=True,
    )
    m3, _ = check_shard_set(out)
    assert len(m3.shards) == 1 and stats["videos_cached"] == stats["videos_in"]
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == [m3.shards[0].name]
    assert not os.path.exists(os.path.join(out, "_work"))


@pytest.mark.slow
def test_kill_9_then_rerun_equals_clean_run(local_inputs, tmp_path, ray_cluster):
    clean = str(tmp_path / "clean")
    shard(local_inputs, clean, debug_config())
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "jobs.cli", "shard", "--input", local_inputs, "--output", out, "--config", DEBUG,
           "ray.num_cpus=1", "ray.max_in_flight=1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    work = os.path.join(out, "_work")
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(work) and sum(n.endswith(".json") for n in os.listdir(work)) >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        try:  # the Ray processes this driver started share its process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    stats = shard(local_inputs, out, debug_config())
    assert stats["videos_cached"] >= 4
    m_clean, rows_clean = check_shard_set(clean)
    m, rows = check_shard_set(out)
    assert (
        rows == rows_clean
        and m.shards == m_clean.shards
        and m.stats["fingerprint"] == m_clean.stats["fingerprint"]
    )
    for s in m.shards:
        assert open(os.path.join(out, s.name), "rb").read() == open(os.path.join(clean, s.name), "rb").read()
    assert pq.read_table(os.path.join(out, "rejects.parquet")) == pq.read_table(
        os.path.join(clean, "rejects.parquet")
    )
    assert sorted(os.listdir(out)) == sorted(os.listdir(clean))


@pytest.mark.s3
def test_s3_end_to_end(s3_bucket, ray_cluster, tmp_path):
    import pyarrow.fs as pafs
    import ray

    fs, _ = storage.get_fs(s3_bucket)
    raw, out = f"{s3_bucket}/raw/ucf", f"{s3_bucket}/shards/ucf"
    make_labelled_tree(
        tmp_path / "ucf", classes=("jump", "run"), per_class=3, width=128, height=96, frames=20
    )
    fs.put(str(tmp_path / "ucf"), raw.split("://", 1)[1], recursive=True)
    fs.pipe_file(f"{raw.split('://', 1)[1]}/bad.mp4", video_bytes("truncated"))
    stats = shard(raw, out, debug_config("shards.max_samples=2"))
    assert (stats["videos_in"], stats["videos_ok"], stats["rejected"], stats["shards_out"]) == (7, 6, 1, 3)
    m, rows = check_shard_set(out)
    assert {r["domain"] for r in rows} == {"ucf"} and all(r["source"].startswith(raw) for r in rows)
    rejects = mf.read_table(storage.join(out, mf.REJECTS_NAME))
    assert rejects.column("source").to_pylist() == [f"{raw}/bad.mp4"]
    assert not fs.exists(f"{out.split('://', 1)[1]}/_work")
    assert shard(raw, out, debug_config("shards.max_samples=2")).get("noop")

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    s3 = pafs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[1], scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1")  # fmt: skip
    paths = [m.shard_url(s).split("://", 1)[1] for s in m.shards]
    recs = ray.data.read_webdataset(paths, filesystem=s3, decoder=None).take_all()
    assert sorted(r["__key__"] for r in recs) == sorted(r["key"] for r in rows)
    assert {int(r["cls"]) for r in recs} == {0, 1}
