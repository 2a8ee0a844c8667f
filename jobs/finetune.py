"""``vmae finetune --config configs/finetune/<name>.yaml [k=v ...] [--address ADDR] [--resume]``.

Supervised finetuning of a ``VideoMAEClassifier`` on labelled shards with Ray Train, wired exactly like
``vmae pretrain`` (whose pieces it imports): a ``TorchTrainer`` over ``ScalingConfig`` workers (gloo on CPU,
NCCL on GPU, elastic when ``scaling.min_workers`` is set), ``FailureConfig`` retries from the latest
checkpoint, ``CheckpointConfig(num_to_keep)``, run directory ``storage_path/name`` on a local folder or S3.
``--resume`` continues that run directory (refused when absent; an existing one is refused without it).

When the schedule completes, rank 0 writes the classifier to ``<run dir>/final`` in our checkpoint format
(``model.save_checkpoint``), which ``vmae eval`` and ``model.load_checkpoint`` read.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from jobs.config import load_config, save_config, to_dict
from jobs.finetune_config import FinetuneConfig
from jobs.pretrain import AWS_ENV, local_log_dir, run_exists, storage_filesystem
from pipeline import storage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML under configs/finetune/")
    parser.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. pretrained=runs/pt/step_00000100")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    parser.add_argument("--resume", action="store_true", help="continue the run in storage_path/name")


def final_url(cfg: FinetuneConfig) -> str:
    """Absolute URL of the finished classifier (workers may run in another working directory)."""
    if storage.protocol(cfg.storage_path) == "file":
        return os.path.join(os.path.abspath(cfg.storage_path), cfg.name, "final")
    return cfg.final_url


def fit(cfg: FinetuneConfig, *, resume: bool = False) -> Any:
    """Run (or continue) finetuning; returns the ``ray.train.Result``. Starts a local Ray if none is up."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.finetune_loop import finetune_loop_per_worker

    exists = run_exists(cfg)
    if exists and not resume:
        raise ValueError(
            f"run {cfg.run_url!r} already exists; pass --resume to continue it or choose another name"
        )
    if resume and not exists:
        raise ValueError(f"--resume: no checkpoint found in {cfg.run_url!r}; drop --resume to start the run")
    if cfg.pretrained and not resume:
        from jobs.finetune_loop import init_classifier

        init_classifier(cfg)  # a wrong path or architecture fails here, not on every worker
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
    trainer = TorchTrainer(
        finetune_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "log_dir": log_dir, "final_url": final_url(cfg)},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
    )
    result = trainer.fit()
    if storage.protocol(cfg.storage_path) != "file" and os.path.isdir(log_dir):
        fs_remote, remote = storage.get_fs(storage.join(cfg.run_url, "logs"))
        fs_remote.put(log_dir + "/", remote, recursive=True)
    return result


def run(args: argparse.Namespace) -> int:
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    if args.address:
        import ray

        ray.init(address=args.address)
    result = fit(cfg, resume=args.resume)
    metrics = result.metrics or {}
    done = storage.exists(storage.join(final_url(cfg), "vmae.json"))
    print(
        f"finetune {cfg.name}: step {metrics.get('step')} loss {metrics.get('loss')} "
        f"train_top1 {metrics.get('train_top1')} classifier {final_url(cfg) if done else '(not finished)'}"
    )
    return 0
