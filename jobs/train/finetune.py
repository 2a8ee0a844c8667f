"""``vmae finetune --config configs/finetune/<name>.yaml [k=v ...] [--address ADDR] [--resume]``.

Supervised finetuning of a ``VideoMAEClassifier`` with Ray Train. :class:`FinetuneTask` is what finetuning adds
to the one trainer (``jobs.train.trainer``), the recipe of the official finetuning script: the classifier initialised
from a pretrained encoder (any checkpoint ``jobs.train.checkpointing.load_any_checkpoint`` reads), layer-wise lr decay
(timm's ``param_groups_layer_decay`` over the model's ``group_matcher``), random erasing (the same box in every
frame, after normalisation) and mixup/cutmix on whole clips (RandAugment is the loader's: ``loader.rand_augment``),
soft-target / label-smoothed cross entropy, drop path (model config) and repeated augmentation (the loader's
``num_sample``). The schedule's clock counts *videos* (``batch_size // num_sample`` per worker per
micro-batch), as the official lr rule does. ``--resume`` continues a run directory (refused when absent; an
existing one is refused without it); when the schedule completes, rank 0 exports the classifier to
``<run dir>/final``, which ``vmae eval`` reads.

Legend: ``B`` clips per worker per micro-batch, ``K`` classes; ``video [B, 3, T, S, S]`` uint8 from the loader
(float32, ImageNet normalised, once on the device), ``label [B]`` int64, soft targets ``[B, K]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.optim import param_groups_layer_decay
from torch import nn

from jobs.train.checkpointing import load_any_checkpoint, unwrap
from jobs.train.config import AugmentSection, FinetuneConfig
from jobs.train.launch import add_fit_arguments, run_fit
from jobs.train.launch import fit as launch
from jobs.train.optim import OptimConfig, adamw
from model import VideoMAE, VideoMAEClassifier
from pipeline.loader.masking import ClipSpec
from pipeline.loader.transforms import model_input


def build_finetune_optimizer(
    model: nn.Module, cfg: OptimConfig, *, layer_decay: float, lr: float
) -> torch.optim.AdamW:
    """AdamW over timm's layer-decay groups: ``lr_scale = layer_decay ** (depth + 1 - layer)`` with the
    tubelet embedding layer 0, encoder block ``i`` layer ``i + 1`` and ``fc_norm``/``head`` layer
    ``depth + 1`` (``VideoMAEClassifier.group_matcher``), no weight decay on 1-D parameters (norms, biases)
    or names matching ``cfg.no_weight_decay``. ``SampleCosineSchedule`` multiplies each group's lr by its
    ``lr_scale``."""
    groups = param_groups_layer_decay(
        unwrap(model),
        weight_decay=cfg.weight_decay,
        no_weight_decay_list=tuple(cfg.no_weight_decay),
        layer_decay=layer_decay,
    )
    return adamw(groups, cfg, lr=lr)


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


def erase_clips(video_BCTHW: torch.Tensor, aug: AugmentSection) -> torch.Tensor:
    """Random erasing as the official finetuning loader does it, with timm's ``RandomErasing``: normalised clips
    ``[B, C, T, H, W]`` -> erased copies (``video_BCTHW`` itself, untouched, with ``aug.reprob`` 0).

    The official loader calls its own copy of timm's class (``random_erasing.py``, ``cube=True`` by default) on
    each clip as ``T x C x H x W`` with ``max_count=num_splits=recount``: with probability ``reprob`` it draws
    one box (or 1..recount) and fills it in every frame from ``T // recount`` on (all frames for recount 1),
    each frame with its own noise. Folding ``C, T`` into timm's channel axis (``[B, C*T, H, W]``) makes timm
    draw exactly that per clip: one probability draw and one box per clip, its fill drawn for every
    channel of every frame. timm tries 10 boxes where the copy tries 100 before giving up; a box fails only
    when it comes out taller or wider than the clip (< 1% of tries at 224x224), so the two differ with
    probability < 1e-20. Draws come from Python's ``random`` (boxes) and the device's torch generator (fill):
    this process's streams, saved and restored with every checkpoint (``jobs.train.checkpointing.RNGState``).
    """
    if aug.reprob == 0:
        return video_BCTHW
    out = video_BCTHW.clone(memory_format=torch.contiguous_format)
    b, c, t, h, w = out.shape
    t0 = t // aug.recount if aug.recount > 1 else 0
    part = out[:, :, t0:]
    folded = part.reshape(b, c * (t - t0), h, w)  # a view of `out` for recount 1, else a copy
    RandomErasing(aug.reprob, mode=aug.remode, max_count=aug.recount, device=out.device)(folded)
    if folded.data_ptr() != part.data_ptr():
        part.copy_(folded.view(part.shape))
    return out


def make_criterion(aug: AugmentSection) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-clip loss ``[B]`` as the official script has it (its mean): soft-target CE after mixup (whose targets
    carry the label smoothing), else label-smoothed CE, else plain CE -- ``F.cross_entropy`` unreduced, so the
    task can weight stand-in rows out without changing the batch shape."""
    smoothing = 0.0 if aug.mixing else aug.label_smoothing

    def criterion(logits_BK: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_BK, target, label_smoothing=smoothing, reduction="none")

    return criterion


