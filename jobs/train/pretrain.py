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

from jobs.config import load_config
from jobs.train.config import PretrainConfig
from pipeline import storage
from pipeline.loader.masking import ClipSpec
from pipeline.loader.transforms import IMAGENET_MEAN, IMAGENET_STD, model_input


class PretrainTask:
    """Masked autoencoding: the loss of ``VideoMAE(video, mask)`` on the loader's masked clips."""

    config_class = PretrainConfig
    unit = "clips"

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.model_cfg = cfg.model.build()
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def clip_spec(self) -> ClipSpec:
        return self.model_cfg.clip_spec(masking=True)

    def build_model(self, *, resuming: bool) -> nn.Module:
        from model import VideoMAE

        return VideoMAE(self.model_cfg)

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        from jobs.train.optim import build_optimizer

        return build_optimizer(model, self.cfg.optim, lr=lr)

    def forward(
        self, model: nn.Module, batch: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        video = model_input(batch["video"], device)  # uint8 from the loader, normalised on the device
        mask = batch["mask"]  # stays on the CPU: the model splits tokens where the mask lives (no host sync)
        loss, pred = model(video, mask)
        self._last = (video, mask, pred)
        return loss, {}

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        return {}

    def flops_per_sample(self) -> float:
        """Analytic training FLOPs per clip (forward + backward) from ``model.flops``."""
        from model.flops import pretrain_train_flops

        return float(pretrain_train_flops(self.model_cfg))

    def on_log(self, step: int, log_dir: str, model: nn.Module) -> None:
        """Reconstruction PNG of the first clip of the last micro-batch."""
        if self._last is not None:
            save_grid(os.path.join(log_dir, "images", f"step_{step:08d}.png"), model, *self._last)


def save_grid(
    path: str, model: nn.Module, video: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor
) -> None:
    """Original / masked / reconstruction PNG of ``video[0]`` (``pred`` holds the whole micro-batch)."""
    from jobs.train.metrics import pixel_mask, save_reconstruction_grid
    from model import VideoMAE

    cfg = model.cfg
    # the class function, not the instance method: FSDP registers the latter as a collective forward
    recon = VideoMAE.reconstruct(model, video[:1], pred[:1].detach(), mask[:1])[0]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None, None]
    orig = video[0].detach().float().cpu() * std + mean
    pmask = pixel_mask(mask[0].cpu(), grid=cfg.grid, tubelet=cfg.tubelet_size, patch=cfg.patch_size)
    save_reconstruction_grid(path, orig, pmask, recon.cpu())


def fit(cfg: PretrainConfig, *, resume: bool = False) -> Any:
    """Run (or continue) pretraining; returns the ``ray.train.Result``. Starts a local Ray if none is up."""
    from jobs.train.launch import fit as launch

    return launch(cfg, PretrainTask, resume=resume)


CONFIG_DIR = "configs/pretrain"  # where this command's --config YAMLs live (jobs.cli.config_registry)
CONFIG_CLASS = PretrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML under configs/pretrain/")
    parser.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. optim.base_lr=1e-4")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    parser.add_argument("--resume", action="store_true", help="continue the run in storage_path/name")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    if args.address:
        import ray

        ray.init(address=args.address)
    result = fit(cfg, resume=args.resume)
    metrics = result.metrics or {}
    from jobs.train.launch import export_url

    final = (
        export_url(cfg) if storage.exists(storage.join(export_url(cfg), "vmae.json")) else "(not finished)"
    )
    print(
        f"pretrain {cfg.name}: step {metrics.get('step')} loss {metrics.get('loss')} "
        f"checkpoint {result.checkpoint.path if result.checkpoint else None} model {final}"
    )
    return 0
