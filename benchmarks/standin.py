"""A training task whose model step takes a set time without holding the GIL (``benchmarks/feed.py``).

Why: whether the loader feeds a GPU, and what the trainer itself costs per step, can be measured on a CPU box
if the model step is replaced by something that occupies the training process for as long as a GPU step
would, but leaves the CPU (and the GIL) to the loader, as a GPU step does: ``time.sleep(step_s)``. The loss
comes from one parameter, so backward, gradient clipping and the optimizer step run as in a real step.

What it leaves out: the GPU itself, the host-to-device copy of the batch and its normalisation on the device
(``pipeline.loader.transforms.model_input``), NCCL's gradient all-reduce, and the CPU time a real step's kernel
launches take (a compiled ViT-B step launches few enough that it is small beside the step).

This module is imported by name on Ray Train workers (``jobs.train.trainer.task_name``), so it lives in a file of
its own on the workers' ``PYTHONPATH`` (``feed.py`` puts ``benchmarks/`` there).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from jobs.train.config import PretrainConfig
from model import VideoMAE, get_config
from pipeline.loader.masking import ClipSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class StandInConfig(PretrainConfig):
    """A pretraining config (its loader, clips and masks are the real ones) plus the stand-in step time."""

    step_s: float = 0.1  # seconds one micro-batch's forward sleeps

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.step_s >= 0:
            raise ValueError(f"step_s must be >= 0 seconds, got {self.step_s}")


class StandInModel(VideoMAE):
    """``forward(mask) -> loss``: sleeps ``step_s`` (GIL released), then the squared distance of one trained
    parameter (``mask_token``, 32 values) from 1. A VideoMAE (the smallest: one block each, frozen) only so the
    trainer's checkpoint at the stop step can save it."""

    def __init__(self, step_s: float) -> None:
        super().__init__(get_config("tiny", encoder_depth=1, decoder_depth=1))
        self.step_s = step_s
        for name, p in self.named_parameters():
            p.requires_grad_(name == "mask_token")

    def forward(self, mask_BL: torch.Tensor) -> torch.Tensor:
        time.sleep(self.step_s)
        return (self.mask_token.float() - 1.0).pow(2).mean() + 0.0 * mask_BL.shape[0]


class StandInTask:
    """The :class:`jobs.train.trainer.Task` of a stand-in run: the real clips and masks of ``cfg.model``, the
    stand-in model, plain SGD."""

    config_class = StandInConfig
    unit = "clips"

    def __init__(self, cfg: StandInConfig) -> None:
        self.cfg = cfg

    def clip_spec(self) -> ClipSpec:
        return self.cfg.model.build().clip_spec(masking=True)

    def build_model(self, *, resuming: bool) -> nn.Module:
        return StandInModel(self.cfg.step_s)

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)

    def forward(
        self, model: nn.Module, batch: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return model(batch["mask"]), {}

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        return {}

    def flops_per_sample(self) -> None:
        return None  # no MFU: there are no model FLOPs (and no CPU GEMM peak to measure)

    def on_log(self, step: int, log_dir: str, model: nn.Module) -> None:
        pass


def bare_step(model: StandInModel, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> None:
    """The same step without the trainer: forward (the sleep), backward, optimizer step."""
    model(batch["mask"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
