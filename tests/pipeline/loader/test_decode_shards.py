"""The shard encoder's decode-friendly settings do what they say (read back from the bitstream: x264 writes its
settings into the stream; key frames and B-frames from the packets), and the loader's backends read the
transcoder's output exactly."""

from __future__ import annotations

import io

import av
import decord
import numpy as np
import pytest

from pipeline.ingest.encode import decode_all, encode_mp4
from pipeline.ingest.transcode import TranscodeConfig, transcode
from pipeline.loader.decode import read_clip_frames
from tests.pipeline.shardset_helpers import video_frames

SOURCE = encode_mp4(video_frames(0, 70, 160, 96, "moving"), fps=30, crf=18, gop=70)


def _packets(data: bytes) -> list[tuple[bool, int]]:
    with av.open(io.BytesIO(data)) as inp:
        return [(p.is_keyframe, p.pts) for p in inp.demux(video=0) if p.size]


@pytest.mark.parametrize("gop, bframes, tune", [(32, None, "fastdecode"), (16, 0, ""), (8, 2, "fastdecode")])
def test_transcode_writes_the_requested_stream(gop, bframes, tune):
    data = transcode(SOURCE, TranscodeConfig(short_side=96, gop=gop, bframes=bframes, tune=tune))[0]
    packets = _packets(data)
    assert [i for i, (key, _) in enumerate(packets) if key] == list(range(0, len(packets), gop))
    reordered = any(b[1] < a[1] for a, b in zip(packets, packets[1:], strict=False))  # a B-frame comes late
    assert reordered == (bframes != 0)
    settings = data[data.index(b"x264 - core") :][:2000]  # x264's own record of what it encoded with
    assert (b"cabac=0" in settings and b"deblock=0" in settings) == (tune == "fastdecode")
    assert f"bframes={3 if bframes is None else bframes} ".encode() in settings  # veryfast's default: 3


def test_backends_read_the_default_shards_exactly():
    data = transcode(SOURCE, TranscodeConfig(short_side=96))[0]
    full = decode_all(data)
    idx = [3, 7, 11, 15, 40, 44, 48, 69]
    vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
    assert np.array_equal(vr.get_batch(idx).asnumpy(), full[idx])
    for backend in ("pyav", "decord"):
        out, _, used = read_clip_frames(data, lambda n: idx, backend=backend)
        assert used == backend and np.array_equal(out, full[idx])


@pytest.mark.parametrize("field, value, message", [("bframes", 17, "transcode.bframes must be in"),
                                                   ("bframes", -1, "transcode.bframes must be in"),
                                                   ("tune", "fast", "transcode.tune must be one of")])  # fmt: skip
def test_encoder_settings_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        TranscodeConfig(**{field: value})
