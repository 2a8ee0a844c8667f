"""AdamW, the linear lr-scaling rule, the warmup + cosine schedule and the world-size resize policy.

Why one module: these four decide what "the same run" means when a job is resumed on a different number
of workers, so they are defined (and tested) together.

Resize policy (elastic runs). The per-worker batch is fixed; the global batch follows the world size:
``global_batch = per_worker_batch * world_size * accum_steps``. The peak lr follows the linear scaling rule of
the MAE/VideoMAE papers, ``peak_lr = base_lr * global_batch / base_batch`` (base_batch 256), recomputed
whenever the world size changes. The schedule is keyed on *samples seen*, not on optimizer steps, so warmup
and cosine progress are the same fraction of the run whatever the world size was along the way, and the run
ends when ``samples_seen >= total_samples``.

Units: learning rates are per optimizer step; ``*_samples`` count clips summed over all workers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from timm.optim import param_groups_weight_decay

DEFAULT_NO_WEIGHT_DECAY = ("*pos_embed*", "*cls_token*")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW as in the VideoMAE paper: betas (0.9, 0.95), weight decay 0.05, base lr 1.5e-4 per 256 clips."""

    base_lr: float = 1.5e-4
    base_batch: int = 256
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    no_weight_decay: tuple[str, ...] = DEFAULT_NO_WEIGHT_DECAY  # fnmatch patterns on parameter names
    grad_clip: float | None = None  # max global grad norm; None = no clipping (paper default)
    accum_steps: int = 1  # micro-batches per optimizer step
    # fused AdamW kernel: true, false (torch's default, foreach on CUDA) or auto (fused on CUDA). Default false,
    # today's kernel, until benchmarks/mfu.py has measured the fused one on a GPU (issue 20: measure, not assume)
    fused: bool | str = False

    def __post_init__(self) -> None:
        if not self.base_lr > 0:
            raise ValueError(f"optim.base_lr must be > 0, got {self.base_lr}")
        if self.base_batch <= 0:
            raise ValueError(f"optim.base_batch must be > 0, got {self.base_batch}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.accum_steps < 1:
            raise ValueError(f"optim.accum_steps must be >= 1, got {self.accum_steps}")
        if not (self.fused == "auto" or isinstance(self.fused, bool)):
            raise ValueError(f"optim.fused must be auto, true or false, got {self.fused!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Length of warmup and of the whole run, in epochs (paper recipes) or optimizer steps (debug runs).

    Steps are converted to samples with the *nominal* global batch (the configured maximum world size), so a
    steps-based run that is resized keeps its length in samples.
    """

    epochs: float | None = None
    warmup_epochs: float = 0.0
    total_steps: int | None = None
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.total_steps is None):
            raise ValueError(
                f"schedule: set exactly one of epochs / total_steps, got {self.epochs} / {self.total_steps}"
            )
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"schedule.epochs must be > 0, got {self.epochs}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"schedule.total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_epochs < 0 or self.warmup_steps < 0:
            raise ValueError("schedule.warmup_epochs / warmup_steps must be >= 0")
        if self.epochs is not None and self.warmup_epochs > self.epochs:
            raise ValueError(f"schedule.warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        if self.total_steps is not None and self.warmup_steps > self.total_steps:
            raise ValueError(
                f"schedule.warmup_steps {self.warmup_steps} exceeds total_steps {self.total_steps}"
            )
        if self.min_lr < 0:
            raise ValueError(f"schedule.min_lr must be >= 0, got {self.min_lr}")


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """What the resize policy decides for one world size."""

    world_size: int
    per_worker_batch: int
    accum_steps: int
    global_batch: int  # clips per optimizer step, all workers
    peak_lr: float


def scaled_lr(base_lr: float, global_batch: int, base_batch: int = 256) -> float:
    """Linear scaling rule: ``base_lr * global_batch / base_batch``."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be > 0, got {global_batch}")
    return base_lr * global_batch / base_batch


def batch_plan(cfg: OptimConfig, *, per_worker_batch: int, world_size: int) -> BatchPlan:
    """The resize policy: per-worker batch fixed, global batch and peak lr follow the world size."""
    if per_worker_batch < 1:
        raise ValueError(f"per_worker_batch must be >= 1, got {per_worker_batch}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    global_batch = per_worker_batch * world_size * cfg.accum_steps
    return BatchPlan(
        world_size=world_size,
        per_worker_batch=per_worker_batch,
        accum_steps=cfg.accum_steps,
        global_batch=global_batch,
        peak_lr=scaled_lr(cfg.base_lr, global_batch, cfg.base_batch),
    )


def schedule_samples(cfg: ScheduleConfig, *, dataset_size: int, nominal_global_batch: int) -> tuple[int, int]:
    """(warmup_samples, total_samples) of a run; epochs need ``dataset_size`` (clips per epoch)."""
    if cfg.epochs is not None:
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1 for an epoch schedule, got {dataset_size}")
        return round(cfg.warmup_epochs * dataset_size), round(cfg.epochs * dataset_size)
    assert cfg.total_steps is not None
    return cfg.warmup_steps * nominal_global_batch, cfg.total_steps * nominal_global_batch


def lr_at(
    samples_seen: float, *, peak_lr: float, warmup_samples: int, total_samples: int, min_lr: float
) -> float:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_samples``, then half-cosine to ``min_lr``.

    Same shape as MAE's ``adjust_learning_rate`` with epochs replaced by samples seen.
    """
    if total_samples <= 0:
        raise ValueError(f"total_samples must be > 0, got {total_samples}")
    if samples_seen < warmup_samples:
        return peak_lr * samples_seen / warmup_samples
    decay = max(total_samples - warmup_samples, 1)
    progress = min((samples_seen - warmup_samples) / decay, 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SampleCosineSchedule:
    """Stateful schedule that writes ``lr_at(samples_seen)`` into the optimizer's param groups.

    ``torch.optim.lr_scheduler`` schedulers count ``step()`` calls, which changes meaning when the world size
    (hence samples per step) changes; this one is keyed on samples seen. Its state records the run length so a
    resume with a different schedule is caught; the peak lr is *not* restored (the resize policy recomputes it).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        peak_lr: float,
        warmup_samples: int,
        total_samples: int,
        min_lr: float = 0.0,
    ) -> None:
        if warmup_samples < 0 or warmup_samples > total_samples:
            raise ValueError(f"warmup_samples {warmup_samples} must be in [0, total_samples={total_samples}]")
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.warmup_samples = warmup_samples
        self.total_samples = total_samples
        self.min_lr = min_lr
        self.samples_seen = 0
        self.step(0)

    def step(self, samples_seen: int) -> float:
        """Set the lr for the next optimizer step, after ``samples_seen`` clips; returns it."""
        self.samples_seen = int(samples_seen)
        lr = lr_at(
            self.samples_seen,
            peak_lr=self.peak_lr,
            warmup_samples=self.warmup_samples,
            total_samples=self.total_samples,
            min_lr=self.min_lr,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def get_last_lr(self) -> float:
        return lr_at(
            self.samples_seen,
            peak_lr=self.peak_lr,
            warmup_samples=self.warmup_samples,
            total_samples=self.total_samples,
            min_lr=self.min_lr,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "samples_seen": self.samples_seen,
            "warmup_samples": self.warmup_samples,
            "total_samples": self.total_samples,
            "min_lr": self.min_lr,
            "peak_lr": self.peak_lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("warmup_samples", "total_samples"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"checkpoint schedule has {key}={state[key]} but this run has {getattr(self, key)}; "
                    "resuming with a different schedule length is not an exact resume"
                )
        self.step(int(state["samples_seen"]))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, *, lr: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on 1-D params (norms, biases) and on ``cfg.no_weight_decay`` patterns.

    The model's own ``no_weight_decay()`` names (timm convention) are added to the patterns.
    """
    patterns = set(cfg.no_weight_decay)
    inner = getattr(model, "module", model)
    if hasattr(inner, "no_weight_decay"):
        patterns |= {f"*{n}" for n in inner.no_weight_decay()}
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=tuple(sorted(patterns)))
    return adamw(groups, cfg, lr=lr)


def adamw(groups: list[dict[str, Any]], cfg: OptimConfig, *, lr: float) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over parameter ``groups`` with ``cfg``'s betas, eps and kernel choice.

    ``cfg.fused``: ``True`` runs one fused kernel per step (CUDA, CPU); ``False`` leaves torch's default (the
    multi-tensor ``foreach`` kernels on CUDA); ``"auto"`` is fused when every parameter lives on a CUDA device
    (issue 20: the optimizer step is a measurable share of a ViT-B step), else the default. Same update either
    way up to float rounding."""
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("model has no trainable parameters")
    fused = cfg.fused if cfg.fused != "auto" else all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
