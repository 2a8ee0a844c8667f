import dataclasses
import glob
import io

import numpy as np
import pandas as pd
import pytest

from jobs.config import load_config
from pipeline import storage
from pipeline.curation.synth import (
    DEFECTS,
    DOMAINS,
    MOTIONS,
    DefectFractions,
    SynthConfig,
    plan,
    render_clip,
    synthesize,
)
from pipeline.ingest.encode import decode_all

SMALL = dict(
    domains=("textures", "shapes"), classes=("left", "right", "zoom_in"), videos_per_class=2,
    sizes=((64, 64),), frames=(8,), fps=(15.0,),
    defects=DefectFractions(**{d: 1 / 12 for d in DEFECTS}),
)  # fmt: skip


def _mask(frames: np.ndarray) -> np.ndarray:
    """Sprite mask [T, H, W] of a ``shapes`` clip: pixels away from the flat background colour (the
    per-channel median over the clip, since the sprite covers well under half the pixels)."""
    bg = np.median(frames.reshape(-1, 3), axis=0)
    return np.abs(frames.astype(np.float32) - bg).sum(-1) > 40


def _centroids(mask: np.ndarray) -> np.ndarray:
    """[T, 2] (x, y) pixel-centre centroids of a mask [T, H, W]."""
    ys, xs = np.mgrid[0 : mask.shape[1], 0 : mask.shape[2]] + 0.5
    area = mask.sum((1, 2))
    return np.stack([(mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area], 1)


def _rotated_overlap(m0: np.ndarray, m1: np.ndarray, angle: float) -> float:
    """IoU of m1 with m0 turned by ``angle`` (rad, clockwise on screen) about m0's centroid (nearest px)."""
    (cx, cy), h, w = _centroids(m0[None])[0], *m0.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    c, s = np.cos(angle), np.sin(angle)
    # inverse map: a pixel of the turned mask comes from the point turned back by -angle
    sx = c * (xs - cx) + s * (ys - cy) + cx
    sy = -s * (xs - cx) + c * (ys - cy) + cy
    xi, yi = np.floor(sx).astype(int), np.floor(sy).astype(int)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    turned = np.zeros_like(m0)
    turned[inside] = m0[yi[inside], xi[inside]]
    return (turned & m1).sum() / max((turned | m1).sum(), 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_motion_classes_move_the_way_their_label_says(seed):
    rng = lambda: np.random.default_rng(seed)  # noqa: E731 - same content draws for every class
    for motion, axis, sign in (("right", 0, 1), ("left", 0, -1), ("down", 1, 1), ("up", 1, -1)):
        m = _mask(render_clip("shapes", motion, size=(96, 64), frames=12, rng=rng()))
        c = _centroids(m)[:, axis]
        assert sign * (c[-1] - c[0]) > 0.2 * (96 if axis == 0 else 64), motion
        assert (sign * np.diff(c) > -0.5).all(), motion  # monotone, up to edge antialiasing
        # played backwards it is the opposite class
        assert -sign * (_centroids(m[::-1])[-1, axis] - _centroids(m[::-1])[0, axis]) > 0, motion
    area_in = _mask(render_clip("shapes", "zoom_in", size=(64, 64), frames=12, rng=rng())).sum((1, 2))
    area_out = _mask(render_clip("shapes", "zoom_out", size=(64, 64), frames=12, rng=rng())).sum((1, 2))
    assert area_in[-1] > 2.5 * area_in[0] and (np.diff(area_in) >= 0).all()
    assert area_out[0] > 2.5 * area_out[-1] and (np.diff(area_out) <= 0).all()
    step = np.deg2rad(4)
    for motion, sign in (("rotate_cw", 1), ("rotate_ccw", -1)):
        m = _mask(render_clip("shapes", motion, size=(64, 64), frames=24, rng=rng()))
        votes = [
            np.sign(_rotated_overlap(m[t], m[t + 1], step) - _rotated_overlap(m[t], m[t + 1], -step))
            for t in range(len(m) - 1)
        ]
        assert sign * np.sum(votes) >= 0.8 * len(votes), (motion, votes)


def test_render_shapes_dtype_and_domains_differ():
    for seed in range(4):
        busy, edges = {}, {}
        for d in DOMAINS:
            clip = render_clip(d, "right", size=(96, 64), frames=5, rng=np.random.default_rng(seed))
            assert clip.dtype == np.uint8 and clip.shape == (5, 64, 96, 3)
            y = clip.astype(np.float32).mean(-1)
            busy[d] = (np.abs(np.diff(y, axis=2)) > 0.5).mean()  # pixels that differ from their neighbour
            lap = y[:, 1:-1, :-2] + y[:, 1:-1, 2:] + y[:, :-2, 1:-1] + y[:, 2:, 1:-1] - 4 * y[:, 1:-1, 1:-1]
            edges[d] = lap.var()
        # the domains' image statistics differ by design (DOMAIN_STYLES): textures vary everywhere (drifting
        # gratings), gradients in soft ramps, shapes are flat but for hard sprite edges
        assert busy["textures"] > 3 * busy["gradients"] > 3 * busy["shapes"], (seed, busy)
        assert edges["shapes"] > 5 * edges["gradients"], (seed, edges)


def test_defects_change_what_they_should():
    def clip(defect, seed=5):
        return render_clip(
            "textures", "right", size=(64, 64), frames=16, rng=np.random.default_rng(seed),
            defect=defect, defect_rng=np.random.default_rng(99),
        ).astype(np.float32)  # fmt: skip

    clean = clip(None)
    assert np.array_equal(clip("duplicate"), clean)  # same content; the bytes differ only by re-encoding
    near = np.abs(clip("near_duplicate") - clean).mean()
    assert 0.5 < near < 8
    static = clip("static")
    assert (static == static[0]).all()
    lap = lambda f: np.abs(np.diff(f, 2, axis=2)).mean()  # noqa: E731
    assert lap(clip("blur")) < 0.5 * lap(clean)
    black = clip("black").reshape(16, -1).max(1) == 0
    assert 0.4 <= black.mean() <= 1.0 and np.ptp(np.flatnonzero(black)) == black.sum() - 1  # one run
    luma = clip("dark") @ np.array([0.299, 0.587, 0.114])
    assert 13 <= luma.mean() <= 37
    with pytest.raises(ValueError, match="defect must be one of"):
        clip("melted")


def test_a_cut_clip_is_its_clean_clip_then_an_independent_second_scene():
    kw = dict(size=(32, 32), frames=16)
    clean = render_clip("shapes", "left", rng=np.random.default_rng(3), **kw)
    second = render_clip("textures", "zoom_in", rng=np.random.default_rng(77), **kw)
    cut = render_clip("shapes", "left", rng=np.random.default_rng(3), defect="cut",
                      defect_rng=np.random.default_rng(77), cut=(6, "textures", "zoom_in"), **kw)  # fmt: skip
    assert np.array_equal(cut[:6], clean[:6]) and np.array_equal(cut[6:], second[6:])
    jump = np.abs(np.diff(cut.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    assert jump.argmax() == 5 and jump[5] > 5 * np.delete(jump, 5).max()  # the one hard change
    for bad in (None, (0, "shapes", "up"), (16, "shapes", "up")):
        with pytest.raises(ValueError, match="a cut clip needs cut="):
            render_clip("shapes", "left", rng=np.random.default_rng(3), defect="cut", cut=bad, **kw)


def test_plan_places_cuts_in_the_middle_half_with_the_configs_domains_and_classes():
    base = SynthConfig(
        **{**SMALL, "videos_per_class": 20, "defects": DefectFractions(**{d: 0 for d in DEFECTS})}
    )
    with_cuts = dataclasses.replace(base, defects=DefectFractions(**{**{d: 0 for d in DEFECTS}, "cut": 0.5}))
    specs = plan(with_cuts)
    cuts = [s for s in specs if s.defect == "cut"]
    assert len(cuts) == len(specs) // 2 and all(not s.cut for s in specs if s.defect != "cut")
    for s in cuts:
        k, domain, motion = s.cut
        assert s.frames // 4 <= k < (3 * s.frames) // 4 and domain in base.domains and motion in base.classes
    assert len({s.cut for s in cuts}) > 1
    assert [dataclasses.replace(s, defect="", cut=()) for s in specs] == plan(
        base
    )  # cuts change nothing else


def test_plan_counts_and_duplicate_sources():
    cfg = SynthConfig(**SMALL)
    specs = plan(cfg)
    assert len(specs) == 2 * 3 * 2 and [s.index for s in specs] == list(range(12))
    counts = pd.Series([s.defect for s in specs]).value_counts().to_dict()
    assert counts == {
        "": 5,
        "cut": 1,
        "blur": 1,
        "static": 1,
        "duplicate": 1,
        "near_duplicate": 1,
        "black": 1,
        "dark": 1,
    }
    by_path = {s.path: s for s in specs}
    for s in specs:
        assert s.label == cfg.classes.index(s.motion)
        if s.defect in ("duplicate", "near_duplicate"):
            src = by_path[s.duplicate_of]
            assert src.defect == "" and src.content_seed == s.content_seed
            assert (src.domain, src.motion, src.width, src.height, src.frames) == (
                s.domain, s.motion, s.width, s.height, s.frames,
            )  # fmt: skip
        else:
            assert s.duplicate_of == ""


def _files(root: str) -> dict[str, bytes]:
    return {
        p[len(root) :]: open(p, "rb").read() for p in sorted(glob.glob(f"{root}/**/*.mp4", recursive=True))
    }


@pytest.mark.slow
def test_synthesize_is_deterministic_across_workers_and_writes_layout(tmp_path):
    a, b, c = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")
    table = synthesize(SynthConfig(**SMALL, workers=1), a)
    synthesize(SynthConfig(**SMALL, workers=2), b)
    synthesize(SynthConfig(**SMALL, workers=1, seed=1), c)
    fa, fb = _files(a), _files(b)
    assert len(fa) == 12 and fa == fb  # same seed: byte-identical, whatever the process count
    assert open(f"{a}/labels.csv", "rb").read() == open(f"{b}/labels.csv", "rb").read()
    assert fa != _files(c)
    labels = pd.read_csv(f"{a}/labels.csv", keep_default_na=False)
    assert list(labels.columns) == ["path", "label", "domain", "defect", "class", "duplicate_of"]
    for row in labels.to_dict("records"):
        assert row["path"] == f"{row['domain']}/{row['class']}/{row['path'].rsplit('/', 1)[1]}"
        assert row["label"] == SMALL["classes"].index(row["class"])
        frames = decode_all(fa["/" + row["path"]])
        assert frames.shape == (8, 64, 64, 3)
    dup = labels[labels.defect == "duplicate"].iloc[0]
    assert fa["/" + dup.path] != fa["/" + dup.duplicate_of]  # re-encoded: other bytes, same content
    near = np.abs(decode_all(fa["/" + dup.path]).astype(int) - decode_all(fa["/" + dup.duplicate_of])).mean()
    assert near < 3
    summary = pd.read_json(io.StringIO(open(f"{a}/synth.json").read()), typ="series")
    assert summary["num_videos"] == 12 and summary["counts"]["defect"]["clean"] == 5
    assert table.num_rows == 12 and set(table.column("path").to_pylist()) == set(labels.path)


@pytest.mark.s3
def test_synthesize_to_s3(s3_bucket):
    cfg = SynthConfig(domains=("gradients",), classes=("up", "down"), videos_per_class=1, sizes=((64, 64),),
                      frames=(6,), defects=DefectFractions(blur=0, static=0, duplicate=0, near_duplicate=0,
                      black=0, dark=0), workers=1)  # fmt: skip
    table = synthesize(cfg, f"{s3_bucket}/synth")
    for path in table.column("path").to_pylist():
        assert decode_all(storage.read_bytes(f"{s3_bucket}/synth/{path}")).shape == (6, 64, 64, 3)
    assert storage.exists(f"{s3_bucket}/synth/synth.json")


@pytest.mark.parametrize("path", sorted(glob.glob("configs/synth/*.yaml")))
def test_synth_yamls_load_and_plan(path):
    cfg = load_config(SynthConfig, path)
    specs = plan(cfg)
    assert len(specs) == len(cfg.domains) * len(cfg.classes) * cfg.videos_per_class
    assert set(cfg.classes) <= set(MOTIONS) and {s.defect for s in specs} <= {"", *cfg.defects.counts(1)}


def test_synth_yamls_exist():
    assert {p.rsplit("/", 1)[1] for p in glob.glob("configs/synth/*.yaml")} >= {"default.yaml", "debug.yaml"}


@pytest.mark.parametrize(
    "override, match",
    [
        ("domains=[moon]", "domains must be distinct names"),
        ("sizes=[[63, 64]]", "even and >= 32"),
        ("frames=[2]", "frames must be"),
        ("defects.blur=0.9", "sum to"),
        ("defects.static=-0.1", r"defects.static must be a fraction"),
        ("videos_per_class=0", "videos_per_class"),
    ],
)
def test_config_validation(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(SynthConfig, "configs/synth/debug.yaml", [override])


def test_too_many_duplicates_without_sources():
    fr = DefectFractions(blur=0, static=0, duplicate=1.0, near_duplicate=0, black=0, dark=0)
    with pytest.raises(ValueError, match="no clean clip to duplicate"):
        plan(SynthConfig(domains=("shapes",), classes=("up",), videos_per_class=2, defects=fr))
