"""Decode workers kept for the run: the same batches as fresh per-epoch workers across epochs, abandoned passes
and a mid-epoch resume; the same processes every epoch; a cache that outlives the epoch in each worker; errors
that name their sample; no process left behind; worker count and pinning resolved from the machine."""

import gc
import os
import warnings

import pytest
import torch

from pipeline.loader import stream as stream_mod
from pipeline.loader.config import LoaderConfig, available_cpus, resolve_num_workers, resolve_pin_memory
from pipeline.loader.loader import make_loader
from pipeline.loader.masking import ClipSpec
from pipeline.loader.plan import plan_epoch
from tests.pipeline.shardset_helpers import make_shard_set

SPEC = ClipSpec(num_frames=4, input_size=32, patch_size=16, tubelet_size=2, mask_ratio=0.5, mask_type="tube")


def cfg_for(url, **kw) -> LoaderConfig:
    return LoaderConfig(manifest=url, **{"sampling_rate": 2, "shuffle_buffer": 4, "batch_size": 2,
                                         "num_workers": 2, "pin_memory": False, **kw})  # fmt: skip


def batches(loader, limit=None):
    """[(keys, video, mask)] of the batches yielded (all, or the first ``limit``)."""
    out = []
    for b in loader:
        out.append((tuple(b["key"]), b["video"], b["mask"]))
        if limit is not None and len(out) == limit:
            break
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
        for x, y in zip(a, b, strict=True)
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def shardset(tmp_path_factory):
    """18 videos in 4 shards."""
    url = str(tmp_path_factory.mktemp("set"))
    make_shard_set(url, 18, 4, frames=lambda i: 10 + i % 5)
    return url


