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

from jobs.config import load_config
from jobs.finetune_config import FinetuneConfig
from jobs.pretrain import check_run_dir, run_trainer
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
    from jobs.finetune_loop import finetune_loop_per_worker

    check_run_dir(cfg, resume=resume)
    if cfg.pretrained and not resume:
        from jobs.finetune_loop import init_classifier

        init_classifier(cfg)  # a wrong path or architecture fails here, not on every worker
    return run_trainer(cfg, finetune_loop_per_worker, {"final_url": final_url(cfg)}, resume=resume)


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
