"""``PretrainConfig``: one frozen tree for ``vmae pretrain`` (YAML in ``configs/pretrain/``).

Why its own module: the driver (``jobs.pretrain``) and the per-worker loop (``jobs.train_loop``) both need it,
and the loop must be importable on Ray workers without the CLI. Sub-configs that belong to a single concern
(optimizer, schedule, checkpoints, metrics) live next to their code; the Ray-facing ones live here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jobs.checkpointing import CheckpointConfig
from jobs.metrics import MetricsConfig
from jobs.optim import OptimConfig, ScheduleConfig
from model.config import VideoMAEConfig, get_config
from pipeline.loader import LoaderConfig

STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def check_model_matches_loader(m: VideoMAEConfig, ld: LoaderConfig, *, masking: bool) -> None:
    """The loader must produce the clips (and, for pretraining, the masks) the model was built for."""
    pairs = [
        ("num_frames", m.num_frames, ld.num_frames),
        ("img_size / input_size", m.img_size, ld.input_size),
        ("patch_size", m.patch_size, ld.patch_size),
        ("tubelet_size", m.tubelet_size, ld.tubelet_size),
    ]
    if masking:
        pairs += [("mask_ratio", m.mask_ratio, ld.mask_ratio), ("mask_type", m.mask_type, ld.mask_type)]
    for what, model_value, loader_value in pairs:
        if model_value != loader_value:
            raise ValueError(
                f"model {what} = {model_value!r} but loader has {loader_value!r}; set both "
                "(model.overrides.* and loader.*) to the same value"
            )


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
    compile: bool = False
    activation_checkpointing: bool = False
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"parallel.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"parallel.precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScalingSection:
    """Ray Train workers. ``min_workers`` set -> elastic ``ScalingConfig(num_workers=(min, num_workers))``."""

    num_workers: int = 1
    min_workers: int | None = None
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    elastic_resize_monitor_interval_s: float = 60.0
    placement_strategy: str = "PACK"

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"scaling.num_workers must be >= 1, got {self.num_workers}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(
                f"scaling.min_workers must be in [1, num_workers={self.num_workers}], got {self.min_workers}"
            )
        if not self.cpus_per_worker > 0:
            raise ValueError(f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
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
    """Test hook: rank ``rank`` SIGKILLs itself at ``step`` once — only while ``marker`` does not exist."""

    rank: int | None = None
    step: int = 0
    marker: str | None = None

    def __post_init__(self) -> None:
        if self.rank is not None and (self.marker is None or self.step < 1):
            raise ValueError("fault: a kill needs a marker path (so it fires once) and step >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """A pretraining run: ``storage_path/name`` is the run directory (local folder or ``s3://``)."""

    name: str = "debug"
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
        check_model_matches_loader(self.model.build(), self.loader, masking=True)
        if self.parallel.strategy == "fsdp" and self.parallel.precision == "fp16":
            raise ValueError("parallel.precision fp16 needs a GradScaler; use bf16 with fsdp")

    @property
    def run_url(self) -> str:
        return self.storage_path.rstrip("/") + "/" + self.name
