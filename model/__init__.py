"""VideoMAE model package: config, masking, model, FLOPs, checkpoint interop (no ray / torch.distributed here;
``model.parallelize`` is the one exception and is not imported by default)."""

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import CONFIGS, VideoMAEConfig, get_config
from model.masking import random_mask, tube_mask
from model.videomae import VideoMAE, VideoMAEClassifier, patchify, unpatchify

__all__ = [
    "CONFIGS",
    "VideoMAE",
    "VideoMAEClassifier",
    "VideoMAEConfig",
    "get_config",
    "load_checkpoint",
    "patchify",
    "random_mask",
    "save_checkpoint",
    "tube_mask",
    "unpatchify",
]
