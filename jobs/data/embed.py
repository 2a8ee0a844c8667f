"""``vmae embed``: a checkpoint's view of every clip of a shard set -> ``embeddings.parquet`` (Ray job).

    vmae embed --checkpoint runs/debug --shards data/shards/manifest.json --output data/curation [k=v ...]

Per clip: the frozen encoder embedding (``vector``), the reconstruction loss under one fixed mask
(``recon_loss``, "learnability") with the loss of the mean predictor (``recon_baseline``: each masked
tubelet predicted by its own mean), and, from all embeddings together (:mod:`pipeline.curation.semantic`),
semantic near-duplicate groups (``sem_group``, ``sem_group_size``) and domain clusters (``cluster``).

Why the loss as a curation column: a clip the model reconstructs perfectly (static, black, flat) teaches
it nothing, and a clip it cannot beat the mean predictor on (noise, heavy compression) teaches it noise;
``vmae subset`` can keep a percentile band of ``recon_loss`` between the two.

The model runs on the frozen-feature actor pool of :mod:`jobs.eval.features` (one model per actor, GPU when the
cluster has one): :class:`EmbedProbe` wraps the checkpoint so the actors' ``forward_features`` returns the
embedding with the two losses appended. Each shard's rows go to a part file under
``_embed_parts/{run id}/`` as soon as they arrive, so a rerun (after a crash, or with shards added)
embeds only what is missing; the run id hashes the weights, views, pooling and mask. The merged table is
written last, atomically, with the checkpoint's url/format/kind/sha256 and the shard manifest's sha256 in
its metadata. Shards are only read.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.util import ActorPool
from torch import nn
from tqdm import tqdm

from jobs.config import load_config, save_config, to_dict
from jobs.eval.features import FEATURE_POOLS, FeatureExtractor, pool_features, shard_features
from jobs.ray_utils import RayConfig, init_ray
from jobs.train.checkpointing import load_any_checkpoint
from model import VideoMAE
from pipeline import storage
from pipeline.checks import positive_int
from pipeline.curation.semantic import SemanticConfig, semantic_columns
from pipeline.ingest import manifest
from pipeline.loader.masking import MASK_TYPES, check_mask_ratio, mask_kind
from pipeline.loader.transforms import SAMPLING_RATE
from pipeline.loader.views import ViewSpec

EMBEDDINGS_NAME = "embeddings.parquet"
PARTS_DIR = "_embed_parts"
FORMAT = "vmae-embeddings/1"
PART_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("vector", pa.list_(pa.float32())),
    ("recon_loss", pa.float64()), ("recon_baseline", pa.float64()), ("error", pa.string()),
])  # fmt: skip
EMBEDDINGS_SCHEMA = pa.schema([
    *PART_SCHEMA, ("sem_group", pa.int64()), ("sem_group_size", pa.int64()), ("cluster", pa.int64()),
])  # fmt: skip
DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViewsSection:
    """Which views of a clip are embedded; frames and size come from the checkpoint (``clip_spec``)."""

    sampling_rate: int = SAMPLING_RATE  # frame stride of a view
    clips: int = 1  # temporal views, evenly spaced; embedding and losses are averaged over all views
    crops: int = 1  # spatial crops per temporal view

    def __post_init__(self) -> None:
        for name in ("sampling_rate", "clips", "crops"):
            positive_int(f"views.{name}", getattr(self, name))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LearnabilitySection:
    """The one mask every clip's reconstruction loss is measured under (same mask for all: comparable)."""

    enabled: bool = True  # needs a pretraining checkpoint (with a decoder); classifiers get no loss columns
    mask_seed: int = 0
    mask_type: str | None = None  # tube | random; null: the checkpoint's
    mask_ratio: float | None = None  # null: the checkpoint's

    def __post_init__(self) -> None:
        if self.mask_type is not None and self.mask_type not in MASK_TYPES:
            raise ValueError(
                f"learnability.mask_type must be one of {MASK_TYPES} or null, got {self.mask_type!r}"
            )
        if self.mask_type is not None and mask_kind(self.mask_type).follows_motion:
            raise ValueError(_per_clip(f"learnability.mask_type {self.mask_type!r}"))
        if self.mask_ratio is not None:
            check_mask_ratio(self.mask_ratio, name="learnability.mask_ratio")


