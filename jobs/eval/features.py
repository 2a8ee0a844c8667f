"""Frozen clip features of a labelled split, for the linear probe, kNN and multi-view testing (``vmae eval``)
and for anything else that embeds clips.

Feature extraction is a Ray job: an ``ActorPool`` of actors that each load the model once (on a GPU when the
cluster has one) and stream whole shards; the driver shows a progress bar over shards. ``actors: 0`` runs it
in this process (small sets, tests). Every video is cut into deterministic views (:mod:`pipeline.loader.views`);
``features.pool`` turns encoder tokens into one vector per view: ``mean`` (``forward_features``: all tokens
mean-pooled, normalised; ``D``) or ``time`` (``model.videomae.time_pool``: mean over space per temporal slice,
slices kept in order; ``T'*D``), which keeps the temporal order motion needs.

Shapes: ``N`` videos, ``V`` views per video, ``D`` feature width.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ray
import torch
from ray.util import ActorPool
from torch import nn
from tqdm import tqdm

from jobs.ray_utils import init_ray
from jobs.train.checkpointing import load_any_checkpoint
from model.videomae import time_pool
from pipeline import storage
from pipeline.loader.config import LoaderConfig
from pipeline.loader.decode import BadSample, iter_shard, parse_label
from pipeline.loader.plan import load_shards
from pipeline.loader.views import ViewSpec, video_views

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitSection:
    """A labelled shard set (``manifest.json`` URL or its folder), optionally restricted to a subset."""

    manifest: str
    subset: str | None = None

    def __post_init__(self) -> None:
        if not self.manifest:
            raise ValueError("split.manifest must name a shard set's manifest.json (or its folder)")


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
    if pool not in FEATURE_POOLS:
        raise ValueError(f"pool must be one of {FEATURE_POOLS}, got {pool!r}")
    if pool == "mean":
        return model.forward_features(video_BCTHW)
    return time_pool(model.forward_tokens(video_BCTHW), model.cfg.grid[0])


def shard_features(
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

    def __init__(
        self, model_or_url: nn.Module | str, batch_size: int, use_gpu: bool, cpus: float,
        credentials: dict[str, str] | None = None,
    ):  # fmt: skip
        storage.install_credentials(credentials)
        torch.set_num_threads(max(1, int(cpus)))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        model = load_any_checkpoint(model_or_url)[0] if isinstance(model_or_url, str) else model_or_url
        self.model = model.eval().to(self.device)
        self.batch_size = batch_size

    def shard(self, url: str, keys: list[str], views: ViewSpec, cfg: Any, pool: str) -> dict[str, Any]:
        return shard_features(
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
        init_ray(include_dashboard=False)
        gpu = bool(ray.cluster_resources().get("GPU", 0)) if use_gpu is None else use_gpu
        remote = ray.remote(num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0)(_Extractor)
        source = ray.put(model_or_url) if isinstance(model_or_url, nn.Module) else model_or_url
        creds = ray.put(storage.credentials_from_env())  # not runtime_env: kept out of job metadata and logs
        self.actors = [remote.remote(source, batch_size, gpu, cpus_per_actor, creds) for _ in range(actors)]

    def __enter__(self) -> FeatureExtractor:
        return self

    def __exit__(self, *exc: Any) -> None:
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
        shards = load_shards(LoaderConfig(manifest=split.manifest, subset=split.subset, storage=self.scfg))
        bar = tqdm(total=len(shards), desc=f"features {views.name}", unit="shard", disable=None)
        results = []
        if not self.actors:
            for s in shards:
                kw = dict(batch_size=self.batch_size, device=self.device, cfg=self.scfg, pool=pool)
                results.append(shard_features(self.model, s.url, list(s.keys), views, **kw))
                bar.update()
        else:
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
