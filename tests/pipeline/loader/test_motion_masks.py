"""Motion vectors -> token motion field -> masks that follow it (pipeline/loader/motion.py)."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch

from pipeline.ingest.encode import encode_mp4
from pipeline.loader.masking import num_masked, tube_mask
from pipeline.loader.motion import VideoMotion, collect_motion, decode_motion, motion_field, motion_masks
from pipeline.loader.transforms import Crop

SIZE, VX, VY, SIDE, X0, Y0 = 128, 2, 1, 48, 16, 16  # frame, square velocity px/frame, square side and start


def square_frames(frames: int = 24) -> np.ndarray:
    """uint8 [T, 128, 128, 3]: a textured square moving (VX, VY) px per frame over a static textured floor."""
    rng = np.random.default_rng(0)
    floor = (
        rng.integers(0, 256, (SIZE // 8, SIZE // 8, 3)).repeat(8, 0).repeat(8, 1).astype(np.uint8) // 2 + 40
    )
    tex = rng.integers(0, 256, (SIDE // 4, SIDE // 4, 3)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
    out = np.repeat(floor[None], frames, 0)
    for t in range(frames):
        out[t, Y0 + VY * t : Y0 + VY * t + SIDE, X0 + VX * t : X0 + VX * t + SIDE] = tex
    return out


def flat_b_mp4(frames: np.ndarray) -> bytes:
    """H.264 with 3 B-frames and no B-pyramid: runs of non-reference frames decoded one after the other
    (``encode_mp4`` cannot turn the pyramid off)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.options = {
            "preset": "veryfast",
            "bf": "3",
            "g": "16",
            "x264-params": "b-pyramid=none:b-adapt=0:mbtree=0",  # mbtree: bytes differ run to run
        }
        for rgb in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


@pytest.fixture(scope="module")
def videos() -> dict[str, bytes]:
    frames = square_frames()
    return {
        "p_only": encode_mp4(frames, gop=16, bframes=0),
        "b_frames": encode_mp4(frames, gop=16),  # veryfast's 3 B-frames with a B-pyramid (the shards')
        "intra_only": encode_mp4(frames, gop=1),
        "b_flat": flat_b_mp4(frames),
    }


INDICES = list(range(2, 18, 2))  # 8 frames, stride 2 -> 4 tubelets of 2, spans of 4 frames
GRID = (4, 8, 8)


def inside_square(k: int, crop: Crop, h: int = 8, w: int = 8, margin: int = 0) -> list[tuple[int, int]]:
    """Tokens of an ``h x w`` grid on ``crop`` wholly inside the square at the first frame of tubelet ``k``,
    at least ``margin`` px from its edges (macroblocks straddling an edge mix the two motions)."""
    f = INDICES[2 * k]
    x0, y0, x1, y1 = (
        X0 + VX * f + margin,
        Y0 + VY * f + margin,
        X0 + VX * f + SIDE - margin,
        Y0 + VY * f + SIDE - margin,
    )
    tw, th = crop.width / w, crop.height / h
    return [(i, j) for i in range(h) for j in range(w)
            if crop.left + j * tw >= x0 and crop.left + (j + 1) * tw <= x1
            and crop.top + i * th >= y0 and crop.top + (i + 1) * th <= y1]  # fmt: skip


@pytest.mark.parametrize("kind", ["p_only", "b_frames", "b_flat"])
def test_field_recovers_the_square_motion(videos, kind):
    crop = Crop(top=0, left=0, height=SIZE, width=SIZE)
    field = motion_field(decode_motion(videos[kind], INDICES), INDICES, crop, grid=GRID, tubelet_size=2)
    assert field.shape == (3, 8, 8, 2) and field.dtype == np.float32
    want = np.array([VX, VY]) * 4 / 16  # 4 frames per span, 16 px per token
    margin = 8 if kind == "b_flat" else 0  # its P-frames are 4 apart: vectors over 4 frames blur the edges
    for k in range(3):
        cells = inside_square(k, crop, margin=margin)
        assert len(cells) >= (1 if margin else 4)
        for i, j in cells:
            np.testing.assert_allclose(field[k, i, j], want, atol=0.08)
        far = field[k, 6:, :]  # the static floor below the square
        assert np.abs(far).max() < 0.05


