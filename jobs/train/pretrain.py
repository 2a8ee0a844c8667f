"""``vmae pretrain --config configs/pretrain/<name>.yaml [k=v ...] [--address ADDR] [--resume]``.

VideoMAE pretraining with Ray Train: :class:`PretrainTask` is what pretraining adds to the one trainer
(``jobs.train.trainer``) — a ``VideoMAE`` on masked clips, AdamW without weight decay on norms and biases, the
normalised-pixel loss, MFU from the analytic FLOP count and a reconstruction PNG every ``metrics.image_every``
steps. The run is wired and resumed by ``jobs.train.launch.fit``; when the schedule completes, rank 0 exports the
model to ``<run dir>/final``, which ``vmae eval``, ``vmae finetune`` and ``vmae study`` read.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import nn

from jobs.train.config import PretrainConfig
from jobs.train.launch import add_fit_arguments, run_fit
from jobs.train.launch import fit as launch
from jobs.train.metrics import pixel_mask, reconstructions, save_reconstruction_grid
from jobs.train.optim import build_optimizer
from model import VideoMAE
from model.flops import pretrain_train_flops
from pipeline.loader.masking import ClipSpec
from pipeline.loader.transforms import IMAGENET_MEAN, IMAGENET_STD, model_input


class PretrainTask:
    """Masked autoencoding: the loss of ``VideoMAE(video, mask, decoder_mask)`` on the loader's masked clips
    (``decoder_mask`` only with VideoMAE V2 dual masking)."""

    config_class = PretrainConfig
    unit = "clips"

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.model_cfg = cfg.model.build()
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def clip_spec(self) -> ClipSpec:
        return self.model_cfg.clip_spec(masking=True)

    def build_model(self, *, resuming: bool) -> nn.Module:
        return VideoMAE(self.model_cfg)

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(model, self.cfg.optim, lr=lr)

    def forward(
        self, model: nn.Module, batch: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        video = model_input(batch["video"], device)  # uint8 from the loader, normalised on the device
        mask = batch["mask"]  # stays on the CPU: the model splits tokens where the mask lives (no host sync)
        # VideoMAE V2 dual masking: the loader adds decoder_mask exactly when the model config has a decoder mask
        # type (the clip spec carries it); a batch without one would silently train the plain objective
        decoder_mask = batch.get("decoder_mask")
        if (decoder_mask is None) != (self.model_cfg.decoder_mask_type == "none"):
            raise ValueError(
                f"batch {'lacks' if decoder_mask is None else 'has'} a decoder_mask but the model's "
                f"decoder_mask_type is {self.model_cfg.decoder_mask_type!r}: make the loader from task.clip_spec()"
            )
        loss, pred = model(video, mask, decoder_mask)
        # the reconstruction PNG needs a prediction for every masked token; a decoder-masked forward predicts only
        # the K tokens its decoder mask keeps, so on_log predicts them all again (pred None)
        self._last = (video, mask, pred if decoder_mask is None else None)
        return loss, {}

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        return {}

    def flops_per_sample(self) -> float:
        """Analytic training FLOPs per clip (forward + backward) from ``model.flops``."""
        return float(pretrain_train_flops(self.model_cfg))

    def on_log(self, step: int, log_dir: str, model: nn.Module) -> None:
        """Reconstruction PNG of the first clip of the last micro-batch. Under dual masking the step predicted only
        the tokens its decoder mask keeps: the PNG's prediction of every masked token comes from one more forward
        of that clip without a decoder mask (VideoMAE V2's decoder predicts any position it is asked for) — on
        rank 0 alone, so not under FSDP, whose forward gathers parameters from every rank (no PNG there)."""
        if self._last is None:
            return
        video, mask, pred = self._last
        if pred is None:
            if self.cfg.parallel.strategy == "fsdp":
                return
            was_training = model.training
            model.eval()  # no drop path in the picture
            with torch.no_grad():
                _, pred = model(video[:1], mask[:1])
            model.train(was_training)
        save_grid(os.path.join(log_dir, "images", f"step_{step:08d}.png"), model, video, mask, pred)


def save_grid(
    path: str, model: nn.Module, video: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor
) -> None:
    """Original / masked / both reconstructions PNG of ``video[0]`` (``pred`` holds the whole micro-batch;
    ``jobs.train.metrics.reconstructions``: visible-tubelet statistics, true per-tubelet statistics)."""
    cfg = model.cfg
    recons = {k: r[0] for k, r in reconstructions(model, video[:1], mask[:1], pred[:1].detach()).items()}
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None, None]
    orig = video[0].detach().float().cpu() * std + mean
    pmask = pixel_mask(mask[0].cpu(), grid=cfg.grid, tubelet=cfg.tubelet_size, patch=cfg.patch_size)
    save_reconstruction_grid(path, orig, pmask, recons)


def fit(cfg: PretrainConfig, *, resume: bool = False) -> Any:
    """Run (or continue) pretraining; returns the ``ray.train.Result``. Starts a local Ray if none is up."""
    return launch(cfg, PretrainTask, resume=resume)


CONFIG_DIR = "configs/pretrain"  # where this command's --config YAMLs live (jobs.cli.config_registry)
CONFIG_CLASS = PretrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_fit_arguments(parser, CONFIG_DIR, example="optim.base_lr=1e-4")


def run(args: argparse.Namespace) -> int:
    def shown(result: Any) -> dict[str, Any]:
        return {"checkpoint": result.checkpoint.path if result.checkpoint else None}

    return run_fit(args, PretrainConfig, fit, command="pretrain", shown=shown, product="model")
