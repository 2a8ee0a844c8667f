"""The trainer's data stream and step path: the read-ahead prefetcher checkpoints what the steps consumed (not what
it read), and a training step reads nothing back from the device except at logged steps.

CPU tests cannot see whether the side-stream copy overlaps compute (nor a real device sync): they check the
bookkeeping and count the host reads (``.item()``, ``float()``, ``.cpu()``, ``.tolist()``) that would be syncs
on a GPU. The ``gpu`` test checks the prefetched batch is on the device and equal to the host batch.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from jobs.config import load_config
from jobs.train import prefetch
from jobs.train.config import PretrainConfig
from jobs.train.prefetch import Prefetcher
from pipeline.loader.loader import make_loader
from tests.pipeline.shardset_helpers import make_shard_set

DEBUG = "configs/pretrain/debug.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shards"))
    make_shard_set(root, 8, 2, frames=12, width=48, height=32)
    return root


def _cfg(shards: str, tmp_path, *over: str) -> PretrainConfig:
    return load_config(PretrainConfig, DEBUG, [
        f"loader.manifest={shards}", f"storage_path={tmp_path / 'runs'}", "name=r", "scaling.num_workers=1",
        "metrics.image_every=0", "loader.batch_size=2", *over,
    ])  # fmt: skip


def _loader(cfg: PretrainConfig):
    return make_loader(cfg.loader, cfg.model.build().clip_spec(masking=True))


def test_a_checkpoint_resumes_at_the_first_batch_no_step_took(shards, tmp_path):
    """4 batches per epoch; after every k of 0..9 handed batches (read-ahead on, epoch boundaries at 4 and 8),
    a fresh loader restored from the prefetcher's state yields what the uninterrupted stream handed next, and
    the restored counters count the handed batches only."""
    cfg = _cfg(shards, tmp_path)
    whole = Prefetcher(_loader(cfg), torch.device("cpu"))
    ref = [whole.next() for _ in range(11)]
    assert [e for e, _ in ref] == [0] * 4 + [1] * 4 + [2] * 3
    for k in range(10):
        first = Prefetcher(_loader(cfg), torch.device("cpu"))
        for _ in range(k):
            first.next()
        state = first.state_dict()
        assert state["stats"]["batches"] == k
        assert first.loader.cursor == (k % 4 + 1 if k else 0)  # it read one batch ahead
        again = Prefetcher(_loader(cfg), torch.device("cpu"))
        again.load_state_dict(state)
        for want_epoch, want in ref[k : k + 2]:
            epoch, got = again.next()
            assert (epoch, got["key"]) == (want_epoch, want["key"]), k
            assert torch.equal(got["mask"], want["mask"]) and torch.equal(got["video"], want["video"])


def test_without_read_ahead_the_loader_state_is_the_loaders_own(shards, tmp_path):
    cfg = _cfg(shards, tmp_path)
    stream = Prefetcher(_loader(cfg), torch.device("cpu"))
    stream.next()
    stream.next(ahead=False)  # a run's last batch: nothing read beyond it
    assert stream.state_dict() == stream.loader.state_dict() and stream.loader.cursor == 2
    with pytest.raises(AssertionError, match="after the stream started"):
        stream.load_state_dict(stream.state_dict())


def test_a_resumed_run_trains_on_the_same_batches(shards, tmp_path):
    """run_local with checkpoints every 2 steps (4 batches per epoch), stopped at step 5; its step-5 checkpoint
    is deleted, so the run continues from step 4's, saved while the read-ahead held epoch 1's first batch.
    It trains on exactly the keys, with exactly the losses, of an uninterrupted run."""
    import shutil

    from jobs.train.metrics import read_metrics
    from jobs.train.pretrain import PretrainTask
    from jobs.train.trainer import run_local

    def go(name: str, *over: str) -> dict:
        cfg = _cfg(shards, tmp_path, f"name={name}", "schedule.total_steps=6", "checkpoint.every_steps=2",
                   f"fault.keys_log={tmp_path / name / 'keys'}", *over)  # fmt: skip
        run = cfg.run_url
        run_local(
            PretrainTask(cfg), run_url=run, log_dir=f"{run}/logs", export_url=f"{run}/final", device="cpu"
        )
        return read_metrics(f"{run}/logs/metrics.jsonl")

    ref = go("ref")
    go("cut", "stop_at_step=5")
    shutil.rmtree(tmp_path / "runs" / "cut" / "step_00000005")
    cut = go("cut")
    assert {s: r["loss"] for s, r in cut.items()} == {s: r["loss"] for s, r in ref.items()}
    assert [r["epoch"] for r in ref.values()] == [0, 0, 0, 0, 1, 1]

    def keys(name: str) -> dict[int, list[str]]:
        import json

        out = {}
        for f in sorted((tmp_path / name / "keys").iterdir()):
            for line in f.read_text().splitlines():
                rec = json.loads(line)
                out[rec["step"]] = rec["keys"]
        return out

    assert keys("cut") == keys("ref") and sorted(keys("ref")) == list(range(1, 7))


def test_unlogged_steps_read_nothing_back_from_the_device(shards, tmp_path, monkeypatch):
    """A tiny in-process pretraining run (log every 3rd step, checkpoint only at the end): calls of
    ``.item()``, ``float()``, ``.cpu()`` and ``.tolist()`` on tensors, counted per step (from one step's start
    to the next's, so logging and checkpointing belong to their step) outside the loader's own host work and
    AdamW's host step counters, are 0 on unlogged steps and > 0 on logged ones (the metrics' one read-back)."""
    from jobs.train import trainer as trainer_mod
    from jobs.train.pretrain import PretrainTask

    calls: list[str] = []
    paused = [False]

    def counting(name, fn):
        def wrapper(self, *a, **k):
            # AdamW (capturable=False) keeps its step counters on the host by design: its reads cost no sync
            if not paused[0] and not sys._getframe(1).f_globals.get("__name__", "").startswith("torch.optim"):
                calls.append(name)
            return fn(self, *a, **k)

        return wrapper

    for name in ("item", "__float__", "cpu", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))

    real_epochs = prefetch.epochs

    def loader_uncounted(loader):  # decoding and masking are host work of the loader, not device reads
        stream = real_epochs(loader)
        while True:
            paused[0] = True
            try:
                item = next(stream)
            finally:
                paused[0] = False
            yield item

    monkeypatch.setattr(prefetch, "epochs", loader_uncounted)
    starts: list[int] = []
    real_step = trainer_mod.Trainer._train_step

    def marked(self, *a, **k):
        starts.append(len(calls))
        return real_step(self, *a, **k)

    monkeypatch.setattr(trainer_mod.Trainer, "_train_step", marked)
    cfg = _cfg(shards, tmp_path, "schedule.total_steps=7", "metrics.log_every=3", "checkpoint.every_steps=100",
               "metrics.tensorboard=false")  # fmt: skip
    run = cfg.run_url
    trainer_mod.run_local(
        PretrainTask(cfg), run_url=run, log_dir=f"{run}/logs", export_url=f"{run}/final", device="cpu"
    )
    ends = [*starts[1:], len(calls)]
    per_step = {i + 1: calls[a:b] for i, (a, b) in enumerate(zip(starts, ends, strict=True))}
    assert sorted(per_step) == list(range(1, 8))
    for step in (1, 2, 4, 5):
        assert per_step[step] == [], (step, per_step[step])
    for step in (3, 6, 7):  # logged (7: the last, with its checkpoint)
        assert "tolist" in per_step[step], (step, per_step[step])


@pytest.mark.gpu
def test_prefetched_batch_is_on_the_device_and_equal_to_the_host_batch():
    """Skipped without CUDA (tests/conftest.py)."""

    @dataclasses.dataclass
    class Loader:  # the stateful loader interface over fixed batches, one epoch
        batches: list
        epoch: int = 0
        cursor: int = 0
        stats: dict = dataclasses.field(default_factory=lambda: {"batches": 0})

        def __iter__(self):
            for b in self.batches[self.cursor :]:
                self.cursor += 1
                yield b
            self.epoch, self.cursor = self.epoch + 1, 0

    g = torch.Generator().manual_seed(0)
    host = [
        {"video": torch.randint(0, 255, (2, 3, 4, 8, 8), dtype=torch.uint8, generator=g),
         "mask": torch.rand(2, 16, generator=g) > 0.5, "label": torch.tensor([i, -1]), "key": [f"a{i}", "b"]}
        for i in range(3)
    ]  # fmt: skip
    dev = torch.device("cuda")
    stream = Prefetcher(Loader(host), dev, keys=("video", "label"))
    for want in host * 2:
        _, got = stream.next()
        assert got["video"].device.type == "cuda" and got["label"].device.type == "cuda"
        assert got["mask"].device.type == "cpu" and got["mask"].is_pinned() and got["key"] == want["key"]
        for k in ("video", "mask", "label"):
            assert torch.equal(got[k].cpu(), want[k]), k