def test_field_of_a_crop_is_in_its_tokens_and_flip_reverses_x(videos):
    motion = decode_motion(videos["b_frames"], INDICES)
    crop = Crop(top=16, left=32, height=64, width=64)  # 8 px tokens: the same motion is twice as many tokens
    field = motion_field(motion, INDICES, crop, grid=GRID, tubelet_size=2)
    cells = inside_square(0, crop, margin=8)
    assert len(cells) >= 4
    for i, j in cells:
        np.testing.assert_allclose(field[0, i, j], [VX * 4 / 8, VY * 4 / 8], atol=0.15)
    flipped = motion_field(motion, INDICES, Crop(16, 32, 64, 64, flip=True), grid=GRID, tubelet_size=2)
    for i, j in cells:
        assert flipped[0, i, 7 - j, 0] < -0.75 and flipped[0, i, 7 - j, 1] > 0.25
    np.testing.assert_array_equal(flipped, field[:, :, ::-1] * np.array([-1, 1], np.float32))


def test_collect_motion_from_a_pass_that_shows_every_frame(videos):
    """The loader's decode pass also shows non-reference B-frames: their vectors count, but they are never
    taken as another frame's reference (told apart here by the slice NAL header's nal_ref_idc)."""
    frames, refs, decode_pos = {}, set(), {}
    with av.open(io.BytesIO(videos["b_flat"])) as inp:
        stream = inp.streams.video[0]
        stream.codec_context.options = {"flags2": "+export_mvs"}
        packets = [p for p in inp.demux(stream) if p.size]
        shown = {pts: i for i, pts in enumerate(sorted(p.pts for p in packets))}
        for k, p in enumerate(packets):
            data, pos = bytes(p), 0
            while data[pos + 4] & 31 not in (1, 5):  # skip SEI and the like: 4-byte lengths (avcC)
                pos += 4 + int.from_bytes(data[pos : pos + 4], "big")
            decode_pos[shown[p.pts]] = k
            if data[pos + 4] >> 5 & 3:
                refs.add(shown[p.pts])
        for packet in [*packets, None]:
            for frame in stream.codec_context.decode(packet):
                mv = frame.side_data.get(av.sidedata.sidedata.Type.MOTION_VECTORS)
                frames[shown[frame.pts]] = None if mv is None else mv.to_ndarray()
    assert 0 < len(refs) < len(frames)  # B-frames that are not references exist
    motion = collect_motion(frames, refs, decode_pos, (INDICES[0], INDICES[-1]), width=SIZE, height=SIZE)
    ends = [(lo in refs, hi in refs) for lo, hi in motion.spans.tolist()]
    assert all(a or b for a, b in ends)  # a non-reference frame only ends its own spans
    assert not all(a and b for a, b in ends)  # and it has some
    crop = Crop(top=0, left=0, height=SIZE, width=SIZE)
    field = motion_field(motion, INDICES, crop, grid=GRID, tubelet_size=2)
    for k in range(3):
        cells = inside_square(k, crop, margin=8)  # as for b_flat above
        assert cells
        for i, j in cells:
            np.testing.assert_allclose(field[k, i, j], np.array([VX, VY]) * 4 / 16, atol=0.08)


def test_intra_only_video_has_no_motion(videos):
    motion = decode_motion(videos["intra_only"], INDICES)
    assert len(motion.spans) == len(motion.x) == 0
    field = motion_field(motion, INDICES, Crop(0, 0, SIZE, SIZE), grid=GRID, tubelet_size=2)
    assert not field.any()


