"""VideoMAE model package: config, model, FLOPs, checkpoint interop (no ray / torch.distributed here;
``model.parallelize`` is the one exception and is not imported by default). Masks are drawn on the data side
(``pipeline.loader.masking``); the model consumes them. Imports run one way: ``model`` may use ``pipeline``, never the
reverse."""

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import CONFIGS, VideoMAEConfig, get_config
from model.videomae import VideoMAE, VideoMAEClassifier, patchify, unpatchify

__all__ = [
    "CONFIGS",
    "VideoMAE",
    "VideoMAEClassifier",
    "VideoMAEConfig",
    "get_config",
    "load_checkpoint",
    "patchify",
    "save_checkpoint",
    "unpatchify",
]
