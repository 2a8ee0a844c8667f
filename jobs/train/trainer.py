"""The one training loop (torchtitan's ``Trainer``) that Ray Train runs on every worker, for every task.

A *task* supplies what differs between pretraining (``jobs.train.pretrain.PretrainTask``) and finetuning
(``jobs.train.finetune.FinetuneTask``): its model, its optimizer's parameter groups, the clips it consumes (masked or
whole), the forward of one micro-batch with its extra statistics, and what the schedule counts (clips or
videos). Everything else lives here once: the data stream, autocast and DDP/FSDP wrapping, gradient
accumulation, the samples-keyed schedule and resize policy (``jobs.train.optim``), the fault hook, metrics, the
checkpoint report, exact resume and the exported model at the end.

Where it runs: a session (``jobs.train.session``: Ray Train's on each worker, or ``LocalSession`` in one
process, :func:`run_local`) gives it rank, world size, device and the latest checkpoint, and takes its reports.
Its data stream (``jobs.train.prefetch``) hands each step a batch whose clips are already on the device; a
step reads nothing back from the device (loss, statistics, grad norm stay device tensors until a logged step).

State: ``Trainer.state`` is the one dict of state-holding parts — ``model``, ``optimizer``, ``schedule``,
``scaler``, ``progress``, ``loader``, ``rng`` — saved and restored through one path
(``jobs.train.checkpointing.save_train_state`` / ``load_train_state``). On (re)start the trainer takes
``ray.train.get_checkpoint()`` and restores every part, so a restarted run replays exactly the steps an
uninterrupted one would have taken (same world size), or re-splits the data and rescales the lr by the resize
policy (different world size).

One optimizer step = ``accum_steps`` micro-batches of ``loader.batch_size`` clips on each of ``world_size``
workers. Legend: ``B`` clips per worker per micro-batch, ``L`` tokens per clip; ``video [B, 3, T, H, W]``
float32 (ImageNet normalised), ``mask [B, L]`` bool (True = masked).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from typing import Any, Protocol

import ray
import torch
import torch.distributed as dist
from torch import nn

from jobs.config import from_dict, save_config
from jobs.train import checkpointing as ckpt
from jobs.train.config import TrainConfig
from jobs.train.lineage import build_lineage
from jobs.train.metrics import MetricsLogger, StepTimer, device_peak_flops, mfu
from jobs.train.optim import BatchPlan, SampleCosineSchedule, batch_plan, schedule_samples
from jobs.train.prefetch import DEVICE_KEYS, Prefetcher
from jobs.train.remote_decode import make_loader
from jobs.train.session import LocalSession, RayTrainSession, Session, autocast_dtype, task_class, wrap
from model.checkpoint import save_checkpoint
from pipeline import storage
from pipeline.loader.masking import ClipSpec

UNITS = ("clips", "videos")
log = logging.getLogger(__name__)


class Task(Protocol):
    """What a training task supplies to the :class:`Trainer`."""

    cfg: TrainConfig
    unit: str  # what the schedule and throughput count per sample: "clips" or "videos"

    def clip_spec(self) -> ClipSpec:
        """The clips the loader makes for this task (from the model config)."""

    def build_model(self, *, resuming: bool) -> nn.Module:
        """The plain model on CPU; ``resuming``: its weights will come from the run's own checkpoint."""

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer: ...

    def forward(
        self, model: nn.Module, batch: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch (called under autocast) and statistics to sum over micro-batches and
        average over ranks for :meth:`summarize`."""

    def summarize(self, stats: dict[str, float]) -> dict[str, float]:
        """Extra metrics of a logged step from the rank-averaged statistics."""

    def flops_per_sample(self) -> float | None:
        """Training FLOPs per counted sample, for MFU (``None``: not reported)."""

    def on_log(self, step: int, log_dir: str, model: nn.Module) -> None:
        """Rank 0, at a logged step: extra artefacts (e.g. a reconstruction PNG)."""


def mean_over_ranks(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """The mean over ranks of each value (floats or 0-d tensors on any device, DTensors too: FSDP2's grad
    norm); one host sync."""
    from torch.distributed.tensor import (
        DTensor,  # local import: ~0.5 s of start-up, only FSDP2 makes DTensors
    )

    plain = [v.full_tensor() if isinstance(v, DTensor) else v for v in values]
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device).reshape(()) for v in plain])
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def maybe_kill(cfg: TrainConfig, rank: int, step: int) -> None:
    """Fault-injection hook (tests): SIGKILL this worker once, before the optimizer step ``step``."""
    f = cfg.fault
    if f.rank is None or f.rank != rank or f.step != step or f.marker is None or os.path.exists(f.marker):
        return
    with open(f.marker, "w") as fh:
        fh.write(f"killed rank {rank} at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    schedule: SampleCosineSchedule,
    progress: ckpt.TrainProgress,
    grad_clip: float | None,
    global_batch: int,
) -> tuple[float, float]:
    """Clip, step, advance step/samples and the samples-keyed schedule. Returns (grad_norm, lr used); the
    grad norm stays a device tensor (read at logged steps only)."""
    grad_norm: torch.Tensor | float = float("nan")
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).detach()
    lr = schedule.get_last_lr()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.samples_seen += global_batch
    schedule.step(progress.samples_seen)
    return grad_norm, lr


class Trainer:
    """Builds every part of a run for ``task`` in ``session`` (default: this Ray Train worker), restores them
    from the run's latest checkpoint if there is one, and trains (:meth:`fit`)."""

    def __init__(
        self,
        task: Task,
        *,
        log_dir: str,
        export_url: str,
        session: Session | None = None,
        run_url: str | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> None:
        if task.unit not in UNITS:
            raise ValueError(f"task.unit must be one of {UNITS}, got {task.unit!r}")
        self.started = time.perf_counter()
        cfg = self.cfg = task.cfg
        self.task, self.log_dir, self.export_url, self.lineage = task, log_dir, export_url, lineage
        if session is None:
            session = RayTrainSession(async_upload=cfg.checkpoint.upload == "async")
        self.session = session
        self.run_url = run_url or getattr(session, "run_url", None) or cfg.run_url
        self.rank, self.world = rank, world = session.rank, session.world_size
        self.device = session.device
        self.sharded = cfg.parallel.strategy == "fsdp"
        per_worker = cfg.loader.batch_size if task.unit == "clips" else cfg.loader.videos_per_batch
        self.plan: BatchPlan = batch_plan(cfg.optim, per_worker_batch=per_worker, world_size=world)
        nominal = batch_plan(cfg.optim, per_worker_batch=per_worker, world_size=cfg.scaling.num_workers)

        with session.checkpoint() as cdir:
            torch.manual_seed(cfg.seed)  # identical init on every rank (FSDP does not broadcast)
            model = task.build_model(resuming=cdir is not None)
            loader = make_loader(cfg.loader, task.clip_spec(), rank=rank, world_size=world)
            self.warmup_samples, self.total_samples = schedule_samples(
                cfg.schedule, dataset_size=loader.num_samples, nominal_global_batch=nominal.global_batch
            )
            model = wrap(model, cfg.parallel, session)
            optimizer = task.build_optimizer(model, self.plan.peak_lr)
            schedule = SampleCosineSchedule(
                optimizer,
                peak_lr=self.plan.peak_lr,
                warmup_samples=self.warmup_samples,
                total_samples=self.total_samples,
                min_lr=cfg.schedule.min_lr,
            )
            self.amp_dtype = autocast_dtype(cfg.parallel.precision, self.device)
            scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
            ckpt.seed_everything(cfg.seed * 100_003 + rank)
            self.state: dict[str, Any] = {
                "model": model,
                "optimizer": optimizer,
                "schedule": schedule,
                "scaler": scaler,
                "progress": ckpt.TrainProgress(world_size=world),
                "loader": Prefetcher(
                    loader, self.device, keys=DEVICE_KEYS
                ),  # checkpoints what steps consumed
                "rng": ckpt.RNGState(),
            }
            if cdir is not None:
                self._restore(cdir)

    def _restore(self, cdir: str) -> None:
        """Load every part from the run's latest checkpoint ``cdir``; if it does not load (truncated, corrupt,
        half-written), fall back to the newest older ``step_*`` of the run that does, saying which one was
        skipped and why. ``ValueError`` naming the run when none loads."""
        cfg, rank = self.cfg, self.rank

        def load(directory: str) -> None:
            ckpt.load_train_state(
                directory, self.state, rank=rank, world_size=self.world, sharded=self.sharded,
                reseed=lambda step: ckpt.seed_everything(cfg.seed * 100_003 + rank + 7919 * step),
            )  # fmt: skip

        try:
            load(cdir)
            return
        except Exception as e:  # noqa: BLE001 - any failure to read it means "try an older one"
            first = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        older = ckpt.checkpoint_dirs(self.run_url)[1:]  # the newest is the one that just failed
        log.warning("rank %d: latest checkpoint of %s does not load (%s); trying %d older one(s)",
                    rank, self.run_url, first, len(older))  # fmt: skip
        for url in older:
            try:
                with ckpt.local_copy(url) as d:
                    load(d)
            except Exception as e:  # noqa: BLE001
                log.warning("rank %d: skipped checkpoint %s: %s: %s", rank, url, type(e).__name__, e)
                continue
            log.warning("rank %d: resumed from %s (newer checkpoints did not load)", rank, url)
            return
        raise ValueError(f"no checkpoint of {self.run_url} loads (latest: {first})")

    # ---- one optimizer step ------------------------------------------------------------------------------
    def _train_step(self, stream: Prefetcher, timer: StepTimer, *, last: bool = False) -> dict[str, Any]:
        """``accum_steps`` micro-batches, then the optimizer step; returns what the step measured. Nothing is
        read back from the device: loss, statistics and grad norm stay device tensors until a logged step
        (:meth:`_metrics`); the data wait is the host's time in ``stream.next`` (the loader, not the GPU).
        ``last``: the run's final step (the stream reads nothing beyond its last batch)."""
        cfg, model, accum = self.cfg, self.state["model"], self.cfg.optim.accum_steps
        timer.start()
        model.train()
        loss_sum: torch.Tensor | float = 0.0
        stats: dict[str, Any] = {}
        epoch = 0
        for micro in range(accum):
            t0 = time.perf_counter()
            last_micro = micro == accum - 1
            epoch, batch = stream.take()
            timer.data(time.perf_counter() - t0)
            if cfg.fault.keys_log:
                self._log_keys(epoch, batch)
            if self.sharded and accum > 1:  # FSDP2: reduce-scatter gradients on the last micro-batch only
                model.set_requires_gradient_sync(last_micro)
            no_sync = (
                model.no_sync() if hasattr(model, "no_sync") and not last_micro else contextlib.nullcontext()
            )
            autocast = torch.autocast(
                self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
            )
            with no_sync, autocast:
                loss, micro_stats = self.task.forward(model, batch, self.device)
            self.state["scaler"].scale(loss / accum).backward()
            loss_sum = loss_sum + loss.detach().float()
            if not (last and last_micro):  # the GPU runs this micro-batch while the host waits for the next
                t0 = time.perf_counter()
                stream.fill()
                timer.data(time.perf_counter() - t0)
            for k, v in micro_stats.items():
                stats[k] = stats.get(k, 0.0) + v
        maybe_kill(cfg, self.rank, self.state["progress"].step + 1)
        grad_norm, lr = optimizer_step(
            model, self.state["optimizer"], self.state["scaler"], self.state["schedule"],
            self.state["progress"], cfg.optim.grad_clip, self.plan.global_batch,
        )  # fmt: skip
        _, _ = timer.stop()
        return {"loss": loss_sum / accum, "stats": stats, "epoch": epoch, "lr": lr, "grad_norm": grad_norm,
                "data_s": timer.data_s}  # fmt: skip

    def _log_keys(self, epoch: int, batch: dict[str, Any]) -> None:
        """Test hook (``fault.keys_log``): which valid samples this rank trains on at the next step."""
        os.makedirs(self.cfg.fault.keys_log, exist_ok=True)
        keys = [k for k, ok in zip(batch["key"], batch["valid"].tolist(), strict=True) if ok]
        rec = {"step": self.state["progress"].step + 1, "epoch": epoch, "world": self.world, "keys": keys,
               "t": time.time()}  # fmt: skip
        path = os.path.join(self.cfg.fault.keys_log, f"rank_{self.rank}-{os.getpid()}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _metrics(
        self, out: dict[str, Any], interval: dict[str, float], peak_total: float | None
    ) -> dict[str, float]:
        """Rank-averaged metrics of a logged step (collective: every rank calls it; the one host sync of the
        interval). Throughput and data-wait fraction are over the ``interval`` since the last logged step."""
        names = sorted(out["stats"])
        wall = max(time.perf_counter() - interval["t0"], 1e-9)
        loss, wait, grad_norm, *stats = mean_over_ranks(
            [out["loss"], interval["data_s"] / wall, out["grad_norm"], *(out["stats"][k] for k in names)],
            self.device,
        )
        progress, unit = self.state["progress"], self.task.unit
        per_s = self.plan.global_batch * interval["steps"] / wall
        metrics = {"loss": loss, **self.task.summarize(dict(zip(names, stats, strict=True))), "lr": out["lr"],
                   f"{unit}_per_s": per_s}  # fmt: skip
        flops = self.task.flops_per_sample()
        if flops is not None and peak_total is not None:
            metrics["mfu"] = mfu(per_s, flops, peak_total)
        cuda = self.device.type == "cuda"
        metrics.update(
            elapsed_s=time.perf_counter()
            - self.started,  # since the trainer was built (Ray's start-up is not in it)
            data_wait_frac=min(wait, 1.0),
            grad_norm=grad_norm,
            samples_seen=float(progress.samples_seen),
            epoch=float(out["epoch"]),
            world_size=float(self.world),
            skipped=float(self.state["loader"].stats["skipped"]),
            peak_mem_gb=torch.cuda.max_memory_allocated(self.device) / 1e9 if cuda else 0.0,
        )
        return metrics

    # ---- checkpoints and the exported model ---------------------------------------------------------------
    def report_checkpoint(self, report: dict[str, Any]) -> None:
        """Write this rank's part of the train state into a temporary folder and hand it to the session."""
        tmp = tempfile.mkdtemp(prefix="vmae-ckpt-")
        try:
            ckpt.save_train_state(tmp, self.state, rank=self.rank, sharded=self.sharded, lineage=self.lineage)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.session.report(report, tmp, self.state["progress"].step)

    def export(self) -> None:
        """Rank 0 writes the finished model to ``export_url`` (``model.save_checkpoint``). Sharded (FSDP2)
        weights are first gathered into a full CPU state dict, a collective every rank joins."""
        model = self.state["model"]
        if not self.sharded:
            if self.rank == 0:
                save_checkpoint(ckpt.unwrap(model), self.export_url, lineage=self.lineage)
            return
        # local import: torch.distributed.checkpoint costs ~0.5 s of start-up and only sharded runs need it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            plain = self.task.build_model(resuming=True)
            plain.load_state_dict(full)
            save_checkpoint(plain, self.export_url, lineage=self.lineage)

    # ---- the loop ----------------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg, progress = self.cfg, self.state["progress"]
        logger = MetricsLogger(self.log_dir, tensorboard=cfg.metrics.tensorboard) if self.rank == 0 else None
        peak_total = None
        if self.task.flops_per_sample() is not None:
            peak = device_peak_flops(self.device, cfg.metrics.peak_flops_per_worker)
            peak_total = mean_over_ranks([peak], self.device)[0] * self.world
        stream, timer = self.state["loader"], StepTimer()
        interval = {"t0": time.perf_counter(), "steps": 0, "data_s": 0.0}
        stop_step = cfg.stop_at_step if cfg.stop_at_step is not None else float("inf")
        preempt_saved = False
        try:
            while progress.samples_seen < self.total_samples and progress.step < stop_step:
                last = (
                    progress.samples_seen + self.plan.global_batch >= self.total_samples
                    or progress.step + 1 >= stop_step
                )
                out = self._train_step(stream, timer, last=last)
                interval["steps"] += 1
                interval["data_s"] += out["data_s"]
                done = progress.samples_seen >= self.total_samples
                save = (
                    progress.step % cfg.checkpoint.every_steps == 0
                    or (done and cfg.checkpoint.at_end)
                    or progress.step >= stop_step
                )
                poll = cfg.failure.preemption_poll_steps
                if poll and progress.step % poll == 0 and not preempt_saved and self.session.preempted():
                    save = preempt_saved = True
                if not (save or progress.step % cfg.metrics.log_every == 0 or done):
                    continue
                metrics = self._metrics(out, interval, peak_total)
                interval = {"t0": time.perf_counter(), "steps": 0, "data_s": 0.0}
                if logger is not None:
                    logger.log(progress.step, metrics)
                    if cfg.metrics.image_every and progress.step % cfg.metrics.image_every == 0:
                        self.task.on_log(progress.step, logger.log_dir, ckpt.unwrap(self.state["model"]))
                    self._sync_logs()
                report = {"step": progress.step, **metrics}
                if save:
                    self.report_checkpoint(report)
                else:
                    self.session.report(report, None, progress.step)
            if progress.samples_seen >= self.total_samples:
                self.export()
        finally:
            stream.close()
            if logger is not None:
                logger.close()
                self._sync_logs()

    def _sync_logs(self) -> None:
        """Rank 0: with the run on an object store, copy the local log folder (metrics.jsonl, TensorBoard,
        PNGs) to ``<run>/logs`` — from here, since the driver may run on a node that cannot see it."""
        if storage.protocol(self.run_url) == "file" or not os.path.isdir(self.log_dir):
            return
        fs, remote = storage.get_fs(storage.join(self.run_url, "logs"))
        storage.retry(lambda: fs.put(self.log_dir.rstrip("/") + "/", remote + "/", recursive=True))


def run_local(task: Task, *, run_url: str, log_dir: str, export_url: str, device: str | None = None) -> None:
    """Run ``task`` to its end (or ``stop_at_step``) in this process with a :class:`LocalSession` on
    ``run_url``, resuming from its latest checkpoint. The resolved config is saved in the run directory; every
    checkpoint and the export record the run's lineage (``jobs.train.lineage``)."""
    save_config(task.cfg, run_url)
    session = LocalSession(run_url, num_to_keep=task.cfg.checkpoint.num_to_keep, device=device)
    Trainer(
        task, log_dir=log_dir, export_url=export_url, session=session, lineage=build_lineage(task.cfg)
    ).fit()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"task": the task class as "module:Class", "cfg": its resolved config
    as a dict, "log_dir": where rank 0 logs, "export_url": where rank 0 writes the finished model, "lineage": what
    the driver recorded (``jobs.train.lineage.build_lineage``), "credentials": a Ray object of storage credentials}``."""
    if config.get("credentials") is not None:
        storage.install_credentials(ray.get(config["credentials"]))
    task_cls = task_class(config["task"])
    task = task_cls(from_dict(task_cls.config_class, config["cfg"]))
    Trainer(
        task, log_dir=config["log_dir"], export_url=config["export_url"], run_url=config.get("run_url"),
        lineage=config.get("lineage"),
    ).fit()  # fmt: skip
