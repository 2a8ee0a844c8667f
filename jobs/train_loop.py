"""The per-worker VideoMAE pretraining loop that Ray Train runs on every worker.

One optimizer step = ``accum_steps`` micro-batches of ``loader.batch_size`` clips on each of ``world_size``
workers. The loop is resumable at any checkpointed step: on (re)start it takes ``ray.train.get_checkpoint()``
and restores model, optimizer, schedule, grad scaler, counters, this rank's loader cursor and RNG states,
so a restarted run replays exactly the steps an uninterrupted one would have taken (same world size), or
re-splits the data and rescales the lr by the resize policy of ``jobs.optim`` (different world size).

Legend: ``B`` per-worker micro-batch, ``L`` tokens per clip; ``video [B, 3, T, H, W]`` float32 (ImageNet
normalised), ``mask [B, L]`` bool (True = masked).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from jobs import checkpointing as ckpt
from jobs.config import from_dict
from jobs.metrics import (
    MetricsLogger,
    StepTimer,
    device_peak_flops,
    mfu,
    pixel_mask,
    save_reconstruction_grid,
)
from jobs.optim import SampleCosineSchedule, batch_plan, build_optimizer, schedule_samples
from jobs.pretrain_config import PretrainConfig
from model import VideoMAE
from pipeline.loader import make_loader


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``parallel.precision`` (``auto``: bf16 on GPU, none on CPU)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def train_flops_per_clip(model_cfg: Any) -> float:
    """Analytic training FLOPs per clip (forward + backward = 3x forward) from ``model.flops``."""
    from model.flops import pretrain_train_flops

    return float(pretrain_train_flops(model_cfg))


def _epochs(loader: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """Endless (epoch, batch) stream. The loader yields the rest of its current epoch from its cursor and
    then moves itself to the next epoch, so a restored cursor is honoured."""
    while True:
        epoch = loader.epoch
        for batch in loader:
            yield epoch, batch


def _maybe_kill(cfg: PretrainConfig, rank: int, step: int) -> None:
    """Fault-injection hook (tests): SIGKILL this worker once, before the optimizer step ``step``."""
    f = cfg.fault
    if f.rank is None or f.rank != rank or f.step != step or f.marker is None or os.path.exists(f.marker):
        return
    with open(f.marker, "w") as fh:
        fh.write(f"killed rank {rank} at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap(model: torch.nn.Module, cfg: PretrainConfig, device: torch.device) -> torch.nn.Module:
    p = cfg.parallel
    if p.strategy == "fsdp" or p.compile or p.activation_checkpointing:
        from model.parallelize import parallelize

        model = model.to(device)
        model = parallelize(
            model,
            fsdp=p.strategy == "fsdp",
            compile=p.compile,
            activation_checkpointing=p.activation_checkpointing,
            param_dtype=autocast_dtype(p.precision, device) if p.strategy == "fsdp" else None,
        )
    if p.strategy == "ddp":
        model = ray.train.torch.prepare_model(model)
    return model


def _grid(
    path: str, model: VideoMAE, video: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor, loader_cfg: Any
) -> None:
    """Reconstruction PNG of the first clip of a micro-batch (``pred`` holds the whole micro-batch)."""
    cfg = model.cfg
    # the class function, not the instance method: FSDP registers the latter as a collective forward
    recon = VideoMAE.reconstruct(model, video[:1], pred[:1].detach(), mask[:1])[0]
    mean = torch.tensor(loader_cfg.mean)[:, None, None, None]
    std = torch.tensor(loader_cfg.std)[:, None, None, None]
    orig = video[0].detach().float().cpu() * std + mean
    pmask = pixel_mask(mask[0].cpu(), grid=cfg.grid, tubelet=cfg.tubelet_size, patch=cfg.patch_size)
    save_reconstruction_grid(path, orig, pmask, recon.cpu())


def _mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def restore_progress(
    cdir: str,
    trainer_state: dict[str, Any],
    *,
    schedule: Any,
    scaler: Any,
    loader: Any,
    rank: int,
    world: int,
    seed: int,
) -> Any:
    """Restore schedule, scaler, this rank's loader cursor and RNG from a checkpoint (model and optimizer are
    loaded by the caller, sharded or not). Returns the run's progress, now at the current world size."""
    progress = ckpt.TrainProgress.from_state_dict(trainer_state["progress"])
    schedule.load_state_dict(trainer_state["scheduler"])
    scaler.load_state_dict(trainer_state["scaler"])
    rank_state = ckpt.read_rank_state(cdir, rank, progress.world_size)
    loader.load_state_dict(rank_state["loader"])
    if rank_state["rng"] is not None:
        ckpt.set_rng_state(rank_state["rng"])
    else:  # saved by another world size: no RNG for this rank, derive a fresh, deterministic one
        ckpt.seed_everything(seed * 100_003 + rank + 7919 * progress.step)
    progress.world_size = world
    return progress


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    schedule: Any,
    progress: Any,
    grad_clip: float | None,
    global_batch: int,
) -> tuple[float, float]:
    """Clip, step, advance step/samples and the samples-keyed schedule. Returns (grad_norm, lr used)."""
    grad_norm = float("nan")
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    lr = schedule.get_last_lr()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.samples_seen += global_batch
    schedule.step(progress.samples_seen)
    return grad_norm, lr


