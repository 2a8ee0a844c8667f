"""The training loader end to end on tiny shard sets: exactly-once coverage over ranks x workers, equal batch
counts, determinism, exact and elastic resume, subsets, bad samples, config, S3, and its uint8 clips against
the float path they replace."""

from collections import Counter

import numpy as np
import pytest
import torch

from jobs.config import load_config
from pipeline import storage
from pipeline.ingest.encode import decode_all
from pipeline.ingest.manifest import write_subset
from pipeline.loader.clips import sample_frame_indices, sample_generator
from pipeline.loader.decode import iter_shard
from pipeline.loader.loader import (
    Layout,
    LoaderConfig,
    ShardKeys,
    buffer_shuffle,
    consumed_keys,
    epoch_sequence,
    make_loader,
    plan_epoch,
)
from pipeline.loader.masking import ClipSpec
from pipeline.loader.transforms import IMAGENET_MEAN, IMAGENET_STD, model_input, sample_crop
from tests.pipeline.shardset_helpers import make_shard_set, run_epoch

SMALL = dict(sampling_rate=2, shuffle_buffer=4)
SPEC = ClipSpec(num_frames=4, input_size=32, patch_size=16, tubelet_size=2, mask_ratio=0.5, mask_type="tube")


def small_cfg(url, **kw) -> LoaderConfig:
    return LoaderConfig(manifest=url, **{**SMALL, "batch_size": 2, "num_workers": 2, **kw})


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """22 videos in 5 shards of 9, 1, 6, 2, 4 videos."""
    url = str(tmp_path_factory.mktemp("uneven"))
    make_shard_set(url, 22, 5, sizes=[9, 1, 6, 2, 4], frames=lambda i: 12 + i % 7)
    return url


# ---- planning (metadata only, no decoding) ----


@pytest.mark.parametrize("n,world,workers,vpb,remainder", [(22, 2, 2, 2, "drop"), (37, 3, 4, 3, "drop"),
                                                             (10, 4, 3, 1, "drop"), (37, 3, 2, 2, "pad")])  # fmt: skip
