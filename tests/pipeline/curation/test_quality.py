import itertools

import numpy as np
import pytest

from pipeline.curation.quality import (
    QualityConfig,
    dct_matrix,
    duplicate_groups,
    hamming,
    laplacian_variance,
    luma,
    phash,
    quality_score,
    read_frames,
    sample_indices,
    video_metrics,
)
from pipeline.curation.synth import render_clip
from pipeline.ingest.encode import encode_mp4
from pipeline.ingest.scenes import raw_cuts
from pipeline.loader.decode import BadSample

CFG = QualityConfig()


def _metrics(frames: np.ndarray, cfg: QualityConfig = CFG, **enc) -> dict:
    """Encode, decode a few frames the way curation does, and measure."""
    sampled, total, _ = read_frames(encode_mp4(frames, fps=15, **enc), cfg.num_frames)
    assert total == len(frames)
    return video_metrics(sampled, cfg)


def _clip(motion="right", domain="textures", seed=0, defect=None, size=(64, 64), frames=16):
    return render_clip(
        domain, motion, size=size, frames=frames, rng=np.random.default_rng(seed), defect=defect,
        defect_rng=np.random.default_rng(1000 + seed),
    )  # fmt: skip


def test_sample_indices():
    assert sample_indices(16, 8).tolist() == [0, 2, 4, 6, 9, 11, 13, 15]
    assert sample_indices(3, 8).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="total"):
        sample_indices(0, 8)


def test_laplacian_variance_matches_numpy_slicing():
    y = np.random.default_rng(0).uniform(0, 255, (3, 20, 30)).astype(np.float32)
    lap = y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4 * y[:, 1:-1, 1:-1]
    ref = lap.reshape(3, -1).var(axis=1)
    np.testing.assert_allclose(laplacian_variance(y), ref, rtol=1e-4)


def test_luma_bt601():
    px = np.array([[[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]]], np.uint8)
    np.testing.assert_allclose(
        luma(px)[0, 0], [76.245, 149.685, 29.07, 0.299 * 10 + 0.587 * 20 + 0.114 * 30], rtol=1e-5
    )


def _dct_fft(x: np.ndarray, axis: int) -> np.ndarray:
    """Orthonormal DCT-II along ``axis`` via an FFT of the even extension (Makhoul):
    X_k = sqrt(1 / 2n) c_k Re(exp(-i pi k / 2n) FFT([x, x reversed])_k), c_0 = sqrt(1/2), else 1."""
    x = np.moveaxis(x, axis, -1)
    n = x.shape[-1]
    k = np.arange(n)
    ext = np.fft.fft(np.concatenate([x, x[..., ::-1]], -1), axis=-1)[..., :n]
    out = (
        np.real(np.exp(-1j * np.pi * k / (2 * n)) * ext)
        * np.sqrt(1 / (2 * n))
        * np.where(k == 0, np.sqrt(0.5), 1)
    )
    return np.moveaxis(out, -1, axis)


def test_dct_matrix_is_dct2_via_fft():
    x = np.random.default_rng(1).normal(size=(32, 5))
    c = dct_matrix(32)
    np.testing.assert_allclose(c @ x, _dct_fft(x, 0), atol=1e-10)
    np.testing.assert_allclose(c @ c.T, np.eye(32), atol=1e-10)


def test_phash_matches_independent_computation():
    y = np.random.default_rng(2).uniform(0, 255, (2, 64, 96)).astype(np.float32)
    got = phash(y)
    for frame, h in zip(y, got, strict=True):
        small = frame.reshape(32, 2, 32, 3).mean(axis=(1, 3))  # area resize 64x96 -> 32x32
        low = _dct_fft(_dct_fft(small.astype(np.float64), 0), 1)[:8, :8].ravel()
        bits = "".join("1" if v > np.median(low) else "0" for v in low)
        assert int(h) == int(bits, 2)


def test_hamming_counts_bits():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2**63, 50, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 50, dtype=np.uint64)
    b = rng.integers(0, 2**63, 50, dtype=np.uint64)
    assert hamming(a, b).tolist() == [bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b, strict=True)]


def test_quality_score_formula():
    cfg = QualityConfig(motion_ref=2.0, sharpness_ref=50.0, dark_exposure=0.2)
    got = quality_score(motion=1.0, sharpness=150.0, exposure=0.1, black_fraction=0.25, cfg=cfg)
    assert got == pytest.approx(0.75 * 0.5 * (150 / 200) * 0.5)
    assert quality_score(motion=9, sharpness=50, exposure=0.95, black_fraction=0, cfg=cfg) == pytest.approx(
        0.5 * 0.25
    )
    assert quality_score(motion=float("nan"), sharpness=1, exposure=0.5, black_fraction=0, cfg=cfg) == 0.0


