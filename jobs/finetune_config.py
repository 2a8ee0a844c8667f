"""``FinetuneConfig``: one frozen tree for ``vmae finetune`` (YAML in ``configs/finetune/``).

Why its own module: the driver (``jobs.finetune``) and the per-worker loop (``jobs.finetune_loop``) both need
it, and the loop must be importable on Ray workers without the CLI. The Ray-facing sections (scaling, failure,
parallelism, fault injection) and the model section are the pretraining job's, imported, so both jobs are
scaled, restarted and checkpointed the same way.

Recipe defaults follow the official VideoMAE finetuning script (``run_class_finetuning.py`` and
``scripts/kinetics/.../finetune.sh``): AdamW betas (0.9, 0.999), weight decay 0.05, layer-wise lr decay 0.75,
lr = base_lr x global_batch / 256 where the batch counts *videos* (repeated clips of ``num_sample`` do not
count), warmup 5 epochs then cosine, drop path 0.1, mixup 0.8 / cutmix 1.0 with label smoothing 0.1.
"""

from __future__ import annotations

import dataclasses

from jobs.checkpointing import CheckpointConfig
from jobs.metrics import MetricsConfig
from jobs.optim import OptimConfig, ScheduleConfig
from jobs.pretrain_config import (
    FailureSection,
    FaultInjection,
    ModelSection,
    ParallelConfig,
    ScalingSection,
    check_model_matches_loader,
)
from pipeline.loader import LoaderConfig

MIXUP_MODES = ("batch", "pair", "elem")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AugmentSection:
    """Batch-level regularisers of the finetuning recipe (timm ``Mixup`` arguments) and label smoothing.

    ``mixup_alpha``/``cutmix_alpha`` 0 disable each; with both 0 the loss is label-smoothed cross entropy."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0  # probability of mixing a batch at all
    switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mode: str = "batch"
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("augment.mixup_alpha / cutmix_alpha must be >= 0 (0 disables)")
        for name in ("prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mode not in MIXUP_MODES:
            raise ValueError(f"augment.mode must be one of {MIXUP_MODES}, got {self.mode!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"augment.label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def mixing(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """A finetuning run: ``storage_path/name`` is the run directory (local folder or ``s3://``); the final
    classifier is written to ``<run dir>/final`` in our checkpoint format (``model.save_checkpoint``).

    ``pretrained``: a ``vmae``/``hf`` checkpoint directory, an official ``.pth``, a pretraining run's Ray
    checkpoint (``<run>/step_*``) or run directory (its latest checkpoint); ``null`` trains from scratch."""

    name: str = "finetune-debug"
    storage_path: str = "runs"
    seed: int = 0
    stop_at_step: int | None = None
    pretrained: str | None = None
    num_classes: int
    head_drop: float = 0.0  # dropout before the head (official fc_drop_rate)
    layer_decay: float = 0.75  # lr scale of layer i of L+2 (embed, blocks, head) = decay ** (L + 1 - i)
    loader: LoaderConfig
    model: ModelSection = dataclasses.field(
        default_factory=lambda: ModelSection(name="tiny", overrides={"drop_path_rate": 0.1})
    )
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(base_lr=5e-4, betas=(0.9, 0.999), weight_decay=0.05)
    )
    schedule: ScheduleConfig = dataclasses.field(
        default_factory=lambda: ScheduleConfig(epochs=75, warmup_epochs=5, min_lr=1e-6)
    )
    augment: AugmentSection = dataclasses.field(default_factory=AugmentSection)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    scaling: ScalingSection = dataclasses.field(default_factory=ScalingSection)
    failure: FailureSection = dataclasses.field(default_factory=FailureSection)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    fault: FaultInjection = dataclasses.field(default_factory=FaultInjection)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty run name without '/', got {self.name!r}")
        if not self.storage_path:
            raise ValueError("storage_path must be a local folder or an s3:// URL")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError(f"stop_at_step must be >= 1 or null, got {self.stop_at_step}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
        if not 0.0 <= self.head_drop < 1.0:
            raise ValueError(f"head_drop must be in [0, 1), got {self.head_drop}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1] (1 = no decay), got {self.layer_decay}")
        if self.parallel.strategy != "ddp":
            raise ValueError(
                f"parallel.strategy must be 'ddp' for finetuning, got {self.parallel.strategy!r}"
            )
        ld = self.loader
        check_model_matches_loader(self.model.build(), ld, masking=False)
        if ld.mask_type != "none":
            raise ValueError(
                f"loader.mask_type must be 'none' for finetuning (no masking), got {ld.mask_type!r}"
            )
        if self.augment.mixing and ld.batch_size % 2:
            raise ValueError(
                f"mixup/cutmix pair clips within a batch: loader.batch_size must be even, got {ld.batch_size}"
            )

    @property
    def run_url(self) -> str:
        return self.storage_path.rstrip("/") + "/" + self.name

    @property
    def final_url(self) -> str:
        """Where the finished classifier is written (``vmae`` format directory)."""
        return self.run_url + "/final"
