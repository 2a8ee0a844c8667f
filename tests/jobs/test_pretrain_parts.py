"""Ray-free pieces of pretraining: checkpoint state round trips, RNG capture, metrics maths, PNG grid."""

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import checkpointing as ckpt
from jobs.metrics import MetricsLogger, mfu, pixel_mask, read_metrics, save_reconstruction_grid
from jobs.optim import OptimConfig, SampleCosineSchedule, build_optimizer


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
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def _train_steps(model, opt, n):
    g = torch.Generator().manual_seed(5)
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss.detach())


def test_save_and_load_checkpoint_continues_identically(tmp_path):
    """Train 3 steps, checkpoint, train 2 more; a fresh model restored from the checkpoint must match."""
    model = _model()
    opt = build_optimizer(model, OptimConfig(), lr=1e-2)
    sched = SampleCosineSchedule(opt, peak_lr=1e-2, warmup_samples=0, total_samples=100)
    _train_steps(model, opt, 3)
    sched.step(48)
    progress = ckpt.TrainProgress(step=3, samples_seen=48, world_size=2)
    for rank in (0, 1):
        ckpt.save_checkpoint(
            str(tmp_path),
            rank=rank,
            model=model,
            optimizer=opt,
            progress=progress,
            scheduler_state=sched.state_dict(),
            scaler_state={},
            loader_state={"cursor": 10 + rank, "epoch": 0},
        )
    expected = _train_steps(model, opt, 2)

    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    ckpt.load_model_weights(fresh, str(tmp_path))
    fresh_opt = build_optimizer(fresh, OptimConfig(), lr=0.0)
    ckpt.load_optimizer(fresh_opt, str(tmp_path))
    trainer = ckpt.read_trainer_state(str(tmp_path))
    fresh_sched = SampleCosineSchedule(fresh_opt, peak_lr=1e-2, warmup_samples=0, total_samples=100)
    fresh_sched.load_state_dict(trainer["scheduler"])
    assert ckpt.TrainProgress.from_state_dict(trainer["progress"]) == progress
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr())
    assert _train_steps(fresh, fresh_opt, 2) == expected

    assert ckpt.read_rank_state(str(tmp_path), 1, old_world_size=2)["loader"]["cursor"] == 11
    grown = ckpt.read_rank_state(str(tmp_path), 3, old_world_size=2)  # resize 2 -> 4 workers
    assert grown["rng"] is None and grown["loader"]["cursor"] == 10


def test_read_trainer_state_rejects_foreign_directory(tmp_path):
    with pytest.raises(ValueError, match="not a vmae pretrain checkpoint"):
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
    log = MetricsLogger(str(tmp_path), tensorboard=True)
    for step, loss in ((1, 1.0), (2, 0.9), (3, 0.8), (2, 0.5), (3, 0.4)):  # steps 2-3 replayed
        log.log(step, {"loss": loss})
    log.close()
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["loss"] for r in recs.values()] == [1.0, 0.5, 0.4]
    assert any((tmp_path / "tensorboard").iterdir())
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
    from jobs.optim import batch_plan, schedule_samples
    from jobs.pretrain_config import PretrainConfig

    cfg = load_config(PretrainConfig, f"configs/pretrain/{name}.yaml")
    model = cfg.model.build()
    assert (model.num_frames, model.img_size) == (cfg.loader.num_frames, cfg.loader.input_size)
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


def test_pretrain_config_rejects_model_loader_mismatch():
    from jobs.config import load_config
    from jobs.pretrain_config import PretrainConfig

    with pytest.raises(ValueError, match="num_frames"):
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
    from jobs.finetune_config import FinetuneConfig
    from jobs.pretrain import with_absolute_paths
    from jobs.pretrain_config import PretrainConfig

    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        PretrainConfig,
        str(Path(__file__).resolve().parents[2] / "configs/pretrain/debug.yaml"),
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
        str(Path(__file__).resolve().parents[2] / "configs/finetune/debug.yaml"),
        ["pretrained=runs/pt", "loader.manifest=file://rel/m.json"],
    )
    ft = with_absolute_paths(ft)
    assert ft.pretrained == str(tmp_path / "runs/pt")
    assert ft.loader.manifest == str(tmp_path / "rel/m.json")