def _per_clip(what: str) -> str:
    return (f"{what} follows each clip's own motion; learnability measures every clip under one fixed mask: "
            "set learnability.mask_type to tube or random")  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    batch_size: int = 16  # views per forward pass
    actors: int = 2  # model replicas on the Ray actor pool; 0: in this process (no Ray)
    cpus_per_actor: float = 1.0
    device: str = "auto"  # auto: GPU actors when the cluster has GPUs | cpu | cuda
    pool: str = "mean"  # mean (forward_features) | time (per temporal slice; T'*D wide)
    views: ViewsSection = dataclasses.field(default_factory=ViewsSection)
    learnability: LearnabilitySection = dataclasses.field(default_factory=LearnabilitySection)
    semantic: SemanticConfig = dataclasses.field(default_factory=SemanticConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)  # local cluster size, as the shard job's

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.actors < 0 or self.cpus_per_actor <= 0:
            raise ValueError(f"batch_size must be >= 1, actors >= 0, cpus_per_actor > 0, got {self}")
        if self.device not in DEVICES or self.pool not in FEATURE_POOLS:
            raise ValueError(f"device must be one of {DEVICES} and pool one of {FEATURE_POOLS}")


def fixed_mask(model: nn.Module, cfg: LearnabilitySection) -> torch.Tensor:
    """Bool ``[L]`` (True = masked), drawn once from ``mask_seed`` with the checkpoint's (or the given) type
    and ratio."""
    spec = model.cfg.clip_spec()
    kind, ratio = cfg.mask_type or spec.mask_type, cfg.mask_ratio or spec.mask_ratio
    if mask_kind(kind).follows_motion:  # the checkpoint's own type, learnability.mask_type null
        raise ValueError(_per_clip(f"the checkpoint's mask_type {kind!r}"))
    draw = mask_kind(kind).draw
    return draw(1, *spec.token_grid, ratio, torch.Generator().manual_seed(cfg.mask_seed))[0]