def test_persistent_workers_and_resumed_cursor_give_a_fresh_runs_batches(shardset):
    """One loader over 3 epochs (one pass abandoned mid-epoch and continued, one state saved mid-epoch and
    resumed in a new loader) yields, step by step, the batches of fresh per-epoch loaders; its worker
    processes stay the same two."""
    cfg = cfg_for(shardset)
    fresh = []
    for epoch in range(3):
        ref = make_loader(cfg, SPEC, rank=1, world_size=2)
        ref.set_epoch(epoch)
        fresh.append(batches(ref))
        ref.close()
    assert [len(e) for e in fresh] == [4, 4, 4]  # 18 // (2 ranks x 2 videos)

    loader = make_loader(cfg, SPEC, rank=1, world_size=2)
    got = [batches(loader)]
    head = batches(loader, limit=1)  # abandoned after 1 batch: its workers had prefetched more
    assert loader.epoch == 1 and loader.cursor == 1
    state = loader.state_dict()
    got.append(head + batches(loader))  # the same workers continue at the cursor
    assert loader.epoch == 2
    got.append(batches(loader))
    for epoch in range(3):
        assert same(got[epoch], fresh[epoch]), epoch
    pids = loader.worker_pids
    assert len(pids) == 2 and os.getpid() not in pids
    assert set(p.pid for p in loader.workers.loader._iterator._workers) == pids  # noqa: C401

    resumed = make_loader(cfg, SPEC, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert same(head + batches(resumed) + batches(resumed), fresh[1] + fresh[2])
    assert len(resumed.worker_pids) == 2 and not resumed.worker_pids & pids
    loader.close()
    resumed.close()


def test_worker_pids_are_the_same_across_epochs(shardset):
    loader = make_loader(cfg_for(shardset, batch_size=1), SPEC)
    per_epoch = []
    for _ in range(3):
        loader.worker_pids = set()
        batches(loader)
        per_epoch.append(loader.worker_pids)
    assert len(per_epoch[0]) == 2 and per_epoch[0] == per_epoch[1] == per_epoch[2]
    loader.close()


def test_close_and_garbage_collection_stop_the_workers(shardset):
    loader = make_loader(cfg_for(shardset), SPEC)
    batches(loader, limit=2)
    pids = set(loader.worker_pids)
    assert len(pids) == 2 and all(alive(p) for p in pids)
    loader.close()
    assert not any(alive(p) for p in pids)
    loader.worker_pids = set()
    assert len(batches(loader)) > 0 and loader.worker_pids and not loader.worker_pids & pids  # new ones

    other = make_loader(cfg_for(shardset), SPEC)
    it = iter(other)
    next(it)  # a pass left suspended, as a crashed training loop would
    pids = set(other.worker_pids)
    del it, other, loader
    gc.collect()
    assert pids and not any(alive(p) for p in pids)


def test_cache_with_workers_decodes_each_sample_once_per_worker(tmp_path):
    """Each worker keeps its cache across epochs: a worker decodes a sample only the first time it plays it
    (predicted from the plans); with one shard every worker plays the same block each epoch, so epoch 2
    decodes nothing. Batches equal the uncached loader's, bit for bit."""
    one = str(tmp_path / "one")
    make_shard_set(one, 8, 1, frames=lambda i: 10 + i % 5)
    cached = make_loader(cfg_for(one, cache=True), SPEC)
    plain = make_loader(cfg_for(one), SPEC)
    assert cached.cache is None  # the caches live in the workers
    for epoch in range(2):
        assert same(batches(cached), batches(plain)), epoch
        reads = (cached.reads["streamed"], cached.reads["cache_hits"])
        assert reads == ((8, 0) if epoch == 0 else (0, 8)), epoch
        cached.reads.clear()
    cached.close()

    many = str(tmp_path / "many")
    make_shard_set(many, 12, 4, frames=lambda i: 10 + i % 5)
    cfg = cfg_for(many, cache=True)
    cached = make_loader(cfg, SPEC)
    plain = make_loader(cfg_for(many), SPEC)
    seen: list[set[str]] = [set(), set()]  # keys each worker process has decoded
    for epoch in range(4):
        _, plans = plan_epoch(cached.shards, seed=0, epoch=epoch, history=[], layout=cached.layout)
        new = sum(len(set(p.order) - seen[w]) for w, p in enumerate(plans[0]))  # cursor 0: process w plays w
        for w, p in enumerate(plans[0]):
            seen[w] |= set(p.order)
        assert same(batches(cached), batches(plain)), epoch
        assert (cached.reads["streamed"], cached.reads["cache_hits"]) == (new, 12 - new), epoch
        cached.reads.clear()
    assert new < 12
    cached.close()


def test_a_worker_error_names_its_sample_and_shard(shardset, monkeypatch):
    real = stream_mod.collate_clips

    def broken(group, *a, **kw):
        if any(k == "vid00005" for k, _ in group):
            raise OSError("disk on fire")
        return real(group, *a, **kw)

    monkeypatch.setattr(stream_mod, "collate_clips", broken)  # before the workers fork: they inherit it
    for workers in (0, 2):
        loader = make_loader(cfg_for(shardset, num_workers=workers, batch_size=1, mp_context="fork"), SPEC)
        with pytest.raises(RuntimeError, match=r"vid00005.*shard-000001\.tar.*OSError: disk on fire"):
            batches(loader)
        loader.close()


def test_spawned_workers_get_their_tasks(shardset):
    cfg = cfg_for(shardset, num_workers=1, mp_context="spawn")
    loader = make_loader(cfg, SPEC)
    first, second = batches(loader), batches(loader)
    ref = make_loader(cfg_for(shardset, num_workers=0), SPEC)
    assert same(first, batches(ref)) and same(second, batches(ref))
    loader.close()


def test_num_workers_auto_comes_from_the_cpus_this_process_may_use(shardset, monkeypatch):
    assert resolve_num_workers(3) == 3
    assert resolve_num_workers("auto", cpus=16, local_ranks=2) == 7  # 8 CPUs per rank, 1 for training
    assert resolve_num_workers("auto", cpus=2, local_ranks=2) == 0  # decode in the training process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_num_workers("auto", cpus=16) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert available_cpus() == len(os.sched_getaffinity(0))
    loader = make_loader(cfg_for(shardset, num_workers="auto"), SPEC)
    assert loader.cfg.num_workers == max(0, len(os.sched_getaffinity(0)) - 1)
    assert loader.layout.num_workers == max(1, loader.cfg.num_workers)
    for bad in ("many", -1, True):
        with pytest.raises(ValueError, match="num_workers"):
            cfg_for(shardset, num_workers=bad)


def test_pin_memory_reaches_the_dataloader(shardset):
    assert resolve_pin_memory("auto") == torch.cuda.is_available()
    assert resolve_pin_memory(True) and not resolve_pin_memory(False)
    with pytest.raises(ValueError, match="pin_memory"):
        cfg_for(shardset, pin_memory="yes")
    assert make_loader(cfg_for(shardset, pin_memory="auto"), SPEC).cfg.pin_memory == torch.cuda.is_available()
    for workers in (0, 1):
        loader = make_loader(cfg_for(shardset, num_workers=workers, pin_memory=True), SPEC)
        assert loader.workers.pin_memory is True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # without CUDA, DataLoader warns that it cannot pin
            batch = next(iter(loader))
        if workers:
            assert loader.workers.loader.pin_memory is True
        if torch.cuda.is_available():  # pinning itself needs CUDA
            assert batch["video"].is_pinned() and batch["mask"].is_pinned()
        loader.close()
