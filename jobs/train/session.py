"""Where the one trainer (``jobs.train.trainer.Trainer``) runs, and how its model is wrapped there.

A :class:`Session` tells the trainer its rank, world size and device, hands it the run's latest checkpoint and
takes its reports. :class:`RayTrainSession` is Ray Train's (``vmae pretrain`` / ``vmae finetune``: elastic, fault
tolerant, multi-node); :class:`LocalSession` runs the same loop in one process (any Ray task or actor, or none)
with checkpoints written straight to the run directory — for the many small single-worker runs of a study,
which would otherwise pay Ray Train's start-up (~15 s per run on a 2-core box) each time.

:func:`wrap` is the model as each worker runs it (compile / activation checkpointing / FSDP2, then the session's
data-parallel wrapper); :func:`autocast_dtype` resolves ``parallel.precision`` for the session's device.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
from collections.abc import Iterator
from typing import Any, Protocol

import ray.train
import ray.train.torch
import torch
from torch import nn

from jobs.train import checkpointing as ckpt
from jobs.train.config import ParallelConfig
from pipeline import storage


class Session(Protocol):
    """Where a :class:`Trainer` runs."""

    rank: int
    world_size: int
    device: torch.device

    def checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """Context manager yielding a local directory of the run's latest checkpoint, or None."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        """Hand over a logged step's metrics and, when given, the folder holding this rank's train state
        (the session owns it from then on and deletes it when done with it)."""

    def preempted(self) -> bool:
        """Whether the node is about to be reclaimed (save a checkpoint now)."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """The data-parallel wrapper of this session (DDP under Ray Train)."""


class RayTrainSession:
    """The trainer inside a Ray Train worker: rank, world and device from Ray Train's context, checkpoints
    through ``ray.train.report`` (Ray Train keeps the last ``num_to_keep`` in the run directory)."""

    def __init__(self, *, async_upload: bool = False) -> None:
        self.async_upload = async_upload
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[str | None]:
        ckpt_ = ray.train.get_checkpoint()
        if ckpt_ is None:
            yield None
            return
        with ckpt_.as_directory() as cdir:
            yield cdir

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        if self.async_upload:  # training goes on while Ray uploads; Ray deletes the folder afterwards
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                checkpoint_dir_name=ckpt.checkpoint_dir_name(step),
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                delete_local_checkpoint_after_upload=True,
            )
            return
        try:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                checkpoint_dir_name=ckpt.checkpoint_dir_name(step),
            )
        finally:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def preempted(self) -> bool:
        return ray.train.get_preemption_info() is not None

    def prepare(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model)


class LocalSession:
    """The trainer in this process alone (rank 0 of 1): the latest ``step_*`` checkpoint of ``run_url`` (local
    or remote) is its resume point; a reported checkpoint is copied to ``run_url/step_*`` complete before its
    ``trainer.pt`` marks it, then older ones beyond ``num_to_keep`` are deleted — the layout Ray Train writes,
    so a run started one way resumes the other way. ``device``: "cuda" when available unless given."""

    rank = 0
    world_size = 1

    def __init__(self, run_url: str, *, num_to_keep: int | None = None, device: str | None = None) -> None:
        self.run_url, self.num_to_keep = run_url, num_to_keep
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[str | None]:
        url = ckpt.latest_checkpoint_dir(self.run_url)
        if url is None:
            yield None
            return
        with ckpt.local_copy(url) as cdir:
            yield cdir

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        if checkpoint_dir is None:
            return

        try:
            self._copy(checkpoint_dir, step)
        finally:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def _copy(self, checkpoint_dir: str, step: int) -> None:
        url = storage.join(self.run_url, ckpt.checkpoint_dir_name(step))
        fs, path = storage.get_fs(url)
        names = sorted(os.listdir(checkpoint_dir), key=lambda n: n == ckpt.TRAINER_FILE)  # trainer.pt last
        for name in names:
            src = os.path.join(checkpoint_dir, name)
            if os.path.isdir(src):
                fs.put(src + "/", f"{path}/{name}/", recursive=True)
            else:
                storage.upload_file_atomic(src, storage.join(url, name))
        if self.num_to_keep is not None:
            run_fs, run_path = storage.get_fs(self.run_url)
            steps = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in run_fs.ls(run_path, detail=False)
                           if e.rstrip("/").rsplit("/", 1)[-1].startswith("step_"))  # fmt: skip
            for old in steps[: max(0, len(steps) - self.num_to_keep)]:
                run_fs.rm(f"{run_path}/{old}", recursive=True)

    def preempted(self) -> bool:
        return False

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``parallel.precision`` (``auto``: bf16 on GPU, none on CPU)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def wrap(model: nn.Module, p: ParallelConfig, session: Session) -> nn.Module:
    """The model as each worker runs it: ``model.parallelize`` (compile / activation checkpointing / FSDP2)
    when asked for, then the session's data-parallel wrapper (DDP under Ray Train) unless sharded."""
    device = session.device
    if p.strategy == "fsdp" or p.compile or p.activation_checkpointing:
        from model.parallelize import (
            parallelize,  # local import: FSDP/compile modules cost start-up; most runs use neither
        )

        model = parallelize(
            model.to(device),
            fsdp=p.strategy == "fsdp",
            compile=p.compile,
            activation_checkpointing=p.activation_checkpointing,
            param_dtype=autocast_dtype(p.precision, device) if p.strategy == "fsdp" else None,
        )
    if p.strategy == "ddp":
        model = session.prepare(model)
    return model


def task_name(task_cls: type) -> str:
    """``"module:Class"`` for a module-level task class, the form :func:`train_loop_per_worker` imports it by
    (a class defined inside a function has no such name: refused here, on the driver, not on every worker)."""
    name = f"{task_cls.__module__}:{task_cls.__qualname__}"
    if task_class(name) is not task_cls:
        raise ValueError(f"task {task_cls!r} is not importable as {name!r}: define it at module level")
    return name


def task_class(name: str) -> type | None:
    """The task class named ``"module:Class"`` (:func:`task_name`'s inverse); ``None`` if there is no such name."""
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr, None)