def init_classifier(cfg: FinetuneConfig) -> tuple[VideoMAEClassifier, dict[str, Any]]:
    """The classifier of ``cfg`` with its encoder copied from ``cfg.pretrained`` (if set).

    Returns ``(model, info)``; ``info`` names the source format/kind and the keys that were not copied
    (decoder, ``encoder.norm``, or a classifier's head when the class count differs)."""
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
        if not isinstance(source, VideoMAE):
            raise ValueError(f"pretrained {cfg.pretrained!r} is neither a VideoMAE nor a classifier")
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


def check_labels(label_B: torch.Tensor, valid_B: torch.Tensor, *, num_classes: int, keys: list[str]) -> None:
    """Raises ``ValueError`` naming the first real sample (``valid``) with a label outside ``[0, num_classes)``
    (host tensors: no device sync)."""
    bad = torch.nonzero(valid_B & ((label_B < 0) | (label_B >= num_classes)), as_tuple=False).flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"sample {keys[i]!r} has label {int(label_B[i])}, outside [0, num_classes={num_classes})"
        )


class FinetuneTask:
    """Classification: (mixed) cross entropy of ``VideoMAEClassifier(video)`` on the loader's whole clips."""

    config_class = FinetuneConfig
    unit = "videos"

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.model_cfg = cfg.model.build()
        self.mixup = make_mixup(cfg.augment, cfg.num_classes)
        self.criterion = make_criterion(cfg.augment)

    def clip_spec(self) -> ClipSpec:
        return self.model_cfg.clip_spec(masking=False)

    def build_model(self, *, resuming: bool) -> nn.Module:
        """Resuming: a plain classifier (its weights come from the run's checkpoint, not ``pretrained``)."""
        if resuming:
            return VideoMAEClassifier(self.model_cfg, self.cfg.num_classes, head_drop=self.cfg.head_drop)
        return init_classifier(self.cfg)[0]

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return build_finetune_optimizer(model, self.cfg.optim, layer_decay=self.cfg.layer_decay, lr=lr)

    def forward(
        self, model: nn.Module, batch: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # every micro-batch keeps the loader's shape [B] (a compiled model sees one shape): the loader's
        # stand-ins for skipped samples (``valid`` False, copies of good clips with their labels) stay in the
        # batch, and mixup, with weight 0 in the loss
        valid = batch["valid"]
        check_labels(batch["label"], valid, num_classes=self.cfg.num_classes, keys=batch["key"])
        label = batch["label"].clamp(min=0)  # -1 only where a whole micro-batch is stand-ins (zeros)
        # copy the pinned host tensors; nothing is indexed on the host (an unpinned copy would turn the
        # non_blocking transfer into a synchronous one)
        video = model_input(batch["video"], device)  # uint8 from the loader, normalised on the device
        video = erase_clips(video, self.cfg.augment)  # normalised (its fill is N(0, 1)), before mixup
        label = label.to(device, non_blocking=True)
        weight = valid.to(device, torch.float32, non_blocking=True)
        target = label
        if self.mixup is not None:
            video, target = mix_clips(self.mixup, video, label)
        logits = model(video)
        seen = float(valid.sum())
        loss = (self.criterion(logits.float(), target) * weight).sum() / max(seen, 1.0)
        correct = ((logits.detach().argmax(1) == label) & weight.bool()).sum()  # on device until a log step
        return loss, {"correct": correct, "seen": seen}

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        """Training top-1 of the logged step (on mixed clips, against the unmixed labels)."""
        return {"train_top1": stats["correct"] / stats["seen"] if stats["seen"] else float("nan")}

    def flops_per_sample(self) -> None:
        return None

    def on_log(self, step: int, log_dir: str, model: nn.Module) -> None:
        return None


def fit(cfg: FinetuneConfig, *, resume: bool = False) -> Any:
    """Run (or continue) finetuning; returns the ``ray.train.Result``. Starts a local Ray if none is up."""
    if cfg.pretrained and not resume:
        init_classifier(cfg)  # a wrong path or architecture fails here, not on every worker
    return launch(cfg, FinetuneTask, resume=resume)


CONFIG_DIR = "configs/finetune"  # where this command's --config YAMLs live (jobs.cli.config_registry)
CONFIG_CLASS = FinetuneConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_fit_arguments(parser, CONFIG_DIR, example="pretrained=runs/pt/step_00000100")


def run(args: argparse.Namespace) -> int:
    def shown(result: Any) -> dict[str, Any]:
        return {"train_top1": (result.metrics or {}).get("train_top1")}

    return run_fit(args, FinetuneConfig, fit, command="finetune", shown=shown, product="classifier")