def clip_losses(
    model: nn.Module, video_BCTHW: torch.Tensor, mask_L: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip ``(recon_loss [B], recon_baseline [B])`` (float32): the MSE of the model's prediction of the
    masked tubelets against its target (``VideoMAE.target``: normalised pixels), and the MSE of predicting
    every masked tubelet by its own mean value (0 for a flat tubelet; ~1 per normalised tubelet)."""
    mask_BL = mask_L[None].expand(video_BCTHW.shape[0], -1)
    _, pred_BMP = model(video_BCTHW, mask_BL)  # masked tokens, in token order
    target_BMP = model.target(video_BCTHW)[:, mask_L.to(video_BCTHW.device)]
    loss_B = (pred_BMP.float() - target_BMP).pow(2).mean(dim=(1, 2))
    base_B = (target_BMP - target_BMP.mean(dim=-1, keepdim=True)).pow(2).mean(dim=(1, 2))
    return loss_B, base_B


class EmbedProbe(nn.Module):
    """A checkpoint as the feature actors see it: ``forward_features`` gives ``[B, D + 2]`` = the ``pool``
    embedding, ``recon_loss``, ``recon_baseline`` (``[B, D]`` without a mask)."""

    def __init__(self, model: nn.Module, pool: str, mask_L: torch.Tensor | None) -> None:
        super().__init__()
        self.model, self.pool = model, pool
        self.register_buffer("mask_L", mask_L if mask_L is not None else torch.zeros(0, dtype=torch.bool))

    def forward_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        f_BD = pool_features(self.model, video_BCTHW, self.pool).float()
        if not len(self.mask_L):
            return f_BD
        loss_B, base_B = clip_losses(self.model, video_BCTHW, self.mask_L)
        return torch.cat([f_BD, loss_B[:, None], base_B[:, None]], dim=1)


def weights_sha256(model: nn.Module) -> str:
    """Identity of the weights themselves (a checkpoint rewritten under the same URL is another model)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def embeddings_url(output: str) -> str:
    """``output`` itself when it names a ``.parquet`` file, else ``output/embeddings.parquet``."""
    return output if output.endswith(".parquet") else storage.join(output, EMBEDDINGS_NAME)


def _part_table(result: dict[str, Any], shard: str, with_loss: bool) -> pa.Table:
    """One shard's rows from a ``jobs.eval.features`` result (``feats [n, V, D(+2)]``, averaged over views)."""
    feats = (
        result["feats"].float().mean(dim=1).numpy() if len(result["keys"]) else np.zeros((0, 0), np.float32)
    )
    d = feats.shape[1] - 2 if with_loss else feats.shape[1]
    rows = [
        {"key": k, "shard": shard, "vector": f[:d].tolist(), "error": "",
         "recon_loss": float(f[d]) if with_loss else None, "recon_baseline": float(f[d + 1]) if with_loss else None}
        for k, f in zip(result["keys"], feats, strict=True)
    ]  # fmt: skip
    rows += [{"key": k, "shard": shard, "vector": None, "error": why} for k, why in result["skipped"]]
    return pa.Table.from_pylist(rows, schema=PART_SCHEMA)


def run_embed(
    checkpoint: str, manifest_url: str, output: str | None, cfg: EmbedConfig, *, address: str | None = None
) -> dict:
    """Embed every clip of the shard set (only shards without a part file); write the merged table."""
    t0 = time.time()
    m = manifest.read_manifest(manifest_url)
    manifest_sha = hashlib.sha256(storage.read_bytes(m.url)).hexdigest()
    out_url = embeddings_url(output or m.root)
    out_dir = out_url.rsplit("/", 1)[0] if "/" in out_url else "."
    storage.check_bucket(out_url)
    model, meta = load_any_checkpoint(checkpoint)
    spec = model.cfg.clip_spec()
    views = ViewSpec(num_frames=spec.num_frames, input_size=spec.input_size, **dataclasses.asdict(cfg.views))
    with_loss = cfg.learnability.enabled and isinstance(model, VideoMAE)
    mask = fixed_mask(model, cfg.learnability) if with_loss else None
    wsha = weights_sha256(model)
    ident = {"weights": wsha, "views": dataclasses.asdict(views), "pool": cfg.pool,
             "mask": mask.nonzero().flatten().tolist() if mask is not None else None}  # fmt: skip
    run_id = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    parts = {
        s.name: storage.join(out_dir, PARTS_DIR, run_id, f"{s.name}-{s.sha256[:16]}.parquet")
        for s in m.shards
    }
    todo = [s for s in m.shards if not storage.exists(parts[s.name])]
    probe = EmbedProbe(model, cfg.pool, mask)
    use_gpu = {"auto": None, "cpu": False, "cuda": True}[cfg.device]
    started = False
    if cfg.actors and todo:  # extraction in this process needs no Ray
        started = init_ray(address, new_local=True, num_cpus=cfg.ray.num_cpus, include_dashboard=False)
    try:
        bar = tqdm(total=len(todo), desc="embed", unit="shard", disable=None)
        kw = dict(batch_size=cfg.batch_size, actors=cfg.actors if todo else 0, cpus_per_actor=cfg.cpus_per_actor,
                  use_gpu=use_gpu)  # fmt: skip
        with FeatureExtractor(probe, **kw) as ex:
            for shard, result in _shard_results(ex, m, todo, views):
                manifest.write_table_atomic(parts[shard], _part_table(result, shard, with_loss))
                bar.update()
        bar.close()
    finally:
        if started:
            ray.shutdown()
    table = (
        pa.concat_tables([manifest.read_table(parts[s.name]) for s in m.shards])
        if m.shards
        else PART_SCHEMA.empty_table()
    )
    table, semantic = _add_semantic(table, cfg.semantic)
    ckpt = {"url": meta["url"], "format": meta["format"], "kind": meta["kind"], "sha256": wsha}
    stats = {
        "clips": table.num_rows, "errors": sum(e != "" for e in table.column("error").to_pylist()),
        "shards": len(m.shards), "shards_embedded": len(todo), "shards_reused": len(m.shards) - len(todo),
        "run_id": run_id, "wall_s": round(time.time() - t0, 3), **semantic,
    }  # fmt: skip
    if with_loss:
        stats["mask"] = {"type": cfg.learnability.mask_type or spec.mask_type, "seed": cfg.learnability.mask_seed,
                         "ratio": cfg.learnability.mask_ratio or spec.mask_ratio}  # fmt: skip
    meta_out = {
        "format": FORMAT, "source_manifest": m.url, "manifest_sha256": manifest_sha,
        "checkpoint": json.dumps(ckpt, sort_keys=True), "config": json.dumps(to_dict(cfg), sort_keys=True),
        "code_version": manifest.code_version(), "summary": json.dumps(stats, sort_keys=True),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in meta_out.items()})
    manifest.write_table_atomic(out_url, table)
    save_config(cfg, out_dir, "embed_config.yaml")
    return stats


