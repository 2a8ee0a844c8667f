"""Driver side of a training run: turn a ``TrainConfig`` and a task into a Ray Train V2 ``TorchTrainer`` and
run it (``vmae pretrain`` and ``vmae finetune`` both go through :func:`fit`).

Wiring: workers (gloo on CPU, NCCL on GPU), elastic ``ScalingConfig(num_workers=(min, max))``,
``FailureConfig`` (worker failures and node preemptions are retried from the latest checkpoint),
``CheckpointConfig(num_to_keep=K)``, storage on a local folder or S3. Every worker runs
``jobs.trainer.train_loop_per_worker`` with the task class.

Resume: Ray Train V2 dropped ``resume_from_checkpoint=``; a run started again with the same ``name`` and
``storage_path`` restores its checkpoint list from the run directory and hands the latest checkpoint to the
workers. So ``--resume`` means "reuse that run directory"; without it an existing run directory is refused,
so a typo'd name never silently continues (or clobbers) another run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from typing import Any

from jobs.config import save_config, to_dict
from jobs.train_config import TrainConfig
from pipeline import storage

AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def storage_filesystem(storage_path: str) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Ray Train. S3 URLs get an explicit pyarrow S3
    filesystem so a custom endpoint (``AWS_ENDPOINT_URL``: MinIO, moto) is honoured."""
    proto = storage.protocol(storage_path)
    if proto not in ("s3", "s3a"):
        return (os.path.abspath(storage_path) if proto == "file" else storage_path), None
    import pyarrow.fs

    opts = storage.storage_options(storage_path)
    endpoint = opts.get("endpoint_url")
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        scheme, host = endpoint.split("://", 1) if "://" in endpoint else ("https", endpoint)
        kwargs.update(endpoint_override=host, scheme=scheme)
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(
            access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY")
        )
    return storage_path.split("://", 1)[1].rstrip("/"), pyarrow.fs.S3FileSystem(**kwargs)


def run_exists(cfg: TrainConfig) -> bool:
    """Whether ``storage_path/name`` already holds a Ray Train run (its checkpoint-manager snapshot or a
    checkpoint)."""
    from jobs.checkpointing import latest_checkpoint_dir

    if latest_checkpoint_dir(cfg.run_url) is not None:
        return True
    fs, path = storage.get_fs(cfg.run_url)
    try:
        return any("checkpoint_manager_snapshot" in p for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


def local_log_dir(cfg: TrainConfig) -> str:
    """Where rank 0 writes metrics.jsonl / TensorBoard / PNGs: ``<run dir>/logs`` on local storage, a local
    folder for remote storage (synced to ``<run dir>/logs`` when the run ends)."""
    if storage.protocol(cfg.storage_path) == "file":
        return os.path.join(os.path.abspath(cfg.storage_path), cfg.name, "logs")
    tag = hashlib.sha1(cfg.run_url.encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), "vmae-runs", f"{cfg.name}-{tag}", "logs")


def check_run_dir(cfg: TrainConfig, *, resume: bool) -> None:
    """Refuse to clobber an existing run without ``--resume`` and to resume a run that is not there."""
    exists = run_exists(cfg)
    if exists and not resume:
        raise ValueError(
            f"run {cfg.run_url!r} already exists; pass --resume to continue it or choose another name"
        )
    if resume and not exists:
        raise ValueError(f"--resume: no checkpoint found in {cfg.run_url!r}; drop --resume to start the run")


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Resolve relative local input paths against the driver's working directory before the config is
    shipped to Ray Train workers, which run elsewhere (``loader.manifest=data/shards/manifest.json``)."""
    loader = dataclasses.replace(
        cfg.loader,
        manifest=storage.absolute(cfg.loader.manifest),
        subset=storage.absolute(cfg.loader.subset) if cfg.loader.subset else None,
    )
    changes: dict[str, Any] = {"loader": loader}
    if getattr(cfg, "pretrained", None):
        changes["pretrained"] = storage.absolute(cfg.pretrained)
    return dataclasses.replace(cfg, **changes)


def export_url(cfg: TrainConfig) -> str:
    """Absolute URL of the finished run's exported model (workers may run in another working directory)."""
    if storage.protocol(cfg.storage_path) == "file":
        return os.path.join(os.path.abspath(cfg.storage_path), cfg.name, "final")
    return cfg.final_url


def fit(cfg: TrainConfig, task_cls: Any, *, resume: bool = False) -> Any:
    """Run (or continue) ``cfg`` with ``task_cls`` (a ``jobs.trainer.Task`` class) on a Ray Train
    ``TorchTrainer`` built from the config's ``scaling`` / ``failure`` / ``checkpoint`` sections; returns the
    ``ray.train.Result``. Saves the resolved config, starts a local Ray if none is up, and uploads rank 0's
    local logs when the run lives on remote storage."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.trainer import train_loop_per_worker

    check_run_dir(cfg, resume=resume)
    cfg = with_absolute_paths(cfg)
    save_config(cfg, cfg.run_url, name="config.resume.yaml" if resume else "config.yaml")
    if not ray.is_initialized():
        ray.init(include_dashboard=False)

    s, f = cfg.scaling, cfg.failure
    scaling = ray.train.ScalingConfig(
        num_workers=(s.min_workers, s.num_workers) if s.min_workers is not None else s.num_workers,
        use_gpu=s.use_gpu,
        resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
        placement_strategy=s.placement_strategy,
        elastic_resize_monitor_interval_s=s.elastic_resize_monitor_interval_s,
    )
    failure = ray.train.FailureConfig(
        max_failures=f.max_failures,
        max_preemption_failures=f.max_preemption_failures,
        preemption_grace_s=f.preemption_grace_s,
        relax_collectives_on_preemption=f.relax_collectives_on_preemption,
    )
    path, fs = storage_filesystem(cfg.storage_path)
    env = {k: os.environ[k] for k in AWS_ENV if k in os.environ}
    run_config = ray.train.RunConfig(
        name=cfg.name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=failure,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        worker_runtime_env={"env_vars": env} if env else None,
    )
    log_dir = local_log_dir(cfg)
    loop_config = {"task": task_cls, "cfg": to_dict(cfg), "log_dir": log_dir, "export_url": export_url(cfg)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
    )
    result = trainer.fit()
    if storage.protocol(cfg.storage_path) != "file" and os.path.isdir(log_dir):
        fs_remote, remote = storage.get_fs(storage.join(cfg.run_url, "logs"))
        fs_remote.put(log_dir + "/", remote, recursive=True)
    return result
