"""Ray-free pieces of pretraining: checkpoint state round trips, RNG capture, metrics maths, PNG grid."""

import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.train import checkpointing as ckpt
from jobs.train.metrics import MetricsLogger, mfu, pixel_mask, read_metrics, save_reconstruction_grid
from jobs.train.optim import OptimConfig, SampleCosineSchedule, build_optimizer


def _draws():
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])


def test_rng_state_roundtrip_through_weights_only_file(tmp_path):
    ckpt.seed_everything(123)
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    first = _draws()
    ckpt.seed_everything(999)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == first


def _model():
    from model import VideoMAE, get_config

    torch.manual_seed(0)
    return VideoMAE(get_config("tiny"))


def _train_steps(model, opt, n):
    from pipeline.loader.masking import tube_mask

    g = torch.Generator().manual_seed(5)
    cfg = model.cfg
    for _ in range(n):
        x = torch.randn(4, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)
        loss, _ = model(x, tube_mask(4, *cfg.grid, cfg.mask_ratio, g))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss.detach())


class _Loader:  # the loader's stateful interface, without shards
    def __init__(self, cursor=0):
        self.cursor = cursor

    def state_dict(self):
        return {"cursor": self.cursor, "epoch": 0}

    def load_state_dict(self, state):
        self.cursor = state["cursor"]


def _state(model, opt, sched, progress, loader):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return {"model": model, "optimizer": opt, "schedule": sched, "scaler": scaler, "progress": progress,
            "loader": loader, "rng": ckpt.RNGState()}  # fmt: skip


def test_save_and_load_train_state_continues_identically(tmp_path):
    """Train 3 steps, save the train state from 2 ranks, train 2 more; fresh parts restored from the
    checkpoint through the one path (load_train_state) must continue with the same losses and RNG draws."""
    model = _model()
    opt = build_optimizer(model, OptimConfig(), lr=1e-2)
    sched = SampleCosineSchedule(opt, peak_lr=1e-2, warmup_samples=0, total_samples=100)
    _train_steps(model, opt, 3)
    sched.step(48)
    progress = ckpt.TrainProgress(step=3, samples_seen=48, world_size=2)
    ckpt.seed_everything(42)
    for rank in (0, 1):
        state = _state(model, opt, sched, progress, _Loader(cursor=10 + rank))
        ckpt.save_train_state(str(tmp_path), state, rank=rank)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    draws = _draws()
    expected = _train_steps(model, opt, 2)
    assert {"model.safetensors", "vmae.json", "optim.pt", "trainer.pt", "rank_0.pt", "rank_1.pt"} <= {
        p.name for p in tmp_path.iterdir()
    }

    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh_opt = build_optimizer(fresh, OptimConfig(), lr=0.0)
    fresh_sched = SampleCosineSchedule(fresh_opt, peak_lr=1e-2, warmup_samples=0, total_samples=100)
    fresh_progress, loader = ckpt.TrainProgress(world_size=2), _Loader()
    ckpt.seed_everything(7)
    ckpt.load_train_state(str(tmp_path), _state(fresh, fresh_opt, fresh_sched, fresh_progress, loader), rank=1,
                          world_size=2, reseed=lambda step: pytest.fail("rank 1 has its own RNG state"))  # fmt: skip
    assert fresh_progress == progress and loader.cursor == 11
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr())
    assert _draws() == draws  # rank 1's RNG streams, as saved
    assert _train_steps(fresh, fresh_opt, 2) == expected

    # resize 2 -> 4 workers: rank 3 takes rank 0's loader state and a fresh deterministic seed
    reseeded = []
    grown = _Loader()
    ckpt.load_train_state(str(tmp_path), _state(_model(), build_optimizer(_model(), OptimConfig(), lr=0.0),
                          SampleCosineSchedule(opt, peak_lr=1e-2, warmup_samples=0, total_samples=100),
                          ckpt.TrainProgress(), grown), rank=3, world_size=4, reseed=reseeded.append)  # fmt: skip
    assert grown.cursor == 10 and reseeded == [3]
    from jobs.train.checkpointing import load_any_checkpoint  # a step checkpoint is an exported model too

    loaded, meta = load_any_checkpoint(str(tmp_path))
    assert meta["format"] == "vmae" and meta["kind"] == "pretrain"
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())


def test_read_trainer_state_rejects_foreign_directory(tmp_path):
    with pytest.raises(ValueError, match="not a vmae training checkpoint"):
        ckpt.read_trainer_state(str(tmp_path))


def test_latest_checkpoint_dir_picks_highest_complete_step(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False)):
        d = tmp_path / ckpt.checkpoint_dir_name(step)
        d.mkdir()
        if complete:
            (d / ckpt.TRAINER_FILE).write_bytes(b"x")
    assert ckpt.latest_checkpoint_dir(str(tmp_path)).endswith("step_00000010")
    assert ckpt.latest_checkpoint_dir(str(tmp_path / "missing")) is None


