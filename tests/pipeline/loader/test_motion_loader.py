"""``model.mask_type: motion`` end to end on the pretraining path (config -> loader -> VideoMAE): masks drawn
on the data side along each clip's motion vectors, with the tube count, reproducible across loaders, worker
counts and a resume, equal to a direct computation from the bytes, and equal to the tube masks where nothing
moves."""

import dataclasses

import numpy as np
import pytest
import torch

from jobs.config import load_config
from jobs.train.config import PretrainConfig
from jobs.train.pretrain import PretrainTask
from pipeline.loader.clips import make_clips, sample_frame_indices, sample_generator
from pipeline.loader.decode import iter_shard
from pipeline.loader.loader import make_loader
from pipeline.loader.masking import clip_masks, num_masked
from pipeline.loader.motion import decode_motion, motion_field, motion_masks
from pipeline.loader.transforms import sample_crop
from tests.pipeline.shardset_helpers import make_shard_set, take

DEBUG = (
    "configs/pretrain/debug.yaml"  # tiny: 4 x 32^2 clips, patch 8, tubelet 2 -> a 2 x 4 x 4 grid, ratio 0.75
)
# 2 videos x 2 clips per batch: clips of one decode get their own crops, so their own motion masks
LOADER = ["loader.batch_size=4", "loader.num_sample=2", "loader.sampling_rate=2"]


def _task(url: str, mask_type: str, *overrides: str) -> PretrainTask:
    over = [f"loader.manifest={url}", f"model.overrides.mask_type={mask_type}", *LOADER, *overrides]
    return PretrainTask(load_config(PretrainConfig, DEBUG, over))


def _epoch(task: PretrainTask, *, limit=None, loader=None) -> list[dict]:
    loader = loader or make_loader(task.cfg.loader, task.clip_spec())
    return take(loader, limit)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["key"] == y["key"] and torch.equal(x["video"], y["video"]) and torch.equal(x["mask"], y["mask"])
        for x, y in zip(a, b, strict=True)
    )


def _by_clip(batches: list[dict]) -> dict[tuple[str, int], tuple[bytes, bytes]]:
    """(key, clip r) -> (video bytes, mask bytes): what each clip is, whatever the batch order."""
    out = {}
    for b in batches:
        for i, key in enumerate(b["key"]):
            r = sum(1 for k in out if k[0] == key)
            out[key, r] = (b["video"][i].numpy().tobytes(), b["mask"][i].numpy().tobytes())
    return out


@pytest.fixture(scope="module")
def moving(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("moving"))
    make_shard_set(url, 8, 2, pattern="moving", width=64, height=48, frames=16)
    return url


@pytest.fixture(scope="module")
def static(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("static"))  # flat frames: nothing moves
    make_shard_set(url, 4, 1, pattern="index", width=64, height=48, frames=16)
    return url


def test_config_loads_and_masks_follow_the_bytes(moving):
    """The config's motion spec reaches the loader; every clip masks the tube count, and its mask is the one
    computed directly from the video's bytes with the clip's frames, crop and ``mask{r}`` stream."""
    task = _task(moving, "motion")
    spec, model_cfg = task.clip_spec(), task.model_cfg
    assert (model_cfg.mask_type, spec.mask_type) == ("motion", "motion")
    t, h, w = spec.token_grid
    assert spec.num_masked == model_cfg.num_masked == num_masked(t, h, w, spec.mask_ratio, "tube") == 24
    mp4 = {
        s["__key__"]: s["mp4"] for i in range(2) for s in iter_shard(f"{moving}/shard-{i:06d}.tar", want=bool)
    }
    cfg, batches = task.cfg.loader, _epoch(task)
    assert len(batches) == 4
    for batch in batches:
        mask = batch["mask"]
        assert mask.dtype == torch.bool and mask.shape == (4, t * h * w) and batch["valid"].all()
        assert (mask.view(4, t, h * w).sum(2) == round(spec.mask_ratio * h * w)).all()  # every time slice
        for b, key in enumerate(batch["key"]):
            r = b % cfg.num_sample
            g_time = sample_generator(0, 0, key, "time")
            indices = sample_frame_indices(16, spec.num_frames, cfg.sampling_rate, g_time)  # 16-frame videos
            crop = sample_crop(64, 48, input_size=spec.input_size, scales=cfg.scales, flip=cfg.flip,
                               generator=sample_generator(0, 0, key, f"aug{r}"))  # fmt: skip
            field = motion_field(
                decode_motion(mp4[key], indices), indices, crop, grid=(t, h, w), tubelet_size=2
            )
            want = motion_masks(field, spec.mask_ratio, sample_generator(0, 0, key, f"mask{r}"))
            assert torch.equal(mask[b], want), (key, r)


