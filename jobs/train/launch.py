"""Driver side of a training run: turn a ``TrainConfig`` and a task into a Ray Train V2 ``TorchTrainer`` and
run it (``vmae pretrain`` and ``vmae finetune`` both go through :func:`fit`, and share their command line:
:func:`add_fit_arguments`, :func:`run_fit`).

Wiring: workers (gloo on CPU, NCCL on GPU), elastic ``ScalingConfig(num_workers=(min, max))``,
``FailureConfig`` (worker failures and node preemptions are retried from the latest checkpoint),
``CheckpointConfig(num_to_keep=K)``, storage on a local folder or S3. Every worker runs
``jobs.train.trainer.train_loop_per_worker`` with the task class's name.

Resume: Ray Train V2 dropped ``resume_from_checkpoint=``; a run started again with the same ``name`` and
``storage_path`` restores its checkpoint list from the run directory and hands the latest checkpoint to the
workers. So ``--resume`` means "reuse that run directory"; without it an existing run directory is refused,
so a typo'd name never silently continues (or clobbers) another run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow.fs
import ray
import ray.train
from ray.autoscaler.sdk import request_resources
from ray.train.torch import TorchConfig, TorchTrainer
from tqdm import tqdm

from jobs.config import load_config, save_config, to_dict
from jobs.ray_utils import init_ray
from jobs.train.checkpointing import latest_checkpoint_dir
from jobs.train.config import TrainConfig
from jobs.train.lineage import build_lineage
from jobs.train.optim import batch_plan, schedule_samples
from pipeline import storage
from pipeline.loader.plan import load_shards


def storage_filesystem(storage_path: str) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Ray Train. S3 URLs get an explicit pyarrow S3
    filesystem so a custom endpoint (``AWS_ENDPOINT_URL``: MinIO, moto) is honoured."""
    proto = storage.protocol(storage_path)
    if proto not in ("s3", "s3a"):
        return (os.path.abspath(storage_path) if proto == "file" else storage_path), None
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
    if latest_checkpoint_dir(cfg.run_url) is not None:
        return True
    fs, path = storage.get_fs(cfg.run_url)
    try:
        return any("checkpoint_manager_snapshot" in p for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


def local_log_dir(cfg: TrainConfig) -> str:
    """Where rank 0 writes metrics.jsonl / TensorBoard / PNGs: ``<run dir>/logs`` on local storage, a local
    folder for remote storage (rank 0 copies it to ``<run dir>/logs`` at every logged step and at the end)."""
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


@contextlib.contextmanager
def progress(metrics_path: str, *, total_steps: int, name: str, unit: str) -> Iterator[None]:
    """While the body runs: a progress bar over optimizer steps (loss, throughput, ETA) fed by rank 0's
    ``metrics.jsonl``, and one summary line per logged step. Where the file is not visible from the driver
    (rank 0 on another node), nothing is shown."""
    stop = threading.Event()
    bar = tqdm(total=total_steps, desc=f"train {name}", unit="step", dynamic_ncols=True, disable=None)
    pos = os.path.getsize(metrics_path) if os.path.exists(metrics_path) else 0  # a resumed run appends

    def drain() -> None:
        nonlocal pos
        if not os.path.exists(metrics_path):
            return
        with open(metrics_path, "rb") as f:
            f.seek(pos)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a half-written last line is read again next time
        pos += len(complete)
        for line in complete.decode().splitlines():
            r = json.loads(line)
            bar.n = min(int(r["step"]), total_steps)
            rate = r.get(f"{unit}_per_s", 0.0)
            bar.set_postfix(loss=f"{r['loss']:.4f}", **{f"{unit}/s": f"{rate:.0f}"}, refresh=False)
            bar.refresh()
            bar.write(f"{name} step {r['step']}/{total_steps}: loss {r['loss']:.4f} lr {r['lr']:.2e} "
                      f"{rate:.1f} {unit}/s data-wait {r.get('data_wait_frac', 0):.0%}")  # fmt: skip

    def watch() -> None:
        while not stop.wait(1.0):
            drain()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        drain()
        bar.close()


def placeable(bundle: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many ``bundle``s fit on nodes with these total resources (each bundle on one node)."""
    return sum(int(min(node.get(k, 0.0) // v for k, v in bundle.items() if v > 0)) for node in nodes)


def wait_for_resources(cfg: TrainConfig, *, wait_s: float) -> None:
    """Make sure the cluster can place ``scaling.min_workers`` (else ``num_workers``) workers before Ray Train
    waits for them without a word: ask the autoscaler for them and wait up to ``wait_s``; ``ValueError``
    saying what is missing when they never come."""
    need = cfg.scaling.min_workers or cfg.scaling.num_workers
    bundle = cfg.worker_bundle

    def nodes() -> list[dict[str, float]]:
        return [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    if placeable(bundle, nodes()) >= need:
        return
    if wait_s > 0:
        request_resources(bundles=[bundle] * need)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if placeable(bundle, nodes()) >= need:
                return
            time.sleep(5)
    have = placeable(bundle, nodes())
    raise ValueError(
        f"scaling: {need} workers of {bundle} cannot be placed: the cluster's nodes hold {have} after waiting "
        f"{wait_s:.0f} s; lower scaling.min_workers / scaling.cpus_per_worker or add nodes"
    )


def export_url(cfg: TrainConfig) -> str:
    """Absolute URL of the finished run's exported model (workers may run in another working directory)."""
    if storage.protocol(cfg.storage_path) == "file":
        return os.path.join(os.path.abspath(cfg.storage_path), cfg.name, "final")
    return cfg.final_url


def fit(cfg: TrainConfig, task_cls: Any, *, resume: bool = False) -> Any:
    """Run (or continue) ``cfg`` with ``task_cls`` (a module-level ``jobs.train.trainer.Task`` class: the workers
    import it by name) on a Ray Train ``TorchTrainer`` built from the config's ``scaling`` / ``failure`` /
    ``checkpoint`` sections; returns the ``ray.train.Result``. Saves the resolved config, starts a local Ray if
    none is up, and uploads rank 0's local logs when the run lives on remote storage."""
    from jobs.train.session import task_name
    from jobs.train.trainer import train_loop_per_worker

    task = task_name(task_cls)  # before anything is written or started: a task the workers cannot import

    storage.check_bucket(cfg.storage_path)
    check_run_dir(cfg, resume=resume)
    cfg = with_absolute_paths(cfg)
    shards = load_shards(
        cfg.loader
    )  # a missing manifest or subset: one clear error here, not N worker retries
    save_config(cfg, cfg.run_url, name="config.resume.yaml" if resume else "config.yaml")
    # log_to_driver off: Ray's per-rank detail stays in its logs; the user sees :func:`progress`.
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls every second
    # (without it, a "Failed to query Ray Train Controller actor state" warning each second).
    started = init_ray(include_dashboard=True, log_to_driver=False)
    wait_for_resources(
        cfg, wait_s=0.0 if started else cfg.scaling.resource_wait_s
    )  # our own cluster never grows
    s, f = cfg.scaling, cfg.failure
    scaling = ray.train.ScalingConfig(
        num_workers=(s.min_workers, s.num_workers) if s.min_workers is not None else s.num_workers,
        use_gpu=s.use_gpu,
        resources_per_worker=cfg.worker_bundle,
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
    run_config = ray.train.RunConfig(
        name=cfg.name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=failure,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
    )
    log_dir = local_log_dir(cfg)
    creds = storage.credentials_from_env()  # a Ray object, not runtime_env: kept out of job metadata and logs
    run_url = (
        os.path.dirname(export_url(cfg)) if storage.protocol(cfg.storage_path) == "file" else cfg.run_url
    )
    # the task goes by name: Ray Train's controller unpickles this config too, and the class would make it import
    # the task's module (timm, torchvision, the model, the loader: ~3 s of CPU per run on 2 cores) for nothing
    loop_config = {"task": task, "cfg": to_dict(cfg), "log_dir": log_dir, "export_url": export_url(cfg),
                   "run_url": run_url, "lineage": build_lineage(cfg),
                   "credentials": ray.put(creds) if creds else None}  # fmt: skip
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
    )
    per_sample = cfg.loader.batch_size if task_cls.unit == "clips" else cfg.loader.videos_per_batch
    nominal = batch_plan(cfg.optim, per_worker_batch=per_sample, world_size=cfg.scaling.num_workers)
    _, total = schedule_samples(cfg.schedule, dataset_size=sum(len(x.keys) for x in shards),
                                nominal_global_batch=nominal.global_batch)  # fmt: skip
    steps = cfg.stop_at_step or -(-total // nominal.global_batch)
    with progress(
        os.path.join(log_dir, "metrics.jsonl"), total_steps=steps, name=cfg.name, unit=task_cls.unit
    ):
        result = trainer.fit()
    return result


def add_fit_arguments(parser: argparse.ArgumentParser, config_dir: str, *, example: str) -> None:
    """The arguments of a training command (``vmae pretrain``, ``vmae finetune``); ``example`` an override."""
    parser.add_argument("--config", required=True, help=f"YAML under {config_dir}/")
    parser.add_argument("overrides", nargs="*", help=f"a.b=c overrides, e.g. {example}")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    parser.add_argument("--resume", action="store_true", help="continue the run in storage_path/name")


def run_fit(
    args: argparse.Namespace,
    config_cls: type,
    fit_fn: Callable[..., Any],
    *,
    command: str,
    shown: Callable[[Any], dict[str, Any]],
    product: str,
) -> int:
    """Run a training command: load ``config_cls`` from ``--config`` and the overrides, join ``--address``
    (else :func:`fit` starts a local Ray), ``fit_fn(cfg, resume=...)``, then print one line: ``<command>
    <name>: step S loss L <shown(result) as key value> <product> <exported model URL | (not finished)>``."""
    cfg = load_config(config_cls, args.config, args.overrides)
    if args.address:
        init_ray(args.address)
    result = fit_fn(cfg, resume=args.resume)
    metrics = result.metrics or {}
    fields = {"step": metrics.get("step"), "loss": metrics.get("loss"), **shown(result)}
    final = (
        export_url(cfg) if storage.exists(storage.join(export_url(cfg), "vmae.json")) else "(not finished)"
    )
    print(f"{command} {cfg.name}: " + " ".join(f"{k} {v}" for k, v in fields.items()) + f" {product} {final}")
    return 0