def test_checkpoint_config_validation():
    with pytest.raises(ValueError, match="every_steps"):
        ckpt.CheckpointConfig(every_steps=0)


def test_mfu_matches_hand_computation():
    # 10 clips/s * 3e9 FLOP/clip = 3e10 FLOP/s over 2 workers of 1e11 FLOP/s each -> 0.15
    assert mfu(10.0, 3e9, 2e11) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="peak_flops_total"):
        mfu(1.0, 1.0, 0.0)


def test_metrics_jsonl_last_write_wins(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(str(tmp_path), tensorboard=True)
    writes = ((1, 1.0, 0.1), (2, 0.9, 0.2), (3, 0.8, 0.3), (2, 0.5, 0.2), (3, 0.4, 0.3))  # steps 2-3 replayed
    for step, loss, lr in writes:
        log.log(step, {"loss": loss, "lr": lr})
    log.close()
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["loss"] for r in recs.values()] == [1.0, 0.5, 0.4]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr"]
    for tag, col in (("train/loss", 1), ("train/lr", 2)):  # TensorBoard keeps every write, in order
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [w[0] for w in writes]
        assert [v for _, v in got] == pytest.approx([w[col] for w in writes], rel=1e-6)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_pixel_mask_expands_tokens_to_pixels():
    mask = torch.tensor([True, False, False, True, False, True, True, False])  # grid (2, 2, 2)
    pm = pixel_mask(mask, grid=(2, 2, 2), tubelet=2, patch=3)
    assert pm.shape == (4, 6, 6)
    ref = torch.zeros(4, 6, 6, dtype=torch.bool)
    for i, m in enumerate(mask.tolist()):
        t, h, w = i // 4, (i // 2) % 2, i % 2
        ref[t * 2 : t * 2 + 2, h * 3 : h * 3 + 3, w * 3 : w * 3 + 3] = m
    assert torch.equal(pm, ref)
    with pytest.raises(ValueError, match="mask must be"):
        pixel_mask(mask[:5], grid=(2, 2, 2), tubelet=2, patch=3)


def test_reconstruction_grid_writes_png(tmp_path):
    video = torch.rand(3, 4, 16, 16)
    mask = torch.zeros(4, 16, 16, dtype=torch.bool)
    mask[:, :8] = True
    path = tmp_path / "grid.png"
    save_reconstruction_grid(str(path), video, mask, video.flip(-1))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="shapes disagree"):
        save_reconstruction_grid(str(path), video, mask[:2], video)


@pytest.mark.parametrize("name", ["debug", "vit_s", "vit_b", "vit_l"])
def test_every_pretrain_yaml_loads_and_is_consistent(name):
    from jobs.config import load_config
    from jobs.train.config import PretrainConfig
    from jobs.train.optim import batch_plan, schedule_samples
    from jobs.train.pretrain import PretrainTask

    cfg = load_config(PretrainConfig, f"configs/pretrain/{name}.yaml")
    model = cfg.model.build()
    spec = PretrainTask(cfg).clip_spec()  # what the loader makes: the model's clips and masks
    assert (spec.num_frames, spec.input_size, spec.patch_size, spec.tubelet_size) == (
        model.num_frames, model.img_size, model.patch_size, model.tubelet_size
    )  # fmt: skip
    assert (spec.mask_ratio, spec.mask_type, spec.num_masked) == (
        model.mask_ratio,
        model.mask_type,
        model.num_masked,
    )
    plan = batch_plan(cfg.optim, per_worker_batch=cfg.loader.batch_size, world_size=cfg.scaling.num_workers)
    if name == "debug":
        assert model.img_size == 32 and cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu
        return
    assert plan.global_batch == 1024 and plan.peak_lr == pytest.approx(6e-4)  # paper: 1.5e-4 x 1024 / 256
    assert model.mask_ratio == 0.9 and (model.num_frames, model.img_size) == (16, 224)
    assert schedule_samples(cfg.schedule, dataset_size=240_000, nominal_global_batch=1024) == (
        40 * 240_000,
        800 * 240_000,
    )
    assert cfg.parallel.strategy == ("fsdp" if name == "vit_l" else "ddp")


def test_pretrain_config_rejects_bad_input():
    from jobs.config import load_config
    from jobs.train.config import PretrainConfig

    with pytest.raises(
        ValueError, match=r"override 'loader.num_frames=8': loader has no key 'num_frames'"
    ):  # the model's, once
        load_config(PretrainConfig, "configs/pretrain/debug.yaml", ["loader.num_frames=8"])
    with pytest.raises(ValueError, match="unknown model config"):
        load_config(PretrainConfig, "configs/pretrain/debug.yaml", ["model.name=vit_z"])
    with pytest.raises(ValueError, match="min_workers"):
        load_config(PretrainConfig, "configs/pretrain/debug.yaml", ["scaling.min_workers=3"])
    with pytest.raises(ValueError, match="fault"):
        load_config(PretrainConfig, "configs/pretrain/debug.yaml", ["fault.rank=1"])