def test_static_video_has_no_motion_and_moving_one_does():
    moving = _metrics(_clip("right"))
    static = _metrics(_clip("right", defect="static"))
    assert static["motion"] < 0.7 and static["moving_fraction"] == 0 and static["is_static"]
    assert moving["motion"] > 1.0 and moving["moving_fraction"] > 0.01 and not moving["is_static"]
    y = luma(read_frames(encode_mp4(_clip("right"), fps=15), 8)[0]).astype(np.float64)
    pairs = [np.abs(y[i + 1] - y[i]) for i in range(len(y) - 1)]  # no black frames here
    assert moving["motion"] == pytest.approx(np.mean([p.mean() for p in pairs]), rel=1e-5)
    assert moving["moving_fraction"] == pytest.approx(np.mean([(p > 12).mean() for p in pairs]), rel=1e-5)


def test_blur_lowers_sharpness():
    for domain in ("textures", "shapes"):
        sharp = _metrics(_clip(domain=domain, seed=4))["sharpness"]
        blurred = _metrics(_clip(domain=domain, seed=4, defect="blur"))["sharpness"]
        assert blurred < 0.5 * sharp, domain


def test_black_frames_and_low_exposure_are_flagged():
    frames = _clip("up", seed=6)
    frames[4:12] = 0  # sampled frames 0,2,4,6,9,11,13,15 -> 4 of 8 black
    m = _metrics(frames)
    assert m["black_fraction"] == pytest.approx(0.5) and m["has_black"]
    assert m["quality_score"] < _metrics(_clip("up", seed=6))["quality_score"]
    assert m["phash"][1] is None  # the middle hashed frame is black: no hash
    dark = _metrics(_clip("up", seed=6, defect="dark"))
    assert dark["is_dark"] and not dark["has_black"] and 0.04 < dark["exposure"] < 0.16
    clean = _metrics(_clip("up", seed=6))
    assert not clean["is_dark"] and not clean["has_black"] and clean["black_fraction"] == 0


def test_duplicates_share_a_group_and_different_videos_do_not():
    videos = [
        _clip(m, d, seed=s)
        for s, (m, d) in enumerate(
            itertools.product(("left", "zoom_in"), ("textures", "shapes", "gradients"))
        )
    ]
    src = videos[1]
    videos.append(src)  # exact duplicate, re-encoded at another quality
    videos.append(_clip("left", "shapes", seed=1, defect="near_duplicate"))
    hashes, valid = [], []
    for i, v in enumerate(videos):
        ph = _metrics(v, crf=19 if i == 6 else 23)["phash"]
        hashes.append([np.int64(h if h is not None else 0).view(np.uint64) for h in ph])
        valid.append([h is not None for h in ph])
    groups = duplicate_groups(np.array(hashes, np.uint64), np.array(valid), CFG.hash_distance)
    assert groups[6] == groups[7] == groups[1] == 1
    assert len(set(groups[:6].tolist())) == 6


def _brute_force_groups(hashes, valid, k):
    n = len(hashes)

    def close(i: int, j: int) -> bool:
        common = np.flatnonzero(valid[i] & valid[j])
        bits = [bin(int(hashes[i, p]) ^ int(hashes[j, p])).count("1") for p in common]
        return len(common) > 0 and np.mean(bits) <= k

    adj = [[j for j in range(n) if j != i and close(i, j)] for i in range(n)]
    out = [-1] * n
    for i in range(n):
        if out[i] < 0:
            stack, comp = [i], []
            while stack:
                x = stack.pop()
                if out[x] < 0:
                    out[x] = i
                    comp.append(x)
                    stack += adj[x]
    return np.array(out)


@pytest.mark.parametrize("k", [0, 3, 6])
def test_duplicate_groups_match_brute_force(k):
    rng = np.random.default_rng(k)
    base = rng.integers(0, 2**64, (25, 3), dtype=np.uint64, endpoint=False)
    rows = [base]
    for _ in range(3):  # planted near-copies: flip up to k+2 random bits per frame
        copy = base[rng.integers(0, 25, 15)].copy()
        for r, p in itertools.product(range(15), range(3)):
            for bit in rng.choice(64, rng.integers(0, k + 3), replace=False):
                copy[r, p] ^= np.uint64(1) << np.uint64(bit)
        rows.append(copy)
    hashes = np.concatenate(rows)
    valid = rng.random(hashes.shape) > 0.15
    got = duplicate_groups(hashes, valid, k)
    np.testing.assert_array_equal(got, _brute_force_groups(hashes, valid, k))
    np.testing.assert_array_equal(duplicate_groups(hashes, valid, k, block_elems=1), got)  # one row per block
    assert len(set(got.tolist())) < len(hashes)  # the planted copies did form groups