def test_plan_exactly_once_and_equal(n, world, workers, vpb, remainder):
    shards = [
        ShardKeys(f"s{i}", tuple(f"k{i}-{j}" for j in range(c)))
        for i, c in enumerate([n // 3, 1, n - n // 3 - 1])
    ]
    lay = Layout(
        world_size=world, num_workers=workers, videos_per_batch=vpb, shuffle_buffer=5, remainder=remainder
    )
    nb, plans = plan_epoch(shards, seed=1, epoch=0, history=[], layout=lay)
    seq = [k for _, k in epoch_sequence(shards, 1, 0)]
    per_rank = [sum(len(p.order) for p in workers_) for workers_ in plans]
    assert per_rank == [nb * vpb] * world  # equal samples per rank
    keys = [k for workers_ in plans for p in workers_ for k in p.order]
    if remainder == "drop":
        assert nb == n // (world * vpb) and sorted(keys) == sorted(seq[: nb * world * vpb])
        assert len(set(keys)) == len(keys)
    else:
        assert nb == -(-n // (world * vpb)) and set(keys) == set(seq)
    for workers_ in plans:  # worker w owns rank-batches w, w+K, ...: counts ceil((nb - w) / K)
        assert [len(p.order) // vpb for p in workers_] == [
            max(0, -(-(nb - w) // workers)) for w in range(workers)
        ]


def test_buffer_shuffle_is_a_bounded_permutation():
    items = list(range(200))
    out = buffer_shuffle(items, 10, np.random.default_rng(0))
    assert sorted(out) == items and out != items
    assert all(out[i] <= i + 9 for i in range(200))  # output i is among the first i + 10 items read
    assert out == buffer_shuffle(items, 10, np.random.default_rng(0))
    assert buffer_shuffle(items, 1, None) == items


def test_elastic_replan_covers_the_rest_exactly_once():
    shards = [ShardKeys(f"s{i}", tuple(f"k{i}-{j}" for j in range(c))) for i, c in enumerate([7, 13, 5, 11])]
    old = Layout(world_size=4, num_workers=2, videos_per_batch=2, shuffle_buffer=3, remainder="drop")
    nb, plans = plan_epoch(shards, seed=5, epoch=3, history=[], layout=old)
    done = consumed_keys(plans, 2, 2)
    assert len(done) == 2 * 4 * 2
    new = Layout(world_size=3, num_workers=3, videos_per_batch=1, shuffle_buffer=8, remainder="drop")
    nb2, plans2 = plan_epoch(shards, seed=5, epoch=3, history=[(old, 2)], layout=new)
    rest = [k for w in plans2 for p in w for k in p.order]
    assert not done & set(rest) and len(set(rest)) == len(rest)
    assert len(done) + len(rest) >= 36 - 3 + 1 and nb2 == (36 - 16) // 3  # at most W*V - 1 left out


# ---- real iteration ----


def test_exactly_once_over_2_ranks_x_2_workers_with_uneven_shards(uneven):
    cfg = small_cfg(uneven)
    per_rank = [run_epoch(make_loader(cfg, SPEC, rank=r, world_size=2)) for r in range(2)]
    assert [len(b) for b in per_rank] == [5, 5]  # 22 // (2 ranks * 2) = 5 batches each, 2 dropped
    keys = [k for batches in per_rank for b in batches for k in b[0]]
    assert len(keys) == 20 and len(set(keys)) == 20
    assert set(keys) <= {f"vid{i:05d}" for i in range(22)}
    for batches in per_rank:
        for k, video, mask, label, valid in batches:
            assert video.shape == (2, 3, 4, 32, 32) and mask.shape == (2, 8) and valid.all()
            assert mask.sum(1).tolist() == [4, 4]  # tube: round(0.5 * 4) per frame x 2 frames
            assert label.tolist() == [int(x[3:]) % 5 for x in k]


def test_deterministic_and_epoch_dependent(uneven):
    cfg = small_cfg(uneven, num_workers=1)
    a = run_epoch(make_loader(cfg, SPEC, rank=1, world_size=2))
    b = run_epoch(make_loader(cfg, SPEC, rank=1, world_size=2))
    assert [x[0] for x in a] == [x[0] for x in b]
    assert all(torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(a, b, strict=True))
    loader = make_loader(cfg, SPEC, rank=1, world_size=2)
    loader.set_epoch(1)
    c = run_epoch(loader)
    assert [x[0] for x in c] != [x[0] for x in a]
    assert loader.epoch == 2 and len(loader) == 5  # finishing an epoch moves to the next
    other_seed = run_epoch(make_loader(small_cfg(uneven, num_workers=1, seed=9), SPEC, rank=1, world_size=2))
    assert [x[0] for x in other_seed] != [x[0] for x in a]


@pytest.mark.parametrize("cut", [1, 3])
def test_resume_mid_epoch_equals_uninterrupted(uneven, cut):
    cfg = small_cfg(uneven, batch_size=4, num_sample=2, num_workers=2)  # 2 videos x 2 clips per batch
    full = make_loader(cfg, SPEC, rank=0, world_size=2)
    full.set_epoch(4)
    want = run_epoch(full)
    first = make_loader(cfg, SPEC, rank=0, world_size=2)
    first.set_epoch(4)
    head = run_epoch(first, limit=cut)
    state = first.state_dict()
    assert state["epoch"] == 4 and state["cursor"] == cut
    resumed = make_loader(cfg, SPEC, rank=0, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # what a trainer does: a no-op that keeps the cursor
    tail = run_epoch(resumed)
    got = head + tail
    assert len(got) == len(want) == 5
    for x, y in zip(got, want, strict=True):
        assert x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
    assert resumed.stats["batches"] == 5 and resumed.epoch == 5


def test_elastic_resume_world_2_to_3(uneven):
    """Save after 2 batches on 2 ranks, resume on 3 ranks with 1 worker: the rest of the epoch, each sample
    once, same clip per key as the uninterrupted run would have made, equal batches on the new ranks."""
    cfg = small_cfg(uneven, batch_size=1, num_workers=2)
    old = [make_loader(cfg, SPEC, rank=r, world_size=2) for r in range(2)]
    seen = [b for loader in old for b in run_epoch(loader, limit=2)]
    state = old[0].state_dict()
    new_cfg = small_cfg(uneven, batch_size=1, num_workers=1)
    new = [make_loader(new_cfg, SPEC, rank=r, world_size=3) for r in range(3)]
    for loader in new:
        loader.load_state_dict(state)
    rest = [run_epoch(loader) for loader in new]
    assert len({len(r) for r in rest}) == 1  # equal batches per rank
    keys = [b[0][0] for b in seen] + [b[0][0] for r in rest for b in r]
    assert max(Counter(keys).values()) == 1 and len(keys) >= 22 - 3 + 1
    ref = {b[0][0]: b[1] for r in range(2) for b in run_epoch(make_loader(cfg, SPEC, rank=r, world_size=2))}
    for b in [b for r in rest for b in r]:
        if b[0][0] in ref:
            assert torch.equal(b[1], ref[b[0][0]])


def test_decoded_cache_gives_the_uncached_clips_and_reads_each_shard_once(tmp_path, monkeypatch):
    """loader.cache: every epoch's batches (keys, clips, masks, labels, stand-ins for a bad sample) equal the
    uncached loader's, bit for bit, across epochs and a mid-epoch resume; the shards are read in the first
    epoch only; a missing-from-shard sample is not cached (not a verdict on the data)."""
    import pipeline.loader.decode as decode

    url = str(tmp_path / "set")
    make_shard_set(url, 10, 3, frames=lambda i: 10 + i % 5, bad={3: "garbage"})
    plain = make_loader(small_cfg(url, num_workers=0, num_sample=2, batch_size=2), SPEC, rank=0, world_size=1)
    cached = make_loader(small_cfg(url, num_workers=0, num_sample=2, batch_size=2, cache=True), SPEC)
    opened = []
    real = decode.iter_shard
    monkeypatch.setattr(decode, "iter_shard", lambda u, **kw: (opened.append(u), real(u, **kw))[1])
    for epoch in range(3):
        want, got = run_epoch(plain), run_epoch(cached)
        assert len(got) == len(want) == 10
        for x, y in zip(got, want, strict=True):
            assert x[0] == y[0] and all(torch.equal(a, b) for a, b in zip(x[1:], y[1:], strict=True)), epoch
        if epoch == 0:
            reads_first = len(opened)  # both loaders read every shard once
            assert reads_first == 2 * 3
    assert cached.stats["skipped"] == plain.stats["skipped"] == 3  # the garbage sample, once per epoch
    assert len(opened) == reads_first + 2 * 3  # afterwards only the plain loader reads shards
    assert len(cached.cache) == 10 and cached.cache.nbytes > 0
    # resume mid-epoch into a fresh cached loader: the same batches as the uninterrupted plain loader
    state = cached.state_dict()
    head = run_epoch(cached, limit=4)
    resumed = make_loader(small_cfg(url, num_workers=0, num_sample=2, batch_size=2, cache=True), SPEC)
    resumed.load_state_dict({**state, "cursor": 4})
    tail = run_epoch(resumed)
    want = run_epoch(plain)
    for x, y in zip(head + tail, want, strict=True):
        assert x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
    assert small_cfg(url, cache=True, num_workers=2).cache  # allowed since workers persist (test_stream.py)
    tiny = make_loader(small_cfg(url, num_workers=0, cache=True), SPEC)
    tiny.cache.max_bytes = 40_000  # room for a few decoded videos only: the rest is decoded each epoch
    ref = make_loader(small_cfg(url, num_workers=0), SPEC)
    for _ in range(2):
        for x, y in zip(run_epoch(tiny), run_epoch(ref), strict=True):
            assert x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
    assert 0 < len(tiny.cache) < 10 and tiny.cache.full


@pytest.mark.parametrize("workers", [0, 1])
def test_pad_remainder_repeats_head_samples(tmp_path, workers):
    url = str(tmp_path / "seven")
    make_shard_set(url, 7, 2)
    loader = make_loader(small_cfg(url, remainder="pad", num_workers=workers), SPEC, rank=0, world_size=1)
    keys = [k for b in run_epoch(loader) for k in b[0]]
    assert len(keys) == 8 and set(keys) == {f"vid{i:05d}" for i in range(7)}
    assert sorted(Counter(keys).values()) == [1] * 6 + [2]


def test_subset_streams_only_selected_keys_and_skips_empty_shards(tmp_path):
    url = str(tmp_path / "set")
    make_shard_set(url, 12, 3, keys_in_manifest=False)  # keys come from index.parquet
    chosen = ["vid00001", "vid00002", "vid00005", "vid00006", "vid00007", "vid00003"]  # shards 0 and 1 only
    write_subset(str(tmp_path / "sub.parquet"), chosen, source_manifest=url, rule={"t": 1}, inputs_hash="h")
    (tmp_path / "set" / "shard-000002.tar").unlink()  # never opened: it has no selected key
    cfg = small_cfg(url, subset=str(tmp_path / "sub.parquet"))
    loader = make_loader(cfg, SPEC, rank=0, world_size=1)
    keys = [k for b in run_epoch(loader) for k in b[0]]
    assert sorted(keys) == sorted(chosen) and loader.stats["skipped"] == 0
    write_subset(str(tmp_path / "bad.parquet"), ["nope"], source_manifest=url, rule={}, inputs_hash="h")
    with pytest.raises(ValueError, match="not in"):
        make_loader(small_cfg(url, subset=str(tmp_path / "bad.parquet")), SPEC)


def test_bad_samples_skipped_counted_across_workers(tmp_path, caplog):
    url = str(tmp_path / "bad")
    bad = {1: "garbage", 4: "no_mp4", 6: "absent", 9: "bad_label"}
    make_shard_set(url, 12, 3, bad=bad, frames=lambda i: 3 if i == 10 else 12)
    cfg = small_cfg(url, batch_size=3, num_workers=2, min_frames=4, shuffle_buffer=0)
    loader = make_loader(cfg, SPEC, rank=0, world_size=1)
    with caplog.at_level("WARNING"):
        batches = run_epoch(loader)
    assert len(batches) == 4
    flagged = {k for b in batches for k, v in zip(b[0], b[4].tolist(), strict=True) if not v}
    assert flagged == {"vid00001", "vid00004", "vid00006", "vid00009", "vid00010"}
    assert loader.stats["skipped"] == 5 and loader.stats["clips"] == 7 and loader.stats["videos"] == 7
    assert loader.stats["skipped_by_reason"]["too short"] == 1
    assert "skipped sample" in caplog.text
    for b in batches:  # padded slots copy a good clip of the same batch: shapes never change
        assert b[1].shape == (3, 3, 4, 32, 32) and torch.isfinite(b[1]).all()
        video, label, valid = b[1], b[3], b[4]
        for i in torch.nonzero(~valid).flatten().tolist():  # ... with its label (finetuning trains on it,
            twins = [
                j for j in range(len(valid)) if valid[j] and torch.equal(video[j], video[i])
            ]  # weight 0)
            assert any(label[j] == label[i] for j in twins), (b[0], i)


def test_state_dict_mismatches_raise(uneven, tmp_path):
    loader = make_loader(small_cfg(uneven), SPEC, rank=0, world_size=2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        make_loader(small_cfg(uneven, seed=3), SPEC, rank=0, world_size=2).load_state_dict(state)
    other = str(tmp_path / "other")
    make_shard_set(other, 8, 2)
    with pytest.raises(ValueError, match="different samples"):
        make_loader(small_cfg(other), SPEC, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({**state, "version": 99})


def test_config_yaml_overrides_and_validation(uneven, tmp_path):
    (tmp_path / "l.yaml").write_text(f"manifest: {uneven}\nbatch_size: 4\nnum_sample: 2\nscales: [1, 0.5]\n")
    cfg = load_config(LoaderConfig, str(tmp_path / "l.yaml"), ["sampling_rate=2", "storage.retries=1"])
    assert cfg.videos_per_batch == 2 and cfg.scales == (1.0, 0.5) and cfg.storage.retries == 1
    for bad, field in [({"batch_size": 3, "num_sample": 2}, "num_sample"), ({"sampling_rate": 0}, "sampling_rate"),
                       ({"num_workers": -1}, "num_workers"), ({"remainder": "wrap"}, "remainder"),
                       ({"scales": (1.5,)}, "scales"), ({"min_frames": 0}, "min_frames")]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            LoaderConfig(manifest=uneven, **bad)
    with pytest.raises(ValueError, match="manifest"):
        LoaderConfig()
    with pytest.raises(TypeError, match="num_frames"):  # clip geometry is the model's, not the loader's
        LoaderConfig(manifest=uneven, num_frames=8)
    with pytest.raises(ValueError, match="spec must be a ClipSpec"):
        make_loader(small_cfg(uneven), None, rank=0, world_size=1)
    with pytest.raises(ValueError, match="no full batch"):
        make_loader(small_cfg(uneven, batch_size=8), SPEC, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        make_loader(small_cfg(uneven), SPEC, rank=2, world_size=2)


@pytest.mark.s3
def test_reads_from_s3(s3_bucket):
    url = storage.join(s3_bucket, "sets/tiny")
    make_shard_set(url, 6, 2)
    loader = make_loader(small_cfg(url, num_workers=1), SPEC, rank=0, world_size=1)
    keys = [k for b in run_epoch(loader) for k in b[0]]
    assert sorted(keys) == [f"vid{i:05d}" for i in range(6)] and loader.stats["skipped"] == 0


def _float_path(mp4: bytes, key: str, r: int, cfg: LoaderConfig, spec: ClipSpec, epoch: int) -> torch.Tensor:
    """Clip ``r`` of ``key`` the way the loader made it before it shipped uint8, from independent pieces: a full
    PyAV decode, the sampler's frames, torchvision's crop/resize/flip, ``to_dtype(scale)``, ``normalize``."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    frames = decode_all(mp4)
    g = sample_generator(cfg.seed, epoch, key, "time")
    x = torch.from_numpy(frames[sample_frame_indices(len(frames), spec.num_frames, cfg.sampling_rate, g)])
    x = x.permute(0, 3, 1, 2)
    c = sample_crop(x.shape[-1], x.shape[-2], input_size=spec.input_size, scales=cfg.scales, flip=cfg.flip,
                    generator=sample_generator(cfg.seed, epoch, key, f"aug{r}"))  # fmt: skip
    x = tvF.resized_crop(x, c.top, c.left, c.height, c.width, [spec.input_size] * 2,
                         interpolation=InterpolationMode.BILINEAR, antialias=True)  # fmt: skip
    x = tvF.horizontal_flip(x) if c.flip else x
    x = tvF.normalize(tvF.to_dtype(x, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    return x.permute(1, 0, 2, 3)


def test_uint8_clips_normalised_on_the_device_equal_the_float_path(tmp_path):
    url = str(tmp_path / "set")
    make_shard_set(url, 6, 2, pattern="moving", width=80, height=48, frames=20)
    mp4 = {
        s["__key__"]: s["mp4"] for i in range(2) for s in iter_shard(f"{url}/shard-{i:06d}.tar", want=bool)
    }
    cfg = small_cfg(url, num_workers=1, num_sample=2, batch_size=4)
    loader = make_loader(cfg, SPEC)
    seen = 0
    for epoch in range(2):
        for batch in loader:
            video = batch["video"]
            assert video.dtype == torch.uint8 and video.shape == (4, 3, 4, 32, 32)
            x = model_input(video, "cpu")  # what PretrainTask.forward / FinetuneTask.forward do on the device
            assert x.dtype == torch.float32 and x.is_contiguous()
            for b, key in enumerate(batch["key"]):
                ref = _float_path(mp4[key], key, b % 2, cfg, SPEC, epoch)
                assert (x[b] - ref).abs().max() <= 1e-6, (key, b)
                seen += 1
    assert seen == 2 * 3 * 4  # 2 epochs x (6 videos // 2 per batch) batches of 4 clips


@pytest.mark.parametrize("task_name", ["pretrain", "finetune"])
def test_tasks_train_on_uint8_batches_as_on_float_ones(tmp_path, task_name):
    """The tasks' loss on a loader batch (uint8, normalised in ``forward``) is the loss of the same batch in
    float32 (the float path): what the golden loss (tests/model/test_golden.py) pins stays what training sees."""
    from jobs.config import load_config

    url = str(tmp_path / "set")
    make_shard_set(url, 4, 1, pattern="moving", width=64, height=48, frames=12, num_classes=4)
    if task_name == "pretrain":
        from jobs.train.config import PretrainConfig as Config
        from jobs.train.pretrain import PretrainTask as Task

        over = []
    else:
        from jobs.train.config import FinetuneConfig as Config
        from jobs.train.finetune import FinetuneTask as Task

        over = ["augment.mixup_alpha=0", "augment.cutmix_alpha=0"]
    cfg = load_config(Config, f"configs/{task_name}/debug.yaml", [f"loader.manifest={url}", *over])
    task = Task(cfg)
    batch = next(iter(make_loader(cfg.loader, task.clip_spec())))
    assert batch["video"].dtype == torch.uint8
    torch.manual_seed(0)
    model = task.build_model(resuming=True).eval()
    floats = {**batch, "video": model_input(batch["video"], "cpu")}
    torch.manual_seed(1)
    loss_u8, _ = task.forward(model, batch, torch.device("cpu"))
    torch.manual_seed(1)
    loss_f32, _ = task.forward(model, floats, torch.device("cpu"))
    assert loss_u8.item() == pytest.approx(loss_f32.item(), rel=1e-6)