def test_relative_input_paths_are_resolved_before_reaching_workers(tmp_path, monkeypatch):
    """Ray Train workers run in another working directory: `make demo` once failed on a relative manifest."""
    from jobs.config import load_config
    from jobs.train.config import FinetuneConfig, PretrainConfig
    from jobs.train.launch import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        PretrainConfig,
        str(Path(__file__).resolve().parents[3] / "configs/pretrain/debug.yaml"),
        ["loader.manifest=data/shards/manifest.json", "loader.subset=data/sub.parquet"],
    )
    out = with_absolute_paths(cfg)
    assert out.loader.manifest == str(tmp_path / "data/shards/manifest.json")
    assert out.loader.subset == str(tmp_path / "data/sub.parquet")
    s3 = with_absolute_paths(
        dataclasses.replace(
            cfg, loader=dataclasses.replace(cfg.loader, manifest="s3://b/m.json", subset=None)
        )
    )
    assert s3.loader.manifest == "s3://b/m.json" and s3.loader.subset is None
    ft = load_config(
        FinetuneConfig,
        str(Path(__file__).resolve().parents[3] / "configs/finetune/debug.yaml"),
        ["pretrained=runs/pt", "loader.manifest=file://rel/m.json"],
    )
    ft = with_absolute_paths(ft)
    assert ft.pretrained == str(tmp_path / "runs/pt")
    assert ft.loader.manifest == str(tmp_path / "rel/m.json")


def test_resume_skips_a_corrupt_latest_checkpoint(tmp_path, caplog):
    """The same trainer in one process (LocalSession, as a study's runs): stopped at step 4 with checkpoints
    at 2 and 4; step 4's weights are then truncated. Resuming says which checkpoint it skipped and why, goes
    on from step 2 and finishes; with every checkpoint corrupt it fails with one error naming the run."""
    import logging

    from jobs.config import load_config
    from jobs.train.config import PretrainConfig
    from jobs.train.metrics import read_metrics
    from jobs.train.pretrain import PretrainTask
    from jobs.train.trainer import run_local
    from tests.pipeline.shardset_helpers import make_shard_set

    shards = str(tmp_path / "shards")
    make_shard_set(shards, 8, 2, frames=12, width=48, height=32)
    run = str(tmp_path / "runs" / "r")

    def go(*over):
        cfg = load_config(PretrainConfig, "configs/pretrain/debug.yaml", [f"loader.manifest={shards}",
                          f"storage_path={tmp_path / 'runs'}", "name=r", "schedule.total_steps=6", "checkpoint.every_steps=2",
                          "checkpoint.num_to_keep=3", "scaling.num_workers=1", "metrics.image_every=0", *over])  # fmt: skip
        run_local(
            PretrainTask(cfg), run_url=run, log_dir=f"{run}/logs", export_url=f"{run}/final", device="cpu"
        )

    go("stop_at_step=4")
    assert {"step_00000002", "step_00000004"} <= set(os.listdir(run))
    weights = tmp_path / "runs" / "r" / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="jobs.train.trainer"):
        go()
    assert (
        "latest checkpoint" in caplog.text
        and "resumed from" in caplog.text
        and "step_00000002" in caplog.text
    )
    assert max(read_metrics(f"{run}/logs/metrics.jsonl")) == 6 and os.path.exists(f"{run}/final/vmae.json")
    for name in os.listdir(run):
        if name.startswith("step_"):
            (tmp_path / "runs" / "r" / name / "trainer.pt").write_bytes(b"junk")
    os.remove(f"{run}/final/vmae.json")
    with pytest.raises(ValueError, match="no checkpoint of .*r loads"):
        go("schedule.total_steps=8")


def test_gpu_peak_flops_by_the_longest_matching_name():
    from jobs.train.metrics import peak_flops_for

    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H100 NVL") == 835e12
    assert peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("NVIDIA L40S") == 362e12 and peak_flops_for("NVIDIA L4") == 121e12
    assert peak_flops_for("Tesla T4") is None


def test_tasks_reach_ray_train_by_a_name_the_workers_import():
    from jobs.train.finetune import FinetuneTask
    from jobs.train.pretrain import PretrainTask
    from jobs.train.session import task_class, task_name

    for cls in (PretrainTask, FinetuneTask):
        name = task_name(cls)
        assert ":" in name and task_class(name) is cls  # what train_loop_per_worker gets back from the name

    class Local(PretrainTask):  # a class inside a function has no importable name
        pass

    with pytest.raises(
        ValueError, match=r"is not importable as '\S+<locals>\.Local': define it at module level"
    ):
        task_name(Local)
