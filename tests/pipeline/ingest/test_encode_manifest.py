import io

import decord
import numpy as np
import pytest

from pipeline.ingest.encode import decode_all, encode_mp4
from pipeline.ingest.manifest import (
    Manifest,
    ShardInfo,
    read_manifest,
    read_subset,
    write_manifest,
    write_subset,
)


def test_encode_decode_roundtrip_shape_and_content():
    yy, xx = np.mgrid[0:32, 0:64]
    base = np.stack([xx * 5, yy * 7, (xx + yy) * 3], -1).astype(np.uint8)[None]  # smooth: survives 4:2:0
    frames = np.repeat(base, 10, axis=0)
    data = encode_mp4(frames, fps=25, crf=10)
    out = decode_all(data)
    assert out.shape == (10, 32, 64, 3)
    # lossy, but close on average at crf 10
    assert np.abs(out.astype(int) - frames.astype(int)).mean() < 4
    vr = decord.VideoReader(io.BytesIO(data))
    assert len(vr) == 10 and vr[0].shape == (32, 64, 3)
    assert vr.get_avg_fps() == pytest.approx(25, rel=1e-3)


def test_encode_rejects_odd_and_bad_dtype():
    with pytest.raises(ValueError, match="even dimensions"):
        encode_mp4(np.zeros((2, 31, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((2, 32, 32, 3), np.float32))


def test_manifest_roundtrip_and_missing(tmp_path):
    m = Manifest(
        shards=(ShardInfo(name="s-000000.tar", size=10, sha256="ab", num_samples=2, keys=("a", "b")),),
        num_samples=2, config={"x": 1}, code_version="v", created="now",
    )  # fmt: skip
    url = str(tmp_path / "manifest.json")
    write_manifest(url, m)
    back = read_manifest(str(tmp_path))
    assert back.shards == m.shards and back.num_samples == 2
    assert back.shard_url(back.shards[0]) == str(tmp_path / "s-000000.tar")
    with pytest.raises(ValueError, match="incomplete"):
        read_manifest(str(tmp_path / "nope"))


def test_subset_roundtrip(tmp_path):
    url = str(tmp_path / "sub.parquet")
    write_subset(url, ["a", "c"], source_manifest="m.json", rule={"top": 2}, inputs_hash="h")
    s = read_subset(url)
    assert s.keys == ("a", "c") and s.rule == {"top": 2} and s.source_manifest == "m.json"
