"""The per-worker VideoMAE finetuning loop that Ray Train runs on every worker, and its recipe pieces.

Mirrors ``jobs.train_loop`` (pretraining): same checkpoint layout and exact-resume state (``jobs.checkpointing``),
same samples-keyed warmup + cosine schedule and resize policy (``jobs.optim``), same metrics sink, fault hook and
DDP wrapping (imported from ``jobs.train_loop``). What differs is the recipe of the official finetuning script:
a ``VideoMAEClassifier`` initialised from a pretrained encoder, layer-wise lr decay, mixup/cutmix on whole clips,
soft-target / label-smoothed cross entropy, drop path (model config) and repeated augmentation (the loader's
``num_sample``). The schedule's clock counts *videos* (``batch_size // num_sample`` per worker per micro-batch),
as the official lr rule does.

Legend: ``B`` clips per worker per micro-batch, ``K`` classes; ``video [B, 3, T, S, S]`` float32 (ImageNet
normalised), ``label [B]`` int64, soft targets ``[B, K]``.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from jobs import checkpointing as ckpt
from jobs.config import from_dict
from jobs.finetune_config import AugmentSection, FinetuneConfig
from jobs.metrics import MetricsLogger, StepTimer
from jobs.optim import OptimConfig, SampleCosineSchedule, batch_plan, schedule_samples
from jobs.train_loop import (
    _epochs,
    _maybe_kill,
    _mean_over_ranks,
    _wrap,
    autocast_dtype,
    optimizer_step,
    report_checkpoint,
    restore_progress,
)
from model import VideoMAE, VideoMAEClassifier
from model import save_checkpoint as save_model
from pipeline.loader import make_loader

_BLOCK = re.compile(r"^encoder\.blocks\.(\d+)\.")


def layer_id(name: str, depth: int) -> int:
    """Layer of a parameter for lr decay (BEiT/VideoMAE numbering over ``depth + 2`` layers): tubelet
    embedding 0, encoder block ``i`` -> ``i + 1``, everything after the blocks (fc_norm, head) ``depth + 1``."""
    if name.startswith("encoder.patch_embed.") or name.startswith("encoder.pos_embed"):
        return 0
    m = _BLOCK.match(name)
    return int(m.group(1)) + 1 if m else depth + 1


def layer_decay_groups(
    model: nn.Module, *, weight_decay: float, layer_decay: float, no_weight_decay: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """AdamW parameter groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)`` and no weight decay on
    1-D parameters (norms, biases) or names matching the ``no_weight_decay`` fnmatch patterns.

    ``SampleCosineSchedule`` multiplies each group's lr by its ``lr_scale``."""
    import fnmatch

    depth = len(ckpt.unwrap(model).encoder.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in ckpt.unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        decay = p.ndim > 1 and not any(fnmatch.fnmatch(name, pat) for pat in no_weight_decay)
        g = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - lid),
            },
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_finetune_optimizer(
    model: nn.Module, cfg: OptimConfig, *, layer_decay: float, lr: float
) -> torch.optim.AdamW:
    """AdamW over :func:`layer_decay_groups` (betas/eps/weight decay from ``cfg``)."""
    groups = layer_decay_groups(
        model,
        weight_decay=cfg.weight_decay,
        layer_decay=layer_decay,
        no_weight_decay=tuple(cfg.no_weight_decay),
    )
    if not groups:
        raise ValueError("model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


def make_mixup(aug: AugmentSection, num_classes: int) -> Mixup | None:
    """timm ``Mixup`` for the recipe (it also applies label smoothing to the soft targets), or None."""
    if not aug.mixing:
        return None
    return Mixup(
        mixup_alpha=aug.mixup_alpha,
        cutmix_alpha=aug.cutmix_alpha,
        prob=aug.prob,
        switch_prob=aug.switch_prob,
        mode=aug.mode,
        label_smoothing=aug.label_smoothing,
        num_classes=num_classes,
    )


def mix_clips(
    mixup: Mixup, video_BCTHW: torch.Tensor, label_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup/cutmix whole clips: ``(video [B, C, T, H, W], soft targets [B, K])``.

    timm's cutmix indexes ``x[:, :, y0:y1, x0:x1]``, i.e. dims 2 and 3, which for a 5-D clip are T and H. Folding
    ``C, T`` into one channel axis makes the box cover the same ``H x W`` region of every frame and channel (as
    the official VideoMAE mixup does)."""
    b, c, t, h, w = video_BCTHW.shape
    x = video_BCTHW.reshape(b, c * t, h, w).clone()
    x, target = mixup(x, label_B)
    return x.reshape(b, c, t, h, w), target


def make_criterion(aug: AugmentSection) -> nn.Module:
    """Loss as the official script: soft-target CE after mixup, else label-smoothed CE, else plain CE."""
    if aug.mixing:
        return SoftTargetCrossEntropy()
    if aug.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=aug.label_smoothing)
    return nn.CrossEntropyLoss()


def init_classifier(cfg: FinetuneConfig) -> tuple[VideoMAEClassifier, dict[str, Any]]:
    """The classifier of ``cfg`` with its encoder copied from ``cfg.pretrained`` (if set).

    Returns ``(model, info)``; ``info`` names the source format/kind and the keys that were not copied
    (decoder, ``encoder.norm``, or a classifier's head when the class count differs)."""
    from jobs.evaluate import load_any_checkpoint

    model_cfg = cfg.model.build()
    model = VideoMAEClassifier(model_cfg, cfg.num_classes, head_drop=cfg.head_drop)
    if cfg.pretrained is None:
        return model, {"pretrained": None}
    source, meta = load_any_checkpoint(cfg.pretrained, cfg=model_cfg)
    state = source.state_dict()
    if isinstance(source, VideoMAEClassifier):
        own = model.state_dict()
        keep = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
        if any(not k.startswith("head.") for k in set(own) - set(keep)):
            raise ValueError(
                f"pretrained {cfg.pretrained!r}: classifier does not match model {cfg.model.name!r}"
            )
        model.load_state_dict({**own, **keep})
        ignored = sorted(set(state) - set(keep))
    else:
        assert isinstance(source, VideoMAE)
        try:
            ignored = model.from_pretrained_encoder(state)
        except ValueError as e:
            raise ValueError(
                f"pretrained {cfg.pretrained!r} does not fit model {cfg.model.name!r}: {e}"
            ) from e
    return model, {
        "pretrained": cfg.pretrained,
        "format": meta.get("format"),
        "kind": meta.get("kind"),
        "ignored": ignored,
    }


def valid_rows(
    label_B: torch.Tensor, valid_B: torch.Tensor, *, num_classes: int, even: bool, keys: list[str]
) -> torch.Tensor:
    """Indices of the clips to train on: loader stand-ins for skipped samples (``valid`` False) are dropped,
    and one more when mixup needs an even batch. Raises ``ValueError`` naming a sample with a label outside
    ``[0, num_classes)``."""
    idx = torch.nonzero(valid_B, as_tuple=False).flatten()
    bad = [i for i in idx.tolist() if not 0 <= int(label_B[i]) < num_classes]
    if bad:
        i = bad[0]
        raise ValueError(
            f"sample {keys[i]!r} has label {int(label_B[i])}, outside [0, num_classes={num_classes})"
        )
    return idx[: len(idx) - len(idx) % 2] if even else idx


def finetune_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"cfg": resolved FinetuneConfig dict, "log_dir": local dir,
    "final_url": where rank 0 writes the finished classifier}``."""
    cfg = from_dict(FinetuneConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    vpb = cfg.loader.videos_per_batch
    plan = batch_plan(cfg.optim, per_worker_batch=vpb, world_size=world)
    nominal = batch_plan(cfg.optim, per_worker_batch=vpb, world_size=cfg.scaling.num_workers)

    torch.manual_seed(cfg.seed)
    checkpoint = ray.train.get_checkpoint()
    loader = make_loader(cfg.loader, rank=rank, world_size=world)
    warmup_samples, total_samples = schedule_samples(
        cfg.schedule, dataset_size=loader.num_samples, nominal_global_batch=nominal.global_batch
    )
    progress = ckpt.TrainProgress(world_size=world)
    with contextlib.ExitStack() as stack:
        cdir = stack.enter_context(checkpoint.as_directory()) if checkpoint else None
        if cdir:  # resuming: the weights come from the run's own checkpoint, not from `pretrained`
            model = VideoMAEClassifier(cfg.model.build(), cfg.num_classes, head_drop=cfg.head_drop)
            ckpt.load_model_weights(model, cdir)
        else:
            model, _ = init_classifier(cfg)
        model = _wrap(model, cfg, device)
        optimizer = build_finetune_optimizer(model, cfg.optim, layer_decay=cfg.layer_decay, lr=plan.peak_lr)
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
        if cdir:
            ckpt.load_optimizer(optimizer, cdir)
            progress = restore_progress(
                cdir, ckpt.read_trainer_state(cdir), schedule=schedule, scaler=scaler, loader=loader,
                rank=rank, world=world, seed=cfg.seed,
            )  # fmt: skip

    mixup = make_mixup(cfg.augment, cfg.num_classes)
    criterion = make_criterion(cfg.augment)
    logger = MetricsLogger(config["log_dir"], tensorboard=cfg.metrics.tensorboard) if rank == 0 else None
    stream = _epochs(loader)
    timer = StepTimer()
    inner = ckpt.unwrap(model)
    stop_step = cfg.stop_at_step if cfg.stop_at_step is not None else float("inf")
    try:
        while progress.samples_seen < total_samples and progress.step < stop_step:
            timer.start()
            model.train()
            loss_sum = correct = seen = 0.0
            for micro in range(cfg.optim.accum_steps):
                t0 = time.perf_counter()
                epoch, batch = next(stream)
                timer.data(time.perf_counter() - t0)
                rows = valid_rows(
                    batch["label"],
                    batch["valid"],
                    num_classes=cfg.num_classes,
                    even=mixup is not None,
                    keys=batch["key"],
                )
                video = batch["video"][rows].to(device, non_blocking=True)
                label = batch["label"][rows].to(device, non_blocking=True)
                target = label
                if mixup is not None and len(rows):
                    video, target = mix_clips(mixup, video, label)
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
                    if len(rows):
                        logits = model(video)
                        loss = criterion(logits.float(), target)
                    else:  # every clip of this micro-batch was a stand-in: still join DDP's all-reduce
                        logits = model(batch["video"][:1].to(device))
                        loss = logits.sum() * 0.0
                scaler.scale(loss / cfg.optim.accum_steps).backward()
                loss_sum += float(loss.detach())
                if len(rows):
                    correct += float((logits.detach().argmax(1) == label).sum())
                    seen += len(rows)
            _maybe_kill(cfg, rank, progress.step + 1)
            grad_norm, lr = optimizer_step(
                model, optimizer, scaler, schedule, progress, cfg.optim.grad_clip, plan.global_batch
            )
            step_s, wait_frac = timer.stop()

            done = progress.samples_seen >= total_samples
            save = progress.step % cfg.checkpoint.every_steps == 0 or (done and cfg.checkpoint.at_end)
            save = save or progress.step >= stop_step
            if not (save or progress.step % cfg.metrics.log_every == 0 or done):
                continue
            loss_mean, correct_all, seen_all = _mean_over_ranks(
                [loss_sum / cfg.optim.accum_steps, correct, seen], device
            )
            metrics = {
                "loss": loss_mean,
                "train_top1": correct_all / seen_all if seen_all else float("nan"),
                "lr": lr,
                "videos_per_s": plan.global_batch / step_s,
                "data_wait_frac": wait_frac,
                "grad_norm": grad_norm,
                "samples_seen": float(progress.samples_seen),
                "epoch": float(epoch),
                "world_size": float(world),
                "skipped": float(loader.stats["skipped"]),
            }
            if logger is not None:
                logger.log(progress.step, metrics)
            report = {"step": progress.step, **metrics}
            if not save:
                ray.train.report(report)
                continue
            report_checkpoint(
                report, rank=rank, model=model, optimizer=optimizer, progress=progress, schedule=schedule,
                scaler=scaler, loader=loader,
            )  # fmt: skip
        if rank == 0 and progress.samples_seen >= total_samples:
            save_model(inner, config["final_url"])
    finally:
        if logger is not None:
            logger.close()
