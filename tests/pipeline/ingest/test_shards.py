"""Sources (keys, labels, domains), the per-source work cache, shard planning and atomic tar writing."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.ingest.shards import (
    ShardConfig,
    ShardSample,
    plan_digest,
    plan_shards,
    prepare_sample,
    tar_size,
    write_shard,
)
from pipeline.ingest.sources import SourceConfig, SourceItem, list_sources, make_key
from pipeline.ingest.transcode import TranscodeConfig
from tests.videos import make_labelled_tree, make_video

# ---------------------------------------------------------------- sources


def test_make_key_is_stable_safe_and_unique():
    key = make_key("Jump/v_Jump_g01.avi")
    assert key == "Jump_v_Jump_g01_avi-" + hashlib.sha1(b"Jump/v_Jump_g01.avi").hexdigest()[:8]
    assert make_key("a/b.mp4") != make_key("a_b.mp4")
    odd = make_key("dir with space/ü.x/../" + "long" * 40 + ".mp4")
    assert "." not in odd and "/" not in odd and odd.isascii() and len(odd) <= 72 + 9


def _tree(root):
    make_labelled_tree(root, classes=("run", "jump"), per_class=2, frames=4)
    make_video(root / "loose.MP4", frames=4)  # no class folder; upper-case extension
    make_video(root / ".hidden" / "x.mp4", frames=4)
    make_video(root / "_work" / "y.mp4", frames=4)
    (root / "notes.txt").write_text("not a video")
    return root


def test_list_folder_labels(tmp_path):
    root = _tree(tmp_path / "ucf")
    listing = list_sources(str(root), SourceConfig(labels="folder"))
    rels = [i.rel for i in listing.items]
    assert sorted(rels) == [
        "jump/v_jump_g00.mp4",
        "jump/v_jump_g01.mp4",
        "loose.MP4",
        "run/v_run_g00.mp4",
        "run/v_run_g01.mp4",
    ]
    assert [i.key for i in listing.items] == sorted(i.key for i in listing.items)
    assert listing.classes == ("jump", "run")
    by_rel = {i.rel: i for i in listing.items}
    assert (by_rel["run/v_run_g01.mp4"].label, by_rel["run/v_run_g01.mp4"].label_name) == (1, "run")
    assert by_rel["loose.MP4"].label == -1
    assert {i.domain for i in listing.items} == {"ucf"}
    assert by_rel["loose.MP4"].url == str(root / "loose.MP4")
    assert by_rel["loose.MP4"].size == os.path.getsize(root / "loose.MP4")
    prefixed = list_sources(str(root), SourceConfig(domain_from="prefix"))
    assert {i.rel.split("/")[0]: i.domain for i in prefixed.items}["run"] == "run"
    fixed = list_sources("file://" + str(root), SourceConfig(domain="web"))
    assert {i.domain for i in fixed.items} == {"web"} and fixed.items[0].url.startswith("file://")


def test_list_label_list_csv_and_parquet(tmp_path):
    root = _tree(tmp_path / "k")
    (tmp_path / "list.csv").write_text(
        "path,label\nrun/v_run_g00.mp4,running\n./loose.MP4,idle\ngone/x.mp4,idle\n"
    )
    cfg = SourceConfig(labels="list", label_list=str(tmp_path / "list.csv"))
    listing = list_sources(str(root), cfg)
    assert listing.classes == ("idle", "running") and listing.missing == ("gone/x.mp4",)
    labels = {i.rel: (i.label, i.label_name) for i in listing.items}
    assert labels["run/v_run_g00.mp4"] == (1, "running") and labels["loose.MP4"] == (0, "idle")
    assert labels["jump/v_jump_g00.mp4"] == (-1, "")
    only = list_sources(
        str(root), SourceConfig(labels="list", label_list=str(tmp_path / "list.csv"), only_listed=True)
    )
    assert [i.rel for i in only.items] == sorted(["run/v_run_g00.mp4", "loose.MP4"], key=make_key)

    table = pa.table(
        {"path": [str(root / "jump/v_jump_g01.mp4")], "label": [3], "class": ["hop"], "domain": ["sport"]}
    )
    pq.write_table(table, tmp_path / "list.parquet")
    listing = list_sources(str(root), SourceConfig(labels="list", label_list=str(tmp_path / "list.parquet")))
    item = next(i for i in listing.items if i.rel == "jump/v_jump_g01.mp4")
    assert (item.label, item.label_name, item.domain) == (3, "hop", "sport")
    assert listing.classes == ("", "", "", "hop")


def test_list_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("file,cls\na,b\n")
    with pytest.raises(ValueError, match="needs columns 'path' and 'label'"):
        list_sources(
            str(_tree(tmp_path / "r")), SourceConfig(labels="list", label_list=str(tmp_path / "bad.csv"))
        )
    with pytest.raises(ValueError, match="does not exist"):
        list_sources(str(tmp_path / "nope"), SourceConfig())
    with pytest.raises(ValueError, match="needs source.label_list"):
        SourceConfig(labels="list")
    with pytest.raises(ValueError, match="source.labels must be"):
        SourceConfig(labels="tags")
    with pytest.raises(ValueError, match="source.extensions"):
        SourceConfig(extensions=("mp4",))


def test_list_excludes_output_inside_input(tmp_path):
    root = _tree(tmp_path / "in")
    make_video(root / "out" / "z.mp4", frames=4)
    rels = [i.rel for i in list_sources(str(root), SourceConfig(), exclude=str(root / "out")).items]
    assert "out/z.mp4" not in rels and len(rels) == 5


# ---------------------------------------------------------------- work cache


def _item(path, rel="a/b.mp4") -> SourceItem:
    return SourceItem(url=str(path), rel=rel, key=make_key(rel), size=os.path.getsize(path), version="1")


def test_prepare_sample_caches_results_and_rejects(tmp_path):
    work = str(tmp_path / "work")
    src = make_video(tmp_path / "v.mp4", frames=12)
    cfg = TranscodeConfig(short_side=32, fps=25)
    rec = prepare_sample(_item(src), work, cfg)
    assert rec["status"] == "ok" and not rec["cached"]
    assert rec["source_sha256"] == hashlib.sha256(open(src, "rb").read()).hexdigest()
    (clip,) = rec["clips"]
    data = open(os.path.join(work, f"{clip['key']}.mp4"), "rb").read()
    assert (clip["size"], clip["sha256"], clip["frames"]) == (len(data), hashlib.sha256(data).hexdigest(), 12)
    again = prepare_sample(_item(src), work, cfg)
    assert again["cached"] and again["clips"] == rec["clips"]
    other = prepare_sample(_item(src), work, TranscodeConfig(short_side=16, fps=25))
    assert not other["cached"] and other["clips"][0]["width"] == 22  # 64 * 16 / 48 = 21.3 -> even 22

    bad = make_video(tmp_path / "bad.mp4", "not_video")
    rej = prepare_sample(_item(bad, "bad.mp4"), work, cfg)
    assert (rej["status"], rej["stage"], rej.get("retryable")) == ("rejected", "probe", None)
    assert prepare_sample(_item(bad, "bad.mp4"), work, cfg)["cached"]

    gone = _item(src, "gone.mp4")
    os.unlink(src)
    miss = prepare_sample(gone, work, cfg)
    assert (miss["status"], miss["stage"], miss["retryable"]) == ("rejected", "read", True)
    assert not os.path.exists(os.path.join(work, f"{gone.key}.json"))  # retried next run, not cached
    assert not [n for n in os.listdir(os.path.join(work, ".tmp"))]  # no scratch left behind


def test_prepare_sample_remote_source_retries_transient_errors(tmp_path, monkeypatch):
    """A non-local source is streamed to scratch; a dropped connection is retried with backoff."""
    import fsspec

    from pipeline.storage import StorageConfig

    data = open(make_video(tmp_path / "v.mp4", frames=6), "rb").read()
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/raw/v.mp4", data)
    real_open, calls = fs.open, []

    def flaky_open(path, mode="rb", **kw):
        calls.append(path)
        if len(calls) == 1:
            raise ConnectionError("connection reset by peer")
        return real_open(path, mode, **kw)

    monkeypatch.setattr(fs, "open", flaky_open)
    item = SourceItem(
        url="memory://raw/v.mp4", rel="v.mp4", key=make_key("v.mp4"), size=len(data), version="1"
    )
    rec = prepare_sample(
        item, str(tmp_path / "work"), TranscodeConfig(short_side=32), StorageConfig(backoff_s=0.01)
    )
    assert rec["status"] == "ok" and len(calls) == 2
    assert rec["source_sha256"] == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- shards


def _samples(tmp_path, sizes: list[int], label: int = 2) -> list[ShardSample]:
    out = []
    for i, n in enumerate(sizes):
        p = tmp_path / f"s{i}.mp4"
        p.write_bytes(bytes([i % 251]) * n)
        out.append(
            ShardSample(
                key=f"k{i:02d}", mp4_url=str(p), mp4_size=n, meta={"i": i}, label=label if i % 2 else -1
            )
        )
    return out


def test_plan_respects_limits_and_predicts_tar_sizes(tmp_path):
    samples = _samples(tmp_path, [3000, 9000, 100, 25000, 40000, 700, 700, 700, 700, 5000])
    plan = plan_shards(samples, ShardConfig(max_bytes=30 * 1024, max_samples=3))
    assert [s.key for shard in plan for s in shard] == [s.key for s in samples]  # order kept, nothing lost
    for i, shard in enumerate(plan):
        info, _ = write_shard(shard, str(tmp_path / f"t-{i:06d}.tar"), ShardConfig())
        assert info.size == os.path.getsize(tmp_path / f"t-{i:06d}.tar") == tar_size(shard)
        assert len(shard) <= 3
        assert info.size <= 30 * 1024 or len(shard) == 1  # the 40000-byte sample stands alone
    for a, b in zip(plan, plan[1:], strict=False):  # greedy: the next sample did not fit
        assert len(a) == 3 or tar_size(a + b[:1]) > 30 * 1024


def test_write_shard_members_offsets_and_determinism(tmp_path):
    samples = _samples(tmp_path, [1000, 513, 4096])
    url = str(tmp_path / "out" / "x-000000.tar")
    info, spans = write_shard(samples, url, ShardConfig())
    raw = open(url, "rb").read()
    assert info.sha256 == hashlib.sha256(raw).hexdigest() and info.keys == ("k00", "k01", "k02")
    for s in samples:
        off, size = spans[s.key]
        assert raw[off : off + size] == open(s.mp4_url, "rb").read()
    with tarfile.open(url) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [
            "k00.json",
            "k00.mp4",
            "k01.cls",
            "k01.json",
            "k01.mp4",
            "k02.json",
            "k02.mp4",
        ]
        assert {(m.mtime, m.uid, m.uname) for m in members} == {(0, 0, "vmae")}
    got = list(wds.WebDataset(url, shardshuffle=False, empty_check=False))
    assert [g["__key__"] for g in got] == ["k00", "k01", "k02"]
    assert json.loads(got[1]["json"]) == {"i": 1} and got[1]["cls"] == b"2" and "cls" not in got[0]
    os.rename(url, url + ".first")
    write_shard(samples, url, ShardConfig())
    assert open(url + ".first", "rb").read() == open(url, "rb").read()
    assert plan_digest(samples, ShardConfig()) != plan_digest(samples[:2], ShardConfig())


def test_write_shard_is_atomic(tmp_path):
    samples = _samples(tmp_path, [100, 200, 300])
    calls = []

    def flaky(url: str) -> bytes:
        calls.append(url)
        if len(calls) == 2:
            raise ConnectionError("storage went away")
        return open(url, "rb").read()

    out = tmp_path / "out"
    with pytest.raises(ConnectionError):
        write_shard(samples, str(out / "x-000000.tar"), ShardConfig(), read=flaky)
    assert not (out / "x-000000.tar").exists()
    assert os.listdir(out / ".tmp") == []


def test_shard_config_validation():
    with pytest.raises(ValueError, match="shards.prefix"):
        ShardConfig(prefix="a.b")
    with pytest.raises(ValueError, match="shards.max_samples"):
        ShardConfig(max_samples=-1)


def test_shard_write_order_is_a_seeded_shuffle_or_the_key_order():
    """Class-sorted keys (a UCF101-style bucket) must not become class-pure shards: the default write order is
    a deterministic hash of (seed, key); ``order: key`` keeps the sorted order."""
    keys = [f"{cls}_v{i:03d}" for cls in ("archery", "bowling", "diving") for i in range(40)]
    shuffled = sorted(keys, key=ShardConfig().sort_key)
    assert shuffled == sorted(keys, key=lambda k: hashlib.sha256(f"0:{k}".encode()).digest())
    assert sorted(keys, key=ShardConfig(seed=1).sort_key) != shuffled
    assert sorted(keys, key=ShardConfig(order="key").sort_key) == keys
    first_shard = shuffled[:40]  # what a 40-sample shard would hold
    assert {k.split("_")[0] for k in first_shard} == {"archery", "bowling", "diving"}
    with pytest.raises(ValueError, match="shards.order must be one of"):
        ShardConfig(order="random")
