"""End-to-end pretraining on a local 2-CPU Ray cluster: tiny model, 32 px, 4 frames, real shard-set loader.

One uninterrupted debug run is the reference; a run whose rank 1 is SIGKILLed mid-run, a run stopped and
continued with ``--resume``, and a 2 -> 1 worker resize are compared against it step by step (metrics.jsonl,
last record per step wins).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from jobs.config import load_config
from jobs.train import checkpointing as ckpt
from jobs.train.config import PretrainConfig
from jobs.train.launch import local_log_dir
from jobs.train.metrics import read_metrics
from jobs.train.optim import lr_at
from jobs.train.pretrain import fit
from pipeline.storage import exists as storage_exists
from tests.pipeline.shardset_helpers import make_shard_set

DEBUG = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "pretrain", "debug.yaml")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shards"))
    make_shard_set(root, n_videos=32, n_shards=4, frames=16, width=64, height=48, pattern="moving")
    return root + "/manifest.json"


def _cfg(storage: str, shards: str, *overrides: str) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        DEBUG,
        [f"storage_path={storage}", f"loader.manifest={shards}", "checkpoint.every_steps=3", *overrides],
    )


def _losses(cfg: PretrainConfig) -> dict[int, float]:
    recs = read_metrics(os.path.join(cfg.storage_path, cfg.name, "logs", "metrics.jsonl"))
    return {step: r["loss"] for step, r in recs.items()}


@pytest.fixture(scope="module")
def reference(ray_cluster, shards, tmp_path_factory):
    cfg = _cfg(str(tmp_path_factory.mktemp("runs")), shards, "name=ref")
    result = fit(cfg)
    return cfg, result, _losses(cfg)


def test_debug_run_learns_and_checkpoints(reference):
    cfg, result, losses = reference
    assert list(losses) == list(range(1, 9))
    first, last = sum(list(losses.values())[:2]) / 2, sum(list(losses.values())[-2:]) / 2
    assert last < first, losses
    run_dir = os.path.join(cfg.storage_path, cfg.name)
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("step_")) == [
        "step_00000006",
        "step_00000008",
    ]
    assert result.checkpoint.path.endswith("step_00000008") and result.metrics["step"] == 8
    last = os.path.join(run_dir, "step_00000008")
    assert {"model.safetensors", "vmae.json", "optim.pt", "trainer.pt", "rank_0.pt", "rank_1.pt"} <= set(
        os.listdir(last)
    )
    trainer = ckpt.read_trainer_state(last)
    assert trainer["progress"] == {"step": 8, "samples_seen": 64, "world_size": 2}
    # the finished run ends with an exported model: the last step's weights, in our format
    exported, meta = ckpt.load_any_checkpoint(run_dir)
    assert meta["url"] == os.path.join(run_dir, "final") and meta["kind"] == "pretrain"
    step_model, _ = ckpt.load_any_checkpoint(last)
    assert all(torch.equal(v, step_model.state_dict()[k]) for k, v in exported.state_dict().items())
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))
    assert os.listdir(os.path.join(run_dir, "logs", "images"))
    assert os.listdir(os.path.join(run_dir, "logs", "tensorboard"))
    recs = read_metrics(os.path.join(run_dir, "logs", "metrics.jsonl"))
    peak = 0.05 * 8 / 256  # linear rule: base lr x global batch (2 workers x 4 clips) / 256
    for step, rec in recs.items():  # lr logged for step s is the one used by step s (after s-1 steps of 8)
        assert rec["lr"] == pytest.approx(
            lr_at(8 * (step - 1), peak_lr=peak, warmup_samples=16, total_samples=64, min_lr=0)
        )
        assert 0 < rec["mfu"] < 1 and 0 <= rec["data_wait_frac"] <= 1 and rec["clips_per_s"] > 0
    with pytest.raises(ValueError, match="already exists"):
        fit(cfg)


def test_sigkilled_worker_recovers_with_identical_losses(reference, shards, tmp_path):
    _, _, ref_losses = reference
    marker = tmp_path / "killed"
    cfg = _cfg(
        str(tmp_path / "runs"),
        shards,
        "name=killed",
        "fault.rank=1",
        "fault.step=5",
        f"fault.marker={marker}",
    )
    fit(cfg)
    assert marker.exists(), "the fault hook did not fire"
    assert _losses(cfg) == ref_losses  # exact: steps 4-5 were replayed from the step-3 checkpoint


@pytest.mark.s3
def test_s3_checkpoints_stop_and_resume_continue_exactly(reference, shards, s3_bucket):
    """Checkpoints on the loopback S3 server; an invocation stopped at step 4 and continued with --resume
    replays nothing and reproduces the reference losses."""
    _, _, ref_losses = reference
    storage = f"{s3_bucket}/runs"
    first = fit(_cfg(storage, shards, "name=resumed", "stop_at_step=4"))
    assert first.metrics["step"] == 4
    with pytest.raises(ValueError, match="no checkpoint"):
        fit(_cfg(storage, shards, "name=other"), resume=True)
    cfg = _cfg(storage, shards, "name=resumed")
    fit(cfg, resume=True)
    latest = ckpt.latest_checkpoint_dir(cfg.run_url)
    assert latest == f"{s3_bucket}/runs/resumed/step_00000008"
    for name in ("model.safetensors", "vmae.json", "optim.pt", "trainer.pt", "rank_0.pt", "rank_1.pt"):
        assert storage_exists(f"{latest}/{name}"), name
    assert storage_exists(f"{cfg.run_url}/final/vmae.json")  # exported to S3 by rank 0
    assert storage_exists(f"{cfg.run_url}/config.yaml") and storage_exists(
        f"{cfg.run_url}/logs/metrics.jsonl"
    )
    log = local_log_dir(cfg) + "/metrics.jsonl"
    with open(log) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, 9)), "the resumed invocation must start at step 5"
    assert {s: r["loss"] for s, r in read_metrics(log).items()} == ref_losses


def test_resize_two_to_one_worker_rescales_lr_and_keeps_samples(shards, ray_cluster, tmp_path):
    storage = str(tmp_path / "runs")
    fit(_cfg(storage, shards, "name=resize", "stop_at_step=3"))
    fit(
        _cfg(storage, shards, "name=resize", "scaling.min_workers=1", "scaling.cpus_per_worker=2"),
        resume=True,
    )
    recs = read_metrics(os.path.join(storage, "resize", "logs", "metrics.jsonl"))
    # 3 steps x 8 clips at 2 workers, then 4 clips per step at 1 worker until 64 samples: 3 + 10 steps
    assert list(recs) == list(range(1, 14))
    assert [r["world_size"] for r in recs.values()] == [2.0] * 3 + [1.0] * 10
    assert recs[13]["samples_seen"] == 64
    for step, rec in recs.items():
        seen = 8 * min(step - 1, 3) + 4 * max(step - 1 - 3, 0)
        peak = 0.05 * (8 if step <= 3 else 4) / 256
        assert rec["lr"] == pytest.approx(
            lr_at(seen, peak_lr=peak, warmup_samples=16, total_samples=64, min_lr=0)
        )
