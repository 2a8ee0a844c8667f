"""RandAugment in the training loader (``loader.rand_augment``) against the official VideoMAE finetuning loader's
video RandAugment, re-stated here from its code (``rand_augment.py``: op choice, probability, magnitude and sign
drawn once per clip from Python's and NumPy's global generators, the op then applied to every frame) with timm's
op functions; its place (whole frames, before the crop), reproducibility, and the config."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.config import load_config
from pipeline.ingest.encode import decode_all
from pipeline.loader.clips import make_clips, sample_frame_indices, sample_generator
from pipeline.loader.decode import iter_shard
from pipeline.loader.loader import LoaderConfig, make_loader
from pipeline.loader.masking import ClipSpec
from pipeline.loader.rand_augment import rand_augment, rand_augment_frames
from pipeline.loader.transforms import crop_clip, sample_crop
from tests.pipeline.shardset_helpers import make_shard_set

OFFICIAL = "rand-m7-n4-mstd0.5-inc1"  # run_class_finetuning.py --aa default
SPEC = ClipSpec(num_frames=4, input_size=32, patch_size=16, tubelet_size=2, mask_ratio=0.5, mask_type="tube")


def official_video_rand_augment(
    frames: list[Image.Image], ra, py_seed: int, np_seed: int
) -> list[Image.Image]:
    """The official ``RandAugment.__call__`` on a frame list with its video ``AugmentOp.__call__`` (one draw per
    op for the whole list), the global generators seeded as ``rand_augment_frames`` seeds them."""
    random.seed(py_seed)
    np.random.seed(np_seed)
    ops = np.random.choice(ra.ops, ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights)
    for op in ops:
        if op.prob < 1.0 and random.random() > op.prob:
            continue
        magnitude = op.magnitude
        if op.magnitude_std and op.magnitude_std > 0:
            magnitude = random.gauss(magnitude, op.magnitude_std)
        magnitude = min(10.0, max(0, magnitude))
        args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
        frames = [op.aug_fn(img, *args, **op.kwargs) for img in frames]
    return frames


def _seeds(g: torch.Generator) -> tuple[int, int]:
    return int(torch.randint(1 << 62, (), generator=g)), int(torch.randint(1 << 32, (), generator=g))


def test_the_transform_is_built_as_the_official_loader_builds_it():
    ra = rand_augment(OFFICIAL, 224)
    names = [op.name for op in ra.ops]
    assert ra.num_layers == 4 and ra.choice_weights is None and len(names) == 15
    assert {"PosterizeIncreasing", "SolarizeIncreasing"} <= set(names) and "Posterize" not in names  # inc1
    for op in ra.ops:
        assert (op.prob, op.magnitude, op.magnitude_std) == (0.5, 7, 0.5)
        assert op.kwargs["resample"] == Image.BICUBIC  # train_interpolation
        assert op.kwargs["fillcolor"] == (128, 128, 128)  # create_random_augment sets no img_mean
        assert op.hparams["translate_const"] == 100  # int(224 * 0.45)


@pytest.mark.parametrize("seed", range(6))
def test_clip_equals_the_official_video_rand_augment(seed):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)
    frames[:, 10:30, 20:40] //= 3  # some structure for the geometric ops to move
    ra = rand_augment(OFFICIAL, 32)
    ours = rand_augment_frames(frames, ra, sample_generator(seed, 0, "vid", "ra0"))
    py_seed, np_seed = _seeds(sample_generator(seed, 0, "vid", "ra0"))
    want = official_video_rand_augment([Image.fromarray(f) for f in frames], ra, py_seed, np_seed)
    assert ours.dtype == np.uint8 and ours.shape == frames.shape
    np.testing.assert_array_equal(ours, np.stack([np.asarray(f) for f in want]))


def test_most_clips_change_and_each_clip_draws_its_own_ops():
    frames = np.random.default_rng(0).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    ra = rand_augment(OFFICIAL, 24)
    outs = [rand_augment_frames(frames, ra, sample_generator(0, 0, "vid", f"ra{r}")) for r in range(12)]
    changed = [not np.array_equal(o, frames) for o in outs]
    assert sum(changed) >= 9  # P(no op applied) = 0.5 ** 4 per clip
    assert len({o.tobytes() for o in outs}) >= 9


def test_global_generators_are_restored_and_do_not_matter():
    frames = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    ra = rand_augment(OFFICIAL, 16)
    random.seed(5)
    np.random.seed(5)
    before = random.getstate(), np.random.get_state()
    a = rand_augment_frames(frames, ra, sample_generator(3, 1, "k", "ra0"))
    assert random.getstate() == before[0]
    after = np.random.get_state()
    assert all(np.array_equal(x, y) for x, y in zip(after, before[1], strict=True))
    random.seed(99)
    np.random.seed(99)
    b = rand_augment_frames(frames, ra, sample_generator(3, 1, "k", "ra0"))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", ["v0", "original", "augmix-m5", "rand-m7-x4", "rand-m7-n4-q1", 7])
def test_config_rejects_what_is_not_a_rand_augment_string(bad):
    with pytest.raises(ValueError, match="rand_augment"):
        LoaderConfig(manifest="m.json", rand_augment=bad)


def test_pretraining_configs_carry_it_too(monkeypatch):
    """A loader setting, so a pretraining run honours it as well (make_clips applies it to any task's clips);
    the shipped pretraining recipes leave it off, as the official pretraining does."""
    from pathlib import Path

    from jobs.train.config import PretrainConfig

    root = Path(__file__).resolve().parents[3]
    monkeypatch.chdir(root)
    for path in sorted((root / "configs" / "pretrain").glob("*.yaml")):
        assert load_config(PretrainConfig, str(path)).loader.rand_augment is None, path.name
    cfg = load_config(PretrainConfig, "configs/pretrain/debug.yaml", [f"loader.rand_augment={OFFICIAL}"])
    assert cfg.loader.rand_augment == OFFICIAL


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("ra_set"))
    make_shard_set(url, 6, 2, pattern="moving", width=80, height=48, frames=20)
    mp4 = {
        s["__key__"]: s["mp4"] for i in range(2) for s in iter_shard(f"{url}/shard-{i:06d}.tar", want=bool)
    }
    return url, mp4


def _cfg(url: str, **kw) -> LoaderConfig:
    return LoaderConfig(manifest=url, sampling_rate=2, shuffle_buffer=4, num_sample=2, batch_size=4, **kw)


def test_make_clips_augments_whole_frames_then_crops(shards):
    """Clip ``r`` = RandAugment (stream ``ra{r}``) of the sampled whole frames, then the crop and flip of
    stream ``aug{r}``; frames, crops and masks are the draws of a run without it."""
    url, mp4 = shards
    cfg, plain = _cfg(url, rand_augment=OFFICIAL), _cfg(url)
    ra = rand_augment(OFFICIAL, SPEC.input_size)
    differs = 0
    for key, data in mp4.items():
        video, mask = make_clips(data, key, SPEC, cfg, seed=0, epoch=1)
        video0, mask0 = make_clips(data, key, SPEC, plain, seed=0, epoch=1)
        assert torch.equal(mask, mask0)
        all_frames = decode_all(data)
        idx = sample_frame_indices(len(all_frames), SPEC.num_frames, 2, sample_generator(0, 1, key, "time"))
        frames = all_frames[idx]
        for r in range(2):
            crop = sample_crop(frames.shape[2], frames.shape[1], input_size=SPEC.input_size, scales=cfg.scales,
                               flip=cfg.flip, generator=sample_generator(0, 1, key, f"aug{r}"))  # fmt: skip
            augmented = rand_augment_frames(frames, ra, sample_generator(0, 1, key, f"ra{r}"))
            want = crop_clip(
                torch.from_numpy(augmented).permute(0, 3, 1, 2), crop, input_size=SPEC.input_size
            )
            assert torch.equal(video[r], want), (key, r)
            plain_clip = crop_clip(
                torch.from_numpy(frames).permute(0, 3, 1, 2), crop, input_size=SPEC.input_size
            )
            assert torch.equal(video0[r], plain_clip), (key, r)
            differs += not torch.equal(video[r], video0[r])
    assert differs >= 8  # of 12 clips


def _clips(loader) -> dict[str, torch.Tensor]:
    """key -> its ``num_sample`` clips (the worker count changes the order of the epoch, not a sample's clips)."""
    out = {}
    for b in loader:
        for i, key in enumerate(b["key"][::2]):
            out[key] = b["video"][2 * i : 2 * i + 2].clone()
    return out


def test_loader_runs_are_identical_whatever_the_workers(shards):
    url, _ = shards
    random.seed(1)
    np.random.seed(1)
    a = _clips(make_loader(_cfg(url, rand_augment=OFFICIAL, num_workers=0), SPEC))
    random.seed(2)
    np.random.seed(2)
    b = _clips(make_loader(_cfg(url, rand_augment=OFFICIAL, num_workers=2), SPEC))
    plain = _clips(make_loader(_cfg(url, num_workers=0), SPEC))
    assert sorted(a) == sorted(b) == sorted(plain) and len(a) == 6
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(not torch.equal(a[k], plain[k]) for k in a) >= 4
