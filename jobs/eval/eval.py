"""``vmae eval --config configs/eval/<name>.yaml [k=v ...] [--address ADDR]``: evaluate a checkpoint.

Three numbers from one checkpoint and two labelled shard sets (optionally subsets):

- multi-view top-1/top-5 of a classifier checkpoint on the test split: every video is cut into
  ``clips x crops`` deterministic views (:mod:`pipeline.loader.views`), the softmax of every view is averaged per video
  (``jobs.eval.metrics.aggregate_views``), for each configured view set (e.g. 2x3 and 5x3);
- a linear probe and a weighted kNN on frozen features of the train split, scored on the test split (any
  checkpoint: pretrained or finetuned; ``features.pool`` ``mean`` or ``time``, see :mod:`jobs.eval.features`).

Features come from :class:`jobs.eval.features.FeatureExtractor` (a Ray actor pool, or this process with
``actors: 0``); the checkpoint from ``jobs.train.checkpointing.load_any_checkpoint``. The report (JSON, any fsspec
URL) holds every number, the resolved config, the checkpoint and the sample counts. Python API for the study
runner: :func:`evaluate`.

Shapes: ``N`` videos, ``V`` views per video, ``D`` feature width, ``K`` classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from typing import Any

import torch
from torch import nn

from jobs.config import load_config, to_dict
from jobs.eval.features import FeatureExtractor, FeaturesSection, SplitSection
from jobs.eval.metrics import ProbeConfig, aggregate_views, knn_predict, linear_probe, topk_accuracy
from jobs.ray_utils import init_ray
from jobs.train.checkpointing import load_any_checkpoint
from jobs.train.lineage import describe
from model import VideoMAEClassifier
from pipeline import storage
from pipeline.checks import positive_int
from pipeline.loader.transforms import SAMPLING_RATE
from pipeline.loader.views import ViewSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KnnSection:
    k: int = 20
    temperature: float = 0.07

    def __post_init__(self) -> None:
        if self.k < 1 or not self.temperature > 0:
            raise ValueError(f"knn.k must be >= 1 and knn.temperature > 0, got {self.k} / {self.temperature}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What to evaluate. ``view_sets`` are ``[clips, crops]`` pairs for classifier testing;
    ``feature_views`` is the view set whose features (averaged over its views) feed the probe and kNN.
    ``num_frames``/``input_size`` default to the checkpoint's model config."""

    checkpoint: str
    output: str
    test: SplitSection
    train: SplitSection | None = None
    view_sets: tuple[tuple[int, int], ...] = ((2, 3), (5, 3))
    feature_views: tuple[int, int] = (1, 1)
    sampling_rate: int = SAMPLING_RATE
    num_frames: int | None = None
    input_size: int | None = None
    num_classes: int | None = None  # default: the classifier's, else 1 + the largest label seen
    batch_size: int = 16  # views per forward pass
    actors: int = 2  # Ray actors holding the model; 0 = extract in this process
    cpus_per_actor: float = 1.0
    use_gpu: bool | None = None  # None: a GPU per actor when the Ray cluster has GPUs
    knn: KnnSection = dataclasses.field(default_factory=KnnSection)
    features: FeaturesSection = dataclasses.field(default_factory=FeaturesSection)
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)
    storage: storage.StorageConfig = dataclasses.field(default_factory=storage.StorageConfig)

    def __post_init__(self) -> None:
        if not self.checkpoint or not self.output:
            raise ValueError("checkpoint and output (the report URL) must be set")
        for pair in (*self.view_sets, self.feature_views):
            if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
                raise ValueError(f"view sets must be [clips, crops] pairs of ints >= 1, got {list(pair)}")
        for name in ("sampling_rate", "batch_size"):
            positive_int(name, getattr(self, name))
        if self.actors < 0 or not self.cpus_per_actor > 0:
            raise ValueError(
                f"actors must be >= 0 and cpus_per_actor > 0, got {self.actors} / {self.cpus_per_actor}"
            )
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 or null, got {self.num_classes}")


def multiview_accuracy(
    head: nn.Module, feats_NVD: torch.Tensor, labels_N: torch.Tensor, keys: list[str]
) -> dict[str, float]:
    """Top-1/top-5 of the per-video mean softmax over the ``V`` views (``head`` maps features to logits)."""
    v = feats_NVD.shape[1]
    with torch.no_grad():
        logits = head(feats_NVD.flatten(0, 1).float())
    ids, probs = aggregate_views(logits, [k for k in keys for _ in range(v)])
    order = {k: i for i, k in enumerate(keys)}
    return topk_accuracy(probs, labels_N[[order[k] for k in ids]])