def test_moving_masks_differ_from_tube_masks_static_ones_equal_them(moving, static):
    """Same clips either way; on moving content the masks move away from the tube for some clips, on flat
    frames (no motion vectors move anything) they are exactly the tube masks."""
    for url, moves in ((moving, True), (static, False)):
        motion, tube = _epoch(_task(url, "motion")), _epoch(_task(url, "tube"))
        assert [b["key"] for b in motion] == [b["key"] for b in tube]
        assert all(torch.equal(a["video"], b["video"]) for a, b in zip(motion, tube, strict=True))
        differ = torch.cat([(a["mask"] != b["mask"]).any(1) for a, b in zip(motion, tube, strict=True)])
        if moves:
            assert differ.any() and int(differ.sum()) >= len(differ) // 2, differ.tolist()
        else:
            assert not differ.any()


def test_deterministic_across_loaders_and_workers_and_resume(moving):
    task = _task(moving, "motion")
    want = _epoch(task)
    assert _same(_epoch(task), want)
    # two workers plan the epoch in another order (the layout changes), each clip is the same
    two = _task(moving, "motion", "loader.num_workers=2")
    loader = make_loader(two.cfg.loader, two.clip_spec())
    assert _by_clip(_epoch(two, loader=loader)) == _by_clip(want) and len(loader.worker_pids) == 2
    loader.close()
    first = make_loader(task.cfg.loader, task.clip_spec())
    head = _epoch(task, limit=2, loader=first)
    state = first.state_dict()
    resumed = make_loader(task.cfg.loader, task.clip_spec())
    resumed.load_state_dict(state)
    assert _same(head + _epoch(task, loader=resumed), want)
    other_epoch = make_loader(task.cfg.loader, task.clip_spec())
    other_epoch.set_epoch(1)
    assert not _same(_epoch(task, loader=other_epoch), want)


def test_motion_batch_trains(moving):
    """A motion batch through PretrainTask.forward: the decoder predicts the tube count of tokens per clip."""
    task = _task(moving, "motion")
    batch = _epoch(task, limit=1)[0]
    torch.manual_seed(0)
    model = task.build_model(resuming=False)
    shapes = []
    model.register_forward_hook(lambda m, args, out: shapes.append(tuple(out[1].shape)))
    loss, _ = task.forward(model, batch, torch.device("cpu"))
    loss.backward()
    assert shapes == [(4, 24, task.model_cfg.patch_dim)] and torch.isfinite(loss)


def test_rand_augment_changes_the_clips_not_the_motion_masks(moving):
    """RandAugment (before the crop) moves content the motion field does not see: the masks are those of the
    unaugmented video, the clips are augmented."""
    task = _task(moving, "motion")
    spec, cfg = task.clip_spec(), task.cfg.loader
    mp4 = next(s["mp4"] for s in iter_shard(f"{moving}/shard-000000.tar", want=bool))
    plain = make_clips(mp4, "k", spec, cfg, seed=0, epoch=0)
    ra = make_clips(
        mp4, "k", spec, dataclasses.replace(cfg, rand_augment="rand-m7-n4-mstd0.5-inc1"), seed=0, epoch=0
    )
    assert torch.equal(ra[1], plain[1]) and not torch.equal(ra[0], plain[0])
    assert not torch.equal(
        plain[1], make_clips(mp4, "k", _task(moving, "tube").clip_spec(), cfg, seed=0, epoch=0)[1]
    )


def test_cache_is_refused_and_padding_gets_the_motionless_mask(moving):
    """Decoded frames carry no motion vectors: ``make_clips`` refuses them (``loader.cache``); a clip with no
    video (a padded slot) gets the motionless case, the tube mask of its generator."""
    task = _task(moving, "motion")
    frames = np.zeros((16, 48, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="mask_type motion .* loader.cache"):
        make_clips(frames, "vid00000", task.clip_spec(), task.cfg.loader, seed=0, epoch=0)
    # and the loader refuses the combination up front (else every sample would be skipped)
    with pytest.raises(ValueError, match="loader.cache keeps decoded frames"):
        make_loader(dataclasses.replace(task.cfg.loader, cache=True), task.clip_spec())
    tube = _task(moving, "tube").clip_spec()
    gens = lambda: [sample_generator(0, 0, "pad/x/0", str(j)) for j in range(2)]  # noqa: E731
    assert torch.equal(clip_masks(task.clip_spec(), gens()), clip_masks(tube, gens()))