def test_decode_motion_spans_and_signs(videos):
    """Every vector spans a positive interval around the clip; P-only: one-frame spans forward."""
    m = decode_motion(videos["p_only"], INDICES)
    lo, hi = m.spans.T
    assert (hi > INDICES[0]).all() and (lo < INDICES[-1]).all()  # only spans that reach into the clip
    assert list(hi) == list(range(3, 16)) and set(hi - lo) == {1}  # frame 16 is a key frame: no vectors
    assert len(m.group) == len(m.x) and set(m.group) == set(range(len(m.spans)))
    lo, hi = decode_motion(videos["b_frames"], INDICES).spans.T
    assert (hi - lo).max() > 1  # references farther apart than one frame were found and measured
    assert (hi - lo).min() >= 1
    with pytest.raises(ValueError, match="frame indices"):
        decode_motion(videos["p_only"], [0, 24])


def test_field_binning_against_hand_computation():
    """Votes weighted by block area inside a token times frames inside the span, by hand (32 px tokens)."""
    rows = np.array([  # lo, hi, x, y, dx, dy, block_w, block_h
        [0, 2, 12, 12, 4, -2, 16, 16],  # token (0,0): 2 px/frame right, 1 up; 256 px x 2 frames
        [2, 6, 20, 8, 8, 0, 8, 8],  # token (0,0): 2 px/frame right; 64 px x 2 frames (of (2, 4])
        [5, 6, 20, 20, 100, 0, 16, 16],  # after the span (0, 4]
        [0, 4, 40, 40, -12, 6, 8, 8],  # token (1,1): 64 px x 4 frames
        [0, 4, 32, 50, 8, 8, 16, 16],  # half in token (1,0), half in (1,1): 128 px x 4 frames each
        [0, 4, 90, 10, 50, 50, 16, 16],  # outside the crop
    ], dtype=float).T  # fmt: skip
    spans = rows[:2].T.astype(np.int64)  # one span per row; decode_motion shares one per frame and list
    motion = VideoMotion(spans=spans, group=np.arange(len(spans)), x=rows[2], y=rows[3], dx=rows[4],
                         dy=rows[5], block_w=rows[6], block_h=rows[7], width=100, height=64)  # fmt: skip
    crop = Crop(0, 0, 64, 64)
    field = motion_field(motion, [0, 4], crop, grid=(2, 2, 2), tubelet_size=1)
    want = np.zeros((1, 2, 2, 2))
    want[0, 0, 0] = [(512 * 2 + 128 * 2) / 640, (512 * -1 + 128 * 0) / 640]  # px per frame
    want[0, 1, 0] = [2, 2]
    want[0, 1, 1] = [(64 * -3 + 128 * 2) / 192, (64 * 1.5 + 128 * 2) / 192]
    want *= 4 / 32  # 4 frames, 32 px per token
    np.testing.assert_allclose(field, want, rtol=1e-6)
    flipped = motion_field(motion, [0, 4], Crop(0, 0, 64, 64, flip=True), grid=(2, 2, 2), tubelet_size=1)
    np.testing.assert_allclose(flipped, want[:, :, ::-1] * [-1, 1], rtol=1e-6)
    wide = motion_field(motion, [0, 4], Crop(0, 0, 64, 128), grid=(2, 2, 2), tubelet_size=1)
    assert wide[0, 0, 0, 0] == pytest.approx(want[0, 0, 0, 0] / 2)  # 64 px tokens across, 32 down
    assert wide[0, 0, 0, 1] == pytest.approx(want[0, 0, 0, 1])
    with pytest.raises(ValueError, match="frame indices"):
        motion_field(motion, [0, 4, 8], crop, grid=(2, 2, 2), tubelet_size=1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_zero_field_is_the_tube_mask(ratio):
    t, h, w = 8, 14, 14
    got = motion_masks(np.zeros((t - 1, h, w, 2)), ratio, gen(7))
    assert torch.equal(got, tube_mask(1, t, h, w, ratio, gen(7))[0])


@pytest.mark.parametrize("ratio", [0.3, 0.75, 0.9])
def test_exact_count_and_deterministic_under_any_field(ratio):
    t, h, w = 8, 7, 9
    rng = np.random.default_rng(0)
    fields = [rng.normal(0, 2, (t - 1, h, w, 2)), np.full((t - 1, h, w, 2), 0.6)]
    sink = np.zeros((t - 1, h, w, 2))  # everything converges on token (3, 4): collisions everywhere
    ys, xs = np.mgrid[0:h, 0:w]
    sink[..., 0], sink[..., 1] = 4 - xs, 3 - ys
    for field in [*fields, sink]:
        m = motion_masks(torch.from_numpy(field), ratio, gen(1))
        assert m.dtype == torch.bool and m.shape == (t * h * w,)
        per_slice = m.view(t, h * w).sum(1)
        assert (per_slice == round(ratio * h * w)).all() and m.sum() == num_masked(t, h, w, ratio, "tube")
        torch.manual_seed(123)  # the global RNG plays no part
        assert torch.equal(m, motion_masks(field, ratio, gen(1)))
    assert not torch.equal(motion_masks(fields[0], 0.5, gen(1)), motion_masks(fields[0], 0.5, gen(2)))


def test_masks_follow_a_known_field():
    """Row ``i`` moves ``s_i`` tokens right per tubelet (a permutation of each row: no collisions), so slice
    ``k`` is the first slice with row ``i`` rolled by ``k * s_i``; a half-token field moves every mask one
    token every other tubelet (positions accumulate, rounded half up)."""
    t, h, w = 6, 5, 8
    shifts = np.array([0, 1, -1, 2, 3])
    field = np.zeros((t - 1, h, w, 2))
    field[..., 0] = shifts[None, :, None]
    m = motion_masks(field, 0.5, gen(3)).view(t, h, w)
    first = tube_mask(1, 1, h, w, 0.5, gen(3)).view(h, w)
    for k in range(t):
        want = torch.stack([torch.roll(first[i], int(k * shifts[i])) for i in range(h)])
        assert torch.equal(m[k], want), k
    half = np.zeros((t - 1, h, w, 2))
    half[..., 1] = 0.5  # down
    m = motion_masks(half, 0.5, gen(3)).view(t, h, w)
    for k in range(t):
        assert torch.equal(m[k], torch.roll(first, int(np.floor(0.5 * k + 0.5)), dims=0)), k


def test_masks_track_the_decoded_square(videos):
    """End to end: masked tokens on the square at tubelet 0 move with it. Tokens of 8 x 4 px make its motion
    over a 4-frame span exactly (1, 1) token, so a masked interior token (i, j) is at (i+k, j+k) at tubelet k
    (the square's whole interior moves together: no collisions there)."""
    crop = Crop(top=16, left=16, height=64, width=64)
    field = motion_field(decode_motion(videos["b_frames"], INDICES), INDICES, crop, grid=(4, 16, 8),
                         tubelet_size=2)  # fmt: skip
    m = motion_masks(field, 0.5, gen(0)).view(4, 16, 8)
    interior = [(i, j) for i, j in inside_square(0, crop, 16, 8, margin=12) if m[0, i, j]]
    assert len(interior) >= 5
    for k in range(1, 4):
        assert all(m[k, i + k, j + k] for i, j in interior), k
        assert not all(m[0, i + k, j + k] for i, j in interior)  # a tube mask would not follow


def test_bad_field_shape():
    with pytest.raises(ValueError, match="motion field"):
        motion_masks(np.zeros((3, 4, 4)), 0.5, gen(0))
    with pytest.raises(ValueError, match="motion field"):
        motion_masks(np.full((3, 4, 4, 2), np.nan), 0.5, gen(0))
    with pytest.raises(ValueError, match="mask ratio"):
        motion_masks(np.zeros((3, 4, 4, 2)), 1.0, gen(0))