def report_checkpoint(
    report: dict[str, Any],
    *,
    rank: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: Any,
    schedule: Any,
    scaler: Any,
    loader: Any,
    sharded: bool = False,
) -> None:
    """Write everything an exact resume needs into a temporary folder and hand it to Ray Train."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save_checkpoint(
            tmp,
            rank=rank,
            model=model,
            optimizer=optimizer,
            progress=progress,
            scheduler_state=schedule.state_dict(),
            scaler_state=scaler.state_dict(),
            loader_state=loader.state_dict(),
            sharded=sharded,
        )
        ray.train.report(
            report,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=ckpt.checkpoint_dir_name(progress.step),
        )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"cfg": resolved PretrainConfig dict, "log_dir": local dir}``."""
    cfg = from_dict(PretrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    sharded = cfg.parallel.strategy == "fsdp"
    model_cfg = cfg.model.build()
    plan = batch_plan(cfg.optim, per_worker_batch=cfg.loader.batch_size, world_size=world)
    nominal = batch_plan(
        cfg.optim, per_worker_batch=cfg.loader.batch_size, world_size=cfg.scaling.num_workers
    )

    torch.manual_seed(cfg.seed)  # identical init on every rank (FSDP does not broadcast)
    model = VideoMAE(model_cfg)
    loader = make_loader(cfg.loader, rank=rank, world_size=world)
    dataset_size = loader.num_samples
    warmup_samples, total_samples = schedule_samples(
        cfg.schedule, dataset_size=dataset_size, nominal_global_batch=nominal.global_batch
    )
    progress = ckpt.TrainProgress(world_size=world)
    checkpoint = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        cdir = stack.enter_context(checkpoint.as_directory()) if checkpoint else None
        trainer_state = ckpt.read_trainer_state(cdir) if cdir else None
        if trainer_state is not None and bool(trainer_state["sharded"]) != sharded:
            raise ValueError("checkpoint and run disagree on parallel.strategy (fsdp vs ddp)")
        if cdir and not sharded:
            ckpt.load_model_weights(model, cdir)
        model = _wrap(model, cfg, device)
        optimizer = build_optimizer(model, cfg.optim, lr=plan.peak_lr)
        schedule = SampleCosineSchedule(
            optimizer,
            peak_lr=plan.peak_lr,
            warmup_samples=warmup_samples,
            total_samples=total_samples,
            min_lr=cfg.schedule.min_lr,
        )
        amp_dtype = autocast_dtype(cfg.parallel.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        ckpt.seed_everything(cfg.seed * 100_003 + rank)
        if cdir and trainer_state is not None:
            if sharded:
                ckpt.load_sharded(model, optimizer, cdir)
            else:
                ckpt.load_optimizer(optimizer, cdir)
            progress = restore_progress(
                cdir, trainer_state, schedule=schedule, scaler=scaler, loader=loader,
                rank=rank, world=world, seed=cfg.seed,
            )  # fmt: skip

    logger = MetricsLogger(config["log_dir"], tensorboard=cfg.metrics.tensorboard) if rank == 0 else None
    peak_total = (
        _mean_over_ranks([device_peak_flops(device, cfg.metrics.peak_flops_per_worker)], device)[0] * world
    )
    flops_clip = train_flops_per_clip(model_cfg)
    stream = _epochs(loader)
    timer = StepTimer()
    preempt_saved = False
    inner = ckpt.unwrap(model)
    try:
        stop_step = cfg.stop_at_step if cfg.stop_at_step is not None else float("inf")
        while progress.samples_seen < total_samples and progress.step < stop_step:
            timer.start()
            model.train()
            loss_sum = 0.0
            for micro in range(cfg.optim.accum_steps):
                t0 = time.perf_counter()
                epoch, batch = next(stream)
                timer.data(time.perf_counter() - t0)
                video = batch["video"].to(device, non_blocking=True)
                mask = batch["mask"].to(device, non_blocking=True)
                last_micro = micro == cfg.optim.accum_steps - 1
                no_sync = (
                    model.no_sync()
                    if hasattr(model, "no_sync") and not last_micro
                    else contextlib.nullcontext()
                )
                with (
                    no_sync,
                    torch.autocast(
                        device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                    ),
                ):
                    loss, pred = model(video, mask)
                scaler.scale(loss / cfg.optim.accum_steps).backward()
                loss_sum += float(loss.detach())
            _maybe_kill(cfg, rank, progress.step + 1)
            grad_norm, lr = optimizer_step(
                model, optimizer, scaler, schedule, progress, cfg.optim.grad_clip, plan.global_batch
            )
            step_s, wait_frac = timer.stop()

            done = progress.samples_seen >= total_samples
            stopping = progress.step >= stop_step
            save = (
                progress.step % cfg.checkpoint.every_steps == 0
                or (done and cfg.checkpoint.at_end)
                or stopping
            )
            if cfg.failure.preemption_poll_steps and progress.step % cfg.failure.preemption_poll_steps == 0:
                if ray.train.get_preemption_info() is not None and not preempt_saved:
                    save = preempt_saved = True
            if not (save or progress.step % cfg.metrics.log_every == 0 or done):
                continue
            loss_mean, wait_mean = _mean_over_ranks([loss_sum / cfg.optim.accum_steps, wait_frac], device)
            clips_s = plan.global_batch / step_s
            metrics = {
                "loss": loss_mean,
                "lr": lr,
                "clips_per_s": clips_s,
                "mfu": mfu(clips_s, flops_clip, peak_total),
                "data_wait_frac": wait_mean,
                "grad_norm": grad_norm,
                "samples_seen": float(progress.samples_seen),
                "epoch": float(epoch),
                "world_size": float(world),
                "skipped": float(loader.stats["skipped"]),
                "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9
                if device.type == "cuda"
                else 0.0,
            }
            if logger is not None:
                logger.log(progress.step, metrics)
                if cfg.metrics.image_every and progress.step % cfg.metrics.image_every == 0:
                    _grid(
                        os.path.join(logger.log_dir, "images", f"step_{progress.step:08d}.png"),
                        inner,
                        video,
                        mask,
                        pred,
                        cfg.loader,
                    )
            report = {"step": progress.step, **metrics}
            if not save:
                ray.train.report(report)
                continue
            report_checkpoint(
                report, rank=rank, model=model, optimizer=optimizer, progress=progress, schedule=schedule,
                scaler=scaler, loader=loader, sharded=sharded,
            )  # fmt: skip
    finally:
        if logger is not None:
            logger.close()