def test_read_frames_falls_back_to_pyav_and_rejects_garbage():
    frames = _clip("right", size=(48, 32), frames=10)  # decord 0.6 cannot decode 48 px wide frames
    sampled, total, backend = read_frames(encode_mp4(frames, fps=15), 4)
    assert backend == "pyav" and total == 10 and sampled.shape == (4, 32, 48, 3)
    assert read_frames(encode_mp4(_clip(size=(64, 32), frames=10), fps=15), 4)[2] == "pyav"  # backend auto
    with pytest.raises(BadSample, match="undecodable"):
        read_frames(b"not a video at all", 4)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_frames=1), "num_frames"),
        (dict(hash_frames=9), "hash_frames"),
        (dict(hash_distance=64), "hash_distance"),
        (dict(dark_exposure=0.6), "dark_exposure"),
        (dict(sharpness_ref=0), "sharpness_ref"),
        (dict(static_fraction=0), "static_fraction"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        QualityConfig(**kw)
    with pytest.raises(ValueError, match="max_distance"):
        duplicate_groups(np.zeros((2, 1), np.uint64), np.ones((2, 1), bool), 70)


def test_cut_score_is_the_mean_hsv_change_of_pyscenedetect():
    """``has_cut`` is PySceneDetect's content score (mean |dH|, |dS|, |dV| between two frames, OpenCV's
    8-bit HSV) at or above ``cut_threshold``: checked against that formula computed here with OpenCV."""
    import cv2

    rng = np.random.default_rng(0)
    checked = 0
    for i in range(40):
        a, b = _clip(seed=i, size=(32, 32))[0], _clip("up", "shapes", seed=100 + i, size=(32, 32))[0]
        if i % 2:
            b = np.clip(a.astype(int) + rng.integers(-40, 40, 3), 0, 255).astype(np.uint8)  # small changes
        hsv = [
            cv2.cvtColor(np.ascontiguousarray(f[..., ::-1]), cv2.COLOR_BGR2HSV).astype(np.int32)
            for f in (a, b)
        ]
        score = np.abs(hsv[1] - hsv[0]).mean(axis=(0, 1)).mean()
        if abs(score - CFG.cut_threshold) < 0.5:
            continue  # too close to call across rounding
        bgr = np.ascontiguousarray(np.stack([a, b])[..., ::-1])
        assert (raw_cuts(bgr, 1.0, threshold=CFG.cut_threshold) == [1]) == (score >= CFG.cut_threshold), i
        checked += 1
    assert checked >= 30


def test_hard_cuts_are_flagged_and_clean_clips_and_black_runs_are_not():
    """On 32 px synthetic clips through the codec, as curation sees them (8 of 16 frames): the measured
    recall and false-positive rate that ``QualityConfig.cut_threshold`` documents."""
    found, false = [], []
    for i in range(30):
        domain, motion = (
            ("shapes", "textures", "gradients")[i % 3],
            ("left", "up", "rotate_cw", "zoom_in")[i % 4],
        )
        second = (("textures", "gradients", "shapes")[i % 3], ("zoom_in", "left", "up", "rotate_cw")[i % 4])
        kw = dict(size=(32, 32), frames=16, rng=np.random.default_rng(i))
        cut = render_clip(domain, motion, defect="cut", defect_rng=np.random.default_rng(500 + i),
                          cut=(4 + i % 8, *second), **kw)  # fmt: skip
        kw["rng"] = np.random.default_rng(i)
        found.append(_metrics(cut, crf=12)["has_cut"])
        false.append(_metrics(render_clip(domain, motion, **kw), crf=12)["has_cut"])
    assert np.mean(found) >= 0.9 and np.mean(false) <= 0.05, (np.mean(found), np.mean(false))
    faded = _clip("up", "shapes", seed=6)  # a still camera: the same scene on both sides of a black run
    faded[6:10] = 0
    m = _metrics(faded)
    assert m["has_black"] and not m["has_cut"]  # black frames are left out of the comparison ...
    sampled, _, _ = read_frames(encode_mp4(faded, fps=15), CFG.num_frames)
    assert raw_cuts(
        np.ascontiguousarray(sampled[..., ::-1]), 1.0, threshold=CFG.cut_threshold
    )  # ... or it fires
