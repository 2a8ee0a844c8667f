"""The configs of the two training jobs: ``PretrainConfig`` (``vmae pretrain``, YAML in ``configs/pretrain/``) and
``FinetuneConfig`` (``vmae finetune``, ``configs/finetune/``), both a :class:`TrainConfig`.

Why one module: the drivers and the one trainer (``jobs.train.trainer``, run on every Ray Train worker) need them,
and the trainer must be importable on workers without the CLI. What the two runs share (model, loader, optimizer,
schedule, checkpoints, parallelism, scaling, failures, metrics, fault injection) is declared once in
``TrainConfig``; each job adds only its own fields. Sub-configs that belong to a single concern (optimizer,
schedule, checkpoints, metrics, loader) live next to their code; the Ray-facing ones live here. The model
section is the one home of clip geometry and masking: the loader's clips are derived from it.

Finetuning defaults follow the official VideoMAE finetuning script (``run_class_finetuning.py`` and
``scripts/kinetics/.../finetune.sh``): AdamW betas (0.9, 0.999), weight decay 0.05, layer-wise lr decay 0.75,
lr = base_lr x global_batch / 256 where the batch counts *videos* (repeated clips of ``num_sample`` do not
count), warmup 5 epochs then cosine, drop path 0.1, mixup 0.8 / cutmix 1.0 with label smoothing 0.1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jobs.train.checkpointing import CheckpointConfig
from jobs.train.metrics import MetricsConfig
from jobs.train.optim import OptimConfig, ScheduleConfig
from model.config import VideoMAEConfig, get_config
from pipeline.loader.config import LoaderConfig

STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MIXUP_MODES = ("batch", "pair", "elem")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """A named model size (``model.config.CONFIGS``) plus field overrides, e.g. ``{mask_ratio: 0.9}``."""

    name: str = "tiny"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.build()  # validates name and overrides now, not on the workers

    def build(self) -> VideoMAEConfig:
        return get_config(self.name, **dict(self.overrides))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How each worker runs the model. ``precision=auto``: bf16 autocast on GPU, fp32 on CPU."""

    strategy: str = "ddp"
    compile: bool | str = False  # false, blocks (= true: each transformer block), model (the whole forward)
    activation_checkpointing: bool = False
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"parallel.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"parallel.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not (isinstance(self.compile, bool) or self.compile in ("blocks", "model")):
            raise ValueError(f"parallel.compile must be false, true, blocks or model, got {self.compile!r}")
        if self.compile == "model" and self.strategy == "fsdp":
            raise ValueError(
                "parallel.compile=model is not supported with parallel.strategy=fsdp; use blocks"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScalingSection:
    """Ray Train workers. ``min_workers`` set -> elastic ``ScalingConfig(num_workers=(min, num_workers))``."""

    num_workers: int = 1
    min_workers: int | None = None
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    elastic_resize_monitor_interval_s: float = 60.0
    placement_strategy: str = "PACK"
    resource_wait_s: float = 600.0  # an autoscaling cluster gets this long to grow to min_workers

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"scaling.num_workers must be >= 1, got {self.num_workers}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(
                f"scaling.min_workers must be in [1, num_workers={self.num_workers}], got {self.min_workers}"
            )
        if not self.cpus_per_worker > 0:
            raise ValueError(f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.resource_wait_s < 0:
            raise ValueError(f"scaling.resource_wait_s must be >= 0, got {self.resource_wait_s}")
        if self.elastic_resize_monitor_interval_s < 0:
            raise ValueError("scaling.elastic_resize_monitor_interval_s must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FailureSection:
    """Ray Train V2 ``FailureConfig`` fields present in Ray 2.60, plus how often to poll for preemption."""

    max_failures: int = 3
    max_preemption_failures: int = -1
    preemption_grace_s: float = 0.0
    relax_collectives_on_preemption: bool = False
    preemption_poll_steps: int = 0  # >0: every N steps ask Ray for a preemption notice; save a checkpoint

    def __post_init__(self) -> None:
        if self.max_failures < -1 or self.max_preemption_failures < -1:
            raise ValueError("failure.max_failures / max_preemption_failures must be >= -1 (-1 = unlimited)")
        if self.preemption_grace_s < 0:
            raise ValueError(f"failure.preemption_grace_s must be >= 0, got {self.preemption_grace_s}")
        if self.preemption_poll_steps < 0:
            raise ValueError(f"failure.preemption_poll_steps must be >= 0, got {self.preemption_poll_steps}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FaultInjection:
    """Test hooks: rank ``rank`` SIGKILLs itself at ``step`` once — only while ``marker`` does not exist;
    with ``keys_log`` (a local folder) every rank appends the keys of each batch it trains on, so a test can
    check which samples a run saw across failures and resizes."""

    rank: int | None = None
    step: int = 0
    marker: str | None = None
    keys_log: str | None = None  # folder: rank_<r>-<pid>.jsonl lines {"step", "epoch", "keys"}

    def __post_init__(self) -> None:
        if self.rank is not None and (self.marker is None or self.step < 1):
            raise ValueError("fault: a kill needs a marker path (so it fires once) and step >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run: ``storage_path/name`` is the run directory (local folder or ``s3://``); the finished
    model is exported to ``<run dir>/final`` (``model.save_checkpoint``, our format) for eval, studies and
    finetuning."""

    name: str
    storage_path: str = "runs"
    seed: int = 0
    stop_at_step: int | None = None  # end this invocation after this step (checkpointed); --resume continues
    loader: LoaderConfig
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=lambda: ScheduleConfig(total_steps=10))
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    scaling: ScalingSection = dataclasses.field(default_factory=ScalingSection)
    failure: FailureSection = dataclasses.field(default_factory=FailureSection)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    fault: FaultInjection = dataclasses.field(default_factory=FaultInjection)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty run name without '/', got {self.name!r}")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError(f"stop_at_step must be >= 1 or null, got {self.stop_at_step}")
        if not self.storage_path:
            raise ValueError("storage_path must be a local folder or an s3:// URL")
        if self.parallel.strategy == "fsdp" and self.parallel.precision == "fp16":
            raise ValueError("parallel.precision fp16 needs a GradScaler; use bf16 with fsdp")

    @property
    def run_url(self) -> str:
        return self.storage_path.rstrip("/") + "/" + self.name

    @property
    def worker_bundle(self) -> dict[str, float]:
        """The resources each Ray Train worker asks for."""
        return {"CPU": self.scaling.cpus_per_worker, **({"GPU": 1.0} if self.scaling.use_gpu else {})}

    @property
    def final_url(self) -> str:
        """Where the finished model is exported (``vmae`` format directory)."""
        return self.run_url + "/final"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig(TrainConfig):
    """A VideoMAE pretraining run (masked autoencoding; the loader's masks come from ``model``)."""

    name: str = "debug"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AugmentSection:
    """Regularisers of the finetuning recipe applied on the training device: random erasing (the official
    ``--reprob/--remode/--recount``, timm's ``RandomErasing`` on the normalised clips, ``jobs.train.finetune``),
    mixup/cutmix (timm ``Mixup`` arguments) and label smoothing. RandAugment is the loader's
    (``loader.rand_augment``): it works on uint8 frames before the crop.

    ``mixup_alpha``/``cutmix_alpha`` 0 disable each; with both 0 the loss is label-smoothed cross entropy.
    ``reprob`` 0 (the default, so configs without it train as before) disables erasing; the official recipe
    has 0.25."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0  # probability of mixing a batch at all
    switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mode: str = "batch"
    label_smoothing: float = 0.1
    reprob: float = 0.0  # probability of erasing a box from a clip (the same box in every frame)
    remode: str = "pixel"  # box fill: "pixel" per-pixel N(0, 1), "rand" one N(0, 1) colour, "const" 0
    recount: int = 1  # boxes per clip drawn from 1..recount; > 1 also spares the first T // recount frames

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
        if not 0.0 <= self.reprob <= 1.0:
            raise ValueError(f"augment.reprob must be in [0, 1] (0 disables), got {self.reprob}")
        if self.remode not in ("pixel", "rand", "const"):
            raise ValueError(f"augment.remode must be pixel, rand or const, got {self.remode!r}")
        if not isinstance(self.recount, int) or isinstance(self.recount, bool) or self.recount < 1:
            raise ValueError(f"augment.recount must be an int >= 1, got {self.recount!r}")

    @property
    def mixing(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig(TrainConfig):
    """A supervised finetuning run of a ``VideoMAEClassifier``.

    ``pretrained``: a ``vmae``/``hf`` checkpoint directory, an official ``.pth``, a training run's checkpoint
    (``<run>/step_*``) or run directory (its exported model, else its latest checkpoint); ``null`` trains from
    scratch. The schedule's clock counts *videos* (the official lr rule), not clips."""

    name: str = "finetune-debug"
    pretrained: str | None = None
    num_classes: int
    head_drop: float = 0.0  # dropout before the head (official fc_drop_rate)
    layer_decay: float = 0.75  # lr scale of layer i of L+2 (embed, blocks, head) = decay ** (L + 1 - i)
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

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if self.augment.mixing and self.loader.batch_size % 2:
            raise ValueError(
                "mixup/cutmix pair clips within a batch: loader.batch_size must be even, "
                f"got {self.loader.batch_size}"
            )