def _counts(labels: torch.Tensor, skipped: list) -> dict[str, int]:
    return {"videos": len(labels), "labelled": int((labels >= 0).sum()), "skipped": len(skipped)}


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every evaluation ``cfg`` asks for, write the JSON report to ``cfg.output``, return it.

    Report keys: ``checkpoint``, ``checkpoint_meta``, ``lineage`` (``jobs.train.lineage``; None for a published
    checkpoint), ``config``, ``samples`` (per split: videos, labelled,
    skipped), ``multiview`` (per ``"{clips}x{crops}"``: top1, top5, views, videos; empty for a pretrained
    checkpoint), and with a train split ``knn``, ``linear_probe`` (top1, top5), ``feature_dim``,
    ``num_classes``; ``seconds``. Accuracies are fractions of the labelled test videos."""
    storage.check_bucket(cfg.output, cfg.storage)
    t0 = time.perf_counter()
    model, meta = load_any_checkpoint(cfg.checkpoint)
    classifier = isinstance(model, VideoMAEClassifier)

    def spec(pair: tuple[int, int]) -> ViewSpec:
        size = cfg.input_size or model.cfg.img_size
        frames = cfg.num_frames or model.cfg.num_frames
        return ViewSpec(
            num_frames=frames, sampling_rate=cfg.sampling_rate, input_size=size, clips=pair[0], crops=pair[1]
        )

    report: dict[str, Any] = {
        "checkpoint": cfg.checkpoint,
        "checkpoint_meta": {k: meta.get(k) for k in ("format", "kind", "url")},
        "lineage": meta.get("lineage"),  # what the checkpoint was trained from (jobs.train.lineage)
        "config": storage.redact(to_dict(cfg)),
        "samples": {},
        "multiview": {},
    }
    opts = dict(
        actors=cfg.actors,
        cpus_per_actor=cfg.cpus_per_actor,
        use_gpu=cfg.use_gpu,
        storage_cfg=cfg.storage,
        pool=cfg.features.pool,
    )
    with FeatureExtractor(model, batch_size=cfg.batch_size, **opts) as ex:
        test_sets = {}
        for pair in cfg.view_sets if classifier else ():
            s = spec(pair)
            feats, labels, keys, skipped = test_sets[s.name] = ex.run(cfg.test, s, "mean")
            m = labels >= 0
            acc = multiview_accuracy(
                model.head, feats[m], labels[m], [k for k, y in zip(keys, m.tolist(), strict=True) if y]
            )
            report["multiview"][s.name] = {**acc, "views": s.num_views, "videos": int(m.sum())}
            report["samples"]["test"] = _counts(labels, skipped)
        if cfg.train is not None:
            fs = spec(cfg.feature_views)
            tr_f, tr_y, _, tr_skip = ex.run(cfg.train, fs)
            reuse = fs.name in test_sets and cfg.features.pool == "mean"
            te_f, te_y, _, te_skip = test_sets[fs.name] if reuse else ex.run(cfg.test, fs)
    if cfg.train is not None:
        report["samples"]["train"], report["samples"]["test"] = _counts(tr_y, tr_skip), _counts(te_y, te_skip)
        tr_m, te_m = tr_y >= 0, te_y >= 0
        if not tr_m.any() or not te_m.any():
            raise ValueError(
                "probe/kNN need labelled train and test samples; found none in one of the splits"
            )
        xtr, ytr, xte, yte = tr_f[tr_m].mean(1), tr_y[tr_m], te_f[te_m].mean(1), te_y[te_m]
        top = int(max(ytr.max(), yte.max()))
        k = cfg.num_classes or (model.num_classes if classifier else top + 1)
        if top >= k:
            raise ValueError(f"labels go up to {top} but num_classes is {k}")
        knn = knn_predict(xtr, ytr, xte, num_classes=k, k=cfg.knn.k, temperature=cfg.knn.temperature)
        probe = linear_probe(xtr, ytr, xte, num_classes=k, cfg=cfg.probe)
        report["knn"] = {
            **topk_accuracy(knn, yte),
            "k": cfg.knn.k,
            "temperature": cfg.knn.temperature,
            "views": fs.name,
            "pool": cfg.features.pool,
        }
        report["linear_probe"] = {**topk_accuracy(probe, yte), "epochs": cfg.probe.epochs, "views": fs.name}
        report.update(feature_dim=int(xtr.shape[1]), num_classes=k)
    report["seconds"] = time.perf_counter() - t0
    storage.write_bytes_atomic(cfg.output, json.dumps(storage.redact(report), indent=1).encode(), cfg.storage)
    return report


CONFIG_DIR = "configs/eval"  # where this command's --config YAMLs live (jobs.cli.config_registry)
CONFIG_CLASS = EvalConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML under configs/eval/")
    parser.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. checkpoint=runs/ft/final")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(EvalConfig, args.config, args.overrides)
    if args.address:
        init_ray(args.address)  # feature actors get the credentials as a Ray object
    report = evaluate(cfg)
    for name, acc in report["multiview"].items():
        print(f"{name} views: top1 {acc['top1']:.4f} top5 {acc['top5']:.4f} ({acc['videos']} videos)")
    for name in ("linear_probe", "knn"):
        if name in report:
            print(f"{name}: top1 {report[name]['top1']:.4f} top5 {report[name]['top5']:.4f}")
    print(f"checkpoint: {report['checkpoint_meta']['url']}")
    print("\n".join(describe(report["lineage"], "  ")))
    print(f"report: {cfg.output}")
    return 0
