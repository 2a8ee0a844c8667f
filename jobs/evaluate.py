"""``vmae eval --config configs/eval/<name>.yaml [k=v ...] [--address ADDR]``: evaluate a checkpoint.

Three numbers from one checkpoint and two labelled shard sets (optionally subsets):

- multi-view top-1/top-5 of a classifier checkpoint on the test split: every video is cut into
  ``clips x crops`` deterministic views (:mod:`pipeline.views`), the softmax of every view is averaged per video
  (``jobs.eval_metrics.aggregate_views``), for each configured view set (e.g. 2x3 and 5x3);
- a linear probe and a weighted kNN on frozen features of the train split, scored on the test split (any
  checkpoint: pretrained or finetuned). ``features.pool``: ``mean`` (``forward_features``: encoder tokens
  mean-pooled over all positions, normalised; ``D``) or ``time`` (``model.videomae.time_pool``: mean over
  space per temporal slice, slices kept in order; ``T'*D``), which keeps the temporal order motion needs.

Feature extraction is a Ray job: an ``ActorPool`` of actors that each load the model once (on a GPU when the
cluster has one) and stream whole shards; the driver shows a progress bar over shards. ``actors: 0`` runs it
in this process (small sets, tests). The report (JSON, any fsspec URL) holds every number, the resolved config,
the checkpoint and the sample counts. Python API for the study runner: :func:`evaluate`,
:func:`extract_features`.

Shapes: ``N`` videos, ``V`` views per video, ``D`` feature width, ``K`` classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import time
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from jobs.config import from_dict, load_config, load_yaml, to_dict
from jobs.eval_metrics import ProbeConfig, aggregate_views, knn_predict, linear_probe, topk_accuracy
from pipeline import storage
from pipeline.views import ViewSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitSection:
    """A labelled shard set (``manifest.json`` URL or its folder), optionally restricted to a subset."""

    manifest: str
    subset: str | None = None

    def __post_init__(self) -> None:
        if not self.manifest:
            raise ValueError("split.manifest must name a shard set's manifest.json (or its folder)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KnnSection:
    k: int = 20
    temperature: float = 0.07

    def __post_init__(self) -> None:
        if self.k < 1 or not self.temperature > 0:
            raise ValueError(f"knn.k must be >= 1 and knn.temperature > 0, got {self.k} / {self.temperature}")


FEATURE_POOLS = ("mean", "time")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeaturesSection:
    """How encoder tokens become the probe/kNN feature: ``mean`` over all tokens or ``time`` (per slice)."""

    pool: str = "mean"

    def __post_init__(self) -> None:
        if self.pool not in FEATURE_POOLS:
            raise ValueError(f"features.pool must be one of {FEATURE_POOLS}, got {self.pool!r}")


def pool_features(model: nn.Module, video_BCTHW: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """Frozen clip features of a batch of views: ``[B, D]`` (``mean``) or ``[B, T'*D]`` (``time``)."""
    from model.videomae import time_pool

    if pool not in FEATURE_POOLS:
        raise ValueError(f"pool must be one of {FEATURE_POOLS}, got {pool!r}")
    if pool == "mean":
        return model.forward_features(video_BCTHW)
    return time_pool(model.forward_tokens(video_BCTHW), model.cfg.grid[0])


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
    sampling_rate: int = 4
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
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.actors < 0 or not self.cpus_per_actor > 0:
            raise ValueError(
                f"actors must be >= 0 and cpus_per_actor > 0, got {self.actors} / {self.cpus_per_actor}"
            )
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 or null, got {self.num_classes}")


def load_any_checkpoint(url: str, cfg: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """A ``VideoMAE`` or ``VideoMAEClassifier`` from any checkpoint this project meets: a ``vmae``/``hf``
    directory or official ``.pth`` (``model.load_checkpoint``), or a Ray checkpoint of a pretrain/finetune
    run (``<run>/step_*`` with ``model.pt``; the run's ``config.yaml`` gives the architecture), or such a run
    directory (its latest checkpoint). ``cfg`` (a ``VideoMAEConfig``) is the architecture of a single-file
    checkpoint (official ``.pth``, which carries none; inferred for the paper's widths when omitted).
    Returns ``(model, meta)``; the model is on CPU in eval mode."""
    from jobs import checkpointing as ckpt
    from jobs.pretrain_config import ModelSection
    from model import VideoMAE, VideoMAEClassifier, load_checkpoint

    step_dir = (
        url if storage.exists(storage.join(url, ckpt.TRAINER_FILE)) else ckpt.latest_checkpoint_dir(url)
    )
    if step_dir is None:
        fs, path = storage.get_fs(url)
        single_file = fs.exists(path) and not fs.isdir(path)
        model, meta = load_checkpoint(url, cfg=cfg if single_file else None)
        return model.eval(), meta
    weights = storage.join(step_dir, ckpt.MODEL_FILE)
    if not storage.exists(weights):
        raise ValueError(
            f"checkpoint {step_dir!r} has no {ckpt.MODEL_FILE} (FSDP-sharded runs are not supported here)"
        )
    run_cfg = load_yaml(storage.join(step_dir.rstrip("/").rsplit("/", 1)[0], "config.yaml"))
    model_cfg = from_dict(ModelSection, run_cfg.get("model") or {}, where="run config.model").build()
    state = torch.load(io.BytesIO(storage.read_bytes(weights)), weights_only=True, map_location="cpu")
    if "num_classes" in run_cfg:
        model: nn.Module = VideoMAEClassifier(model_cfg, int(run_cfg["num_classes"]))
    else:
        model = VideoMAE(model_cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights}: weights do not match the run's model config: {e}") from e
    kind = "classifier" if isinstance(model, VideoMAEClassifier) else "pretrain"
    return model.eval(), {"format": "ray-run", "kind": kind, "url": step_dir}


def _shard_features(
    model: nn.Module,
    url: str,
    keys: list[str],
    views: ViewSpec,
    *,
    batch_size: int,
    device: str,
    cfg: Any,
    pool: str = "mean",
) -> dict[str, Any]:
    """Features of the ``keys`` of one shard: ``{"keys", "labels", "feats" [n, V, D], "skipped"}``."""
    from pipeline.decode import BadSample, iter_shard, parse_label
    from pipeline.views import video_views

    out_keys, labels, feats, skipped, errors = [], [], [], [], []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if not pending:
            return
        x = torch.cat(pending).to(device)
        amp = device.startswith("cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            f = pool_features(model, x, pool).float().cpu()
        feats.extend(f.view(-1, views.num_views, f.shape[-1]))
        pending.clear()

    wanted = set(keys)
    for sample in iter_shard(url, want=wanted.__contains__, cfg=cfg, on_error=errors.append):
        key = sample["__key__"]
        if key not in wanted:
            continue
        wanted.discard(key)
        try:
            if "mp4" not in sample:
                raise BadSample(key, "no .mp4 member")
            label = parse_label(sample)
            v = video_views(sample["mp4"], views, key=key)
        except BadSample as e:
            skipped.append((key, e.reason))
            continue
        out_keys.append(key)
        labels.append(label)
        pending.append(v)
        if sum(len(p) for p in pending) >= batch_size:
            flush()
    flush()
    why = f"missing from shard ({errors[-1]})" if errors else "missing from shard"
    skipped += [(k, why) for k in sorted(wanted)]
    d = feats[0].shape[-1] if feats else 0
    return {
        "keys": out_keys,
        "labels": labels,
        "feats": torch.stack(feats) if feats else torch.zeros(0, views.num_views, d),
        "skipped": skipped,
    }


class _Extractor:
    """Ray actor: holds the model on its device and turns whole shards into features."""

    def __init__(self, model_or_url: nn.Module | str, batch_size: int, use_gpu: bool, cpus: float):
        torch.set_num_threads(max(1, int(cpus)))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        model = load_any_checkpoint(model_or_url)[0] if isinstance(model_or_url, str) else model_or_url
        self.model = model.eval().to(self.device)
        self.batch_size = batch_size

    def shard(self, url: str, keys: list[str], views: ViewSpec, cfg: Any, pool: str) -> dict[str, Any]:
        return _shard_features(
            self.model,
            url,
            keys,
            views,
            batch_size=self.batch_size,
            device=self.device,
            cfg=cfg,
            pool=pool,
        )


class FeatureExtractor:
    """The model loaded once — in ``actors`` Ray actors (one GPU each when ``use_gpu``; ``None``: when the
    cluster has GPUs), or in this process for ``actors=0`` — and reused for every split and view set.
    ``pool`` is the default ``features.pool`` (:func:`pool_features`). Use as a context manager (actors killed on exit)."""

    def __init__(
        self,
        model_or_url: nn.Module | str,
        *,
        batch_size: int = 16,
        actors: int = 2,
        cpus_per_actor: float = 1.0,
        use_gpu: bool | None = None,
        storage_cfg: storage.StorageConfig | None = None,
        pool: str = "mean",
    ) -> None:
        if pool not in FEATURE_POOLS:
            raise ValueError(f"pool must be one of {FEATURE_POOLS}, got {pool!r}")
        self.scfg = storage_cfg or storage.StorageConfig()
        self.batch_size, self.actors, self.pool = batch_size, [], pool
        if actors == 0:
            model = load_any_checkpoint(model_or_url)[0] if isinstance(model_or_url, str) else model_or_url
            self.device = "cuda" if use_gpu is not False and torch.cuda.is_available() else "cpu"
            self.model = model.eval().to(self.device)
            return
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        gpu = bool(ray.cluster_resources().get("GPU", 0)) if use_gpu is None else use_gpu
        remote = ray.remote(num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0)(_Extractor)
        source = ray.put(model_or_url) if isinstance(model_or_url, nn.Module) else model_or_url
        self.actors = [remote.remote(source, batch_size, gpu, cpus_per_actor) for _ in range(actors)]

    def __enter__(self) -> FeatureExtractor:
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def run(
        self, split: SplitSection, views: ViewSpec, pool: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[tuple[str, str]]]:
        """``(feats [N, V, D], labels [N], keys [N], skipped [(key, reason)])`` of a split, sorted by key;
        ``pool`` overrides the extractor's default (the classifier head needs ``mean`` features)."""
        pool = pool or self.pool
        if pool not in FEATURE_POOLS:
            raise ValueError(f"pool must be one of {FEATURE_POOLS}, got {pool!r}")
        from pipeline.loader import LoaderConfig, load_shards

        shards = load_shards(LoaderConfig(manifest=split.manifest, subset=split.subset, storage=self.scfg))
        bar = tqdm(total=len(shards), desc=f"features {views.name}", unit="shard", disable=None)
        results = []
        if not self.actors:
            for s in shards:
                kw = dict(batch_size=self.batch_size, device=self.device, cfg=self.scfg, pool=pool)
                results.append(_shard_features(self.model, s.url, list(s.keys), views, **kw))
                bar.update()
        else:
            from ray.util import ActorPool

            calls = ActorPool(self.actors).map_unordered(
                lambda a, s: a.shard.remote(s.url, list(s.keys), views, self.scfg, pool), shards
            )
            for res in calls:
                results.append(res)
                bar.update()
        bar.close()
        rows = sorted(
            (t for r in results for t in zip(r["keys"], r["labels"], r["feats"], strict=True)),
            key=lambda t: t[0],
        )
        skipped = sorted(s for r in results for s in r["skipped"])
        for key, reason in skipped:
            log.warning("eval skipped sample %r: %s", key, reason)
        if not rows:
            raise ValueError(
                f"no usable sample in {split.manifest!r} (subset {split.subset!r}); {len(skipped)} skipped"
            )
        labels = torch.tensor([lab for _, lab, _ in rows], dtype=torch.int64)
        return torch.stack([f for _, _, f in rows]), labels, [k for k, _, _ in rows], skipped


def extract_features(
    checkpoint_or_model: nn.Module | str,
    manifest_url: str,
    subset_url: str | None,
    views: ViewSpec,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Frozen features of every selected video: ``(feats [N, V, D] float32, labels [N] int64 (-1: none),
    keys [N])``, sorted by key, views clip-major. ``kwargs`` go to :class:`FeatureExtractor` (``batch_size,
    actors, cpus_per_actor, use_gpu, storage_cfg, pool``). Undecodable samples are logged and left out."""
    with FeatureExtractor(checkpoint_or_model, **kwargs) as ex:
        feats, labels, keys, _ = ex.run(SplitSection(manifest=manifest_url, subset=subset_url), views)
    return feats, labels, keys


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

    Report keys: ``checkpoint``, ``checkpoint_meta``, ``config``, ``samples`` (per split: videos, labelled,
    skipped), ``multiview`` (per ``"{clips}x{crops}"``: top1, top5, views, videos; empty for a pretrained
    checkpoint), and with a train split ``knn``, ``linear_probe`` (top1, top5), ``feature_dim``,
    ``num_classes``; ``seconds``. Accuracies are fractions of the labelled test videos."""
    from model import VideoMAEClassifier

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
        "config": to_dict(cfg),
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
    storage.write_bytes_atomic(cfg.output, json.dumps(report, indent=1).encode(), cfg.storage)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML under configs/eval/")
    parser.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. checkpoint=runs/ft/final")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(EvalConfig, args.config, args.overrides)
    if args.address:
        import ray

        ray.init(
            address=args.address,
            runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}},
        )
    report = evaluate(cfg)
    for name, acc in report["multiview"].items():
        print(f"{name} views: top1 {acc['top1']:.4f} top5 {acc['top5']:.4f} ({acc['videos']} videos)")
    for name in ("linear_probe", "knn"):
        if name in report:
            print(f"{name}: top1 {report[name]['top1']:.4f} top5 {report[name]['top5']:.4f}")
    print(f"report: {cfg.output}")
    return 0