def _shard_results(ex: FeatureExtractor, m: manifest.Manifest, shards: list, views: ViewSpec):
    """``(shard name, jobs.eval.features result)`` per shard, in order (actor pool, or this process)."""
    if not ex.actors:
        for s in shards:
            yield s.name, shard_features(ex.model, m.shard_url(s), list(s.keys), views, batch_size=ex.batch_size,
                                         device=ex.device, cfg=ex.scfg)  # fmt: skip
        return

    def submit(actor: Any, s: Any) -> Any:
        return actor.shard.remote(m.shard_url(s), list(s.keys), views, ex.scfg, "mean")

    yield from zip([s.name for s in shards], ActorPool(ex.actors).map(submit, shards), strict=True)


def _add_semantic(table: pa.Table, cfg: SemanticConfig) -> tuple[pa.Table, dict]:
    """Append ``sem_group``, ``sem_group_size``, ``cluster`` (-1 for rows without a vector)."""
    n = table.num_rows
    ok = np.array([e == "" for e in table.column("error").to_pylist()], bool)
    groups, sizes, clusters = np.arange(n), np.ones(n, np.int64), np.full(n, -1, np.int64)
    info: dict = {}
    if ok.any():
        vectors = np.asarray(table.filter(pa.array(ok)).column("vector").to_pylist(), np.float32)
        cols, info = semantic_columns(vectors, cfg)
        rows = np.nonzero(ok)[0]
        groups[rows], clusters[rows] = rows[cols["sem_group"]], cols["cluster"]
        sizes[rows] = cols["sem_group_size"]
    for name, values in (("sem_group", groups), ("sem_group_size", sizes), ("cluster", clusters)):
        table = table.append_column(name, pa.array(values, pa.int64()))
    return table, info


CONFIG_DIR = "configs/curate/embed"  # where this command's --config YAMLs live (jobs.cli.config_registry)
CONFIG_CLASS = EmbedConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="model: run dir, step_* checkpoint, vmae/HF dir or .pth"
    )
    parser.add_argument("--shards", required=True, help="shard-set manifest.json URL (or its folder)")
    parser.add_argument(
        "--output", default=None, help="embeddings.parquet URL or a folder (default: the shard set's)"
    )
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/curate/embed/debug.yaml)")
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=c, e.g. batch_size=32 actors=4")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(EmbedConfig, args.config, args.overrides)
    stats = run_embed(args.checkpoint, args.shards, args.output, cfg, address=args.address)
    print(json.dumps(stats, indent=1))
    print(f"wrote {embeddings_url(args.output or manifest.read_manifest(args.shards).root)}", file=sys.stdout)
    return 0
