"""The data a study trains and evaluates on: synth -> shard -> curate -> subsets and labelled target splits.

Why content-addressed: every stage writes under a name that ends with the hash of its inputs and config
(``raw-<h>``, ``shards-<h>``, ``curation-<h>.parquet``, ``subsets/<name>-<h>.parquet``), so a rerun finds
the stages that are already there and skips them, and a changed config writes next to, never over, the old
data. Stages call the jobs' Python APIs (``synthesize``, ``shard``, ``run_curation``, ``make_subset``) on
the Ray instance the study started.

Model-based subset rules (``semantic_dedup``, ``include_clusters``, ``balance_clusters``, ``*_recon_pct``)
read an embeddings table (``vmae embed``). With ``data.embed`` the data gains that stage, run only when some
rule reads it: a curation model pretrained on one of the plain subsets by the study's pretraining path
(``embed/model-<h>``), or a given checkpoint, embeds every clip into ``embed/embeddings-<h>/``; the hash of
that table is part of every subset that reads it.

A *target* is a labelled evaluation set: a subset rule (usually clean samples of some domains) whose keys are
split per class (or per domain and class) into a labelled-train and a test subset (stratified, seeded,
disjoint): a fraction, or fixed counts per group. Pretraining subsets never hold a target's keys
(``DataConfig.exclude_target_keys``), so no model is pretrained on the clips it is tested on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.config import load_config, to_dict
from jobs.data.curate import CurateConfig, run_curation
from jobs.data.embed import EmbedConfig, embeddings_url, run_embed
from jobs.data.shard import ShardJobConfig, shard
from jobs.train.config import PretrainConfig
from pipeline import storage
from pipeline.curation.subset import FLAGS, SubsetRule, make_subset, random_rank, select
from pipeline.curation.synth import SUMMARY_NAME, SynthConfig, synthesize
from pipeline.ingest import manifest as mf

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# runs (or finds) a pretraining run and returns its record, ``checkpoint`` the URL of its exported model
# (``jobs.study.cells.pretrain_stage``, passed in: the cells import this module, not the reverse)
Pretrain = Callable[[PretrainConfig], dict[str, Any]]


def digest(obj: Any) -> str:
    """sha256 hex of ``obj`` as canonical JSON: the identity of a stage's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def resolve_path(path: str) -> str:
    """A config path as given, or relative to the repository root when it does not exist from the CWD."""
    if "://" in path or os.path.exists(path) or os.path.isabs(path):
        return path
    alt = os.path.join(REPO_ROOT, path)
    return alt if os.path.exists(alt) else path


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobRef:
    """A job's YAML config plus ``a.b=c`` overrides."""

    config: str | None = None
    overrides: tuple[str, ...] = ()


STRATIFY = ("label", "domain")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetSpec:
    """A labelled target set: ``rule`` picks its samples; per group of ``stratify`` columns, either
    ``test_fraction`` of the group is test and the rest labelled-train, or (both counts set) the
    ``test_per_group`` first by seeded rank are test and the next ``train_per_group`` labelled-train."""

    name: str
    rule: SubsetRule = dataclasses.field(default_factory=SubsetRule)
    test_fraction: float = 0.5
    train_per_group: int | None = None
    test_per_group: int | None = None
    stratify: tuple[str, ...] = ("label",)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("data.targets: every target needs a name")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(
                f"target {self.name!r}: test_fraction must be in (0, 1), got {self.test_fraction}"
            )
        if (self.train_per_group is None) != (self.test_per_group is None):
            raise ValueError(
                f"target {self.name!r}: give both train_per_group and test_per_group, or neither"
            )
        for n in (self.train_per_group, self.test_per_group):
            if n is not None and n < 1:
                raise ValueError(f"target {self.name!r}: per-group counts must be >= 1, got {n}")
        if not self.stratify or "label" not in self.stratify or set(self.stratify) - set(STRATIFY):
            raise ValueError(f"target {self.name!r}: stratify must include label, from {STRATIFY}")

    @property
    def split_dict(self) -> dict[str, Any]:
        """What the split depends on besides the rule and the curation table."""
        return {"test_fraction": self.test_fraction, "seed": self.seed, "train": self.train_per_group,
                "test": self.test_per_group, "stratify": list(self.stratify)}  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbedSection(JobRef):
    """Where the embeddings table comes from: a model pretrained here (``pretrain``: a pretraining YAML and
    overrides, trained on data subset ``subset``) or an existing ``checkpoint``; ``config``/``overrides`` are
    the ``vmae embed`` job's (``jobs.data.embed.EmbedConfig``)."""

    pretrain: JobRef | None = None
    subset: str = "all"
    checkpoint: str | None = None  # identified by its URL: a checkpoint rewritten in place is not noticed

    def __post_init__(self) -> None:
        if (self.pretrain is None) == (self.checkpoint is None):
            raise ValueError("data.embed: give exactly one of pretrain (train the curation model on "
                             "data.embed.subset) or checkpoint (an existing model)")  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Either ``synth`` (the study generates the videos) or ``manifest`` (an existing shard set)."""

    synth: SynthConfig | None = None
    manifest: str | None = None
    curation: str | None = None  # an existing curation.parquet of ``manifest`` (else curated here)
    shard: JobRef = dataclasses.field(default_factory=lambda: JobRef(config="configs/shard/debug.yaml"))
    curate: JobRef = dataclasses.field(default_factory=lambda: JobRef(config="configs/curate/debug.yaml"))
    subsets: tuple[SubsetRule, ...] = (SubsetRule(name="all"),)
    targets: tuple[TargetSpec, ...] = (TargetSpec(name="all"),)
    exclude_target_keys: bool = True  # pretraining subsets never hold a target's clips (or their near-copies)
    embed: EmbedSection | None = None  # the embeddings the model-based subset rules read

    def __post_init__(self) -> None:
        if (self.synth is None) == (self.manifest is None):
            raise ValueError("data: give exactly one of synth (generate videos) or manifest (a shard set)")
        if self.curation is not None and self.manifest is None:
            raise ValueError("data.curation needs data.manifest (the shard set it curates)")
        for what, items in (("subsets", self.subsets), ("targets", self.targets)):
            names = [x.name for x in items]
            if not names or "" in names or len(set(names)) != len(names):
                raise ValueError(
                    f"data.{what} must be a non-empty list with unique, non-empty names: {names}"
                )
        for rule in self.subsets:
            if rule.embedding_columns and self.embed is None:
                raise ValueError(f"data.subsets: rule {rule.name!r} reads {', '.join(rule.embedding_columns)} of "
                                 "the embeddings table; add a data.embed section (the model that writes it)")  # fmt: skip
        for t in self.targets:  # targets come first: the curation model is pretrained without their clips
            if t.rule.embedding_columns:
                raise ValueError(f"target {t.name!r}: a target's rule selects from the curation table only, "
                                 f"not {', '.join(t.rule.embedding_columns)} of the embeddings")  # fmt: skip
        if self.embed is not None and self.embed.pretrain is not None:
            rules = {r.name: r for r in self.subsets}
            if self.embed.subset not in rules or rules[self.embed.subset].embedding_columns:
                raise ValueError(f"data.embed.subset {self.embed.subset!r} must name a subset that needs no "
                                 f"embeddings, from {sorted(rules)}")  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class SubsetInfo:
    name: str
    url: str
    size: int
    inputs_hash: str
    mean_quality: float
    flagged_frac: float  # fraction with any curation flag (static, dark, black frames, a cut)
    domains: tuple[str, ...]

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetInfo:
    name: str
    train_url: str
    test_url: str
    train_size: int
    test_size: int
    inputs_hash: str
    domains: tuple[str, ...]
    num_classes: int = 0  # 1 + the largest label (what a classifier head needs)
    chance: float = float("nan")  # 1 / the number of distinct test labels (balanced test set)

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreparedData:
    manifest_url: str
    curation_url: str
    subsets: dict[str, SubsetInfo]
    targets: dict[str, TargetInfo]
    embeddings_url: str | None = None  # the embeddings table the model-based rules read (if any does)


def stratified_split(
    df: pd.DataFrame,
    test_fraction: float,
    seed: int,
    *,
    by: tuple[str, ...] = ("label",),
    counts: tuple[int, int] | None = None,
) -> tuple[list[str], list[str]]:
    """Split rows (columns ``key`` and ``by``) per group of ``by``: keys ordered by seeded random rank; the
    first ``round(test_fraction * n)`` go to test (at least one train and one test key per group with >= 2
    samples), or with ``counts = (train, test)`` the first ``test`` to test and the next ``train`` to train
    (``ValueError`` naming a group with fewer than ``train + test`` samples)."""
    train, test = [], []
    for group, g in df.groupby(list(by), sort=True):
        keys = [k for _, k in sorted(zip(random_rank(g["key"], seed), g["key"], strict=True))]
        n = len(keys)
        if counts is not None:
            n_train, n_test = counts
            if n < n_train + n_test:
                raise ValueError(f"group {dict(zip(by, group if isinstance(group, tuple) else (group,), strict=True))} "
                                 f"has {n} samples, fewer than {n_train} train + {n_test} test")  # fmt: skip
            test += keys[:n_test]
            train += keys[n_test : n_test + n_train]
            continue
        n_test = min(max(int(round(test_fraction * n)), 1), n - 1) if n >= 2 else 0
        test += keys[:n_test]
        train += keys[n_test:]
    return sorted(train), sorted(test)


def _subset_info(name: str, url: str, df: pd.DataFrame, keys: list[str], inputs_hash: str) -> SubsetInfo:
    rows = df[df["key"].isin(set(keys))]
    columns = [c for c in FLAGS.values() if c in rows.columns]  # a table curated before a flag existed
    flagged = rows[columns].fillna(False).astype(bool).any(axis=1)
    return SubsetInfo(
        name=name, url=url, size=len(keys), inputs_hash=inputs_hash,
        mean_quality=float(rows["quality_score"].mean()) if len(rows) else float("nan"),
        flagged_frac=float(flagged.astype(bool).mean()) if len(rows) else float("nan"),
        domains=tuple(sorted(rows["domain"].astype(str).unique())),
    )  # fmt: skip


def write_target_split(
    curation_url: str, spec: TargetSpec, train_url: str, test_url: str
) -> tuple[list[str], list[str], str]:
    """Select ``spec.rule`` from a curation table, split it per class and write the probe-train/test subset
    manifests (test first, train last). Returns ``(train keys, test keys, inputs hash)``; if both files
    already exist they are read, not rewritten."""
    raw = storage.read_bytes(curation_url)
    ident = {"rule": spec.rule.to_dict(), **spec.split_dict, "curation": hashlib.sha256(raw).hexdigest()}
    h = digest(ident)
    if storage.exists(train_url) and storage.exists(test_url):
        return list(mf.read_subset(train_url).keys), list(mf.read_subset(test_url).keys), h
    table = pq.read_table(pa.BufferReader(raw))
    source = (table.schema.metadata or {}).get(b"source_manifest", b"").decode()
    df = table.to_pandas()
    chosen = df[df["key"].isin(set(select(df, spec.rule)))]
    if chosen["label"].isna().any():
        raise ValueError(f"target {spec.name!r}: {int(chosen['label'].isna().sum())} samples have no label")
    counts = None if spec.train_per_group is None else (spec.train_per_group, spec.test_per_group)
    try:
        train, test = stratified_split(chosen, spec.test_fraction, spec.seed, by=spec.stratify, counts=counts)
    except ValueError as e:
        raise ValueError(f"target {spec.name!r}: {e}") from e
    if not train or not test:
        raise ValueError(f"target {spec.name!r}: {len(chosen)} samples are too few to split into "
                         "probe-train and probe-test")  # fmt: skip
    rows = df.set_index("key")
    for url, keys, part in ((test_url, test, "test"), (train_url, train, "train")):
        sel = rows.loc[keys]
        extra = {"label": [int(v) for v in sel["label"]], "domain": sel["domain"].tolist(),
                 "shard": sel["shard"].tolist()}  # fmt: skip
        mf.write_subset(url, keys, source_manifest=source, rule={**ident, "part": part, "name": spec.name},
                        inputs_hash=h, extra_columns=extra)  # fmt: skip
    return train, test, h


def _job_cfg(cls: type, ref: JobRef, extra: tuple[str, ...] = ()) -> Any:
    """A job's config from its YAML (path as the study gives it) plus overrides."""
    return load_config(cls, resolve_path(ref.config) if ref.config else None, [*ref.overrides, *extra])


def embed_stage(
    emb: EmbedSection, manifest_url: str, root: str, curation_sha256: str, subsets: dict[str, SubsetInfo],
    pretrain: Pretrain | None = None,
) -> tuple[str, str]:  # fmt: skip
    """Make (or find) the embeddings table of the shard set: pretrain the curation model on subset
    ``emb.subset`` with the study's pretraining stage ``pretrain``, or take ``emb.checkpoint``, then embed
    every clip. Returns ``(url, sha256 of the table)``."""
    ecfg, pcfg = _job_cfg(EmbedConfig, emb), None
    if emb.pretrain is not None:
        pcfg, sub = _job_cfg(PretrainConfig, emb.pretrain), subsets[emb.subset]
        pcfg = dataclasses.replace(
            pcfg, loader=dataclasses.replace(pcfg.loader, manifest=manifest_url, subset=sub.url)
        )
        model = {k: v for k, v in to_dict(pcfg).items() if k not in ("name", "storage_path")}
        model["subset_hash"] = sub.inputs_hash
        pcfg = dataclasses.replace(
            pcfg, name=f"model-{digest(model)[:12]}", storage_path=storage.join(root, "embed")
        )
    else:
        model = {"checkpoint": emb.checkpoint}
    out = storage.join(root, "embed", f"embeddings-{digest([curation_sha256, model, to_dict(ecfg)])[:12]}")
    url = embeddings_url(out)
    if not storage.exists(url):  # the table is written last
        if pcfg is not None and pretrain is None:
            raise TypeError(
                "data.embed.pretrain: prepare_data needs the study's pretraining stage (pretrain=)"
            )
        ckpt = emb.checkpoint if pcfg is None else pretrain(pcfg)["checkpoint"]
        run_embed(ckpt, manifest_url, out, ecfg)
    return url, hashlib.sha256(storage.read_bytes(url)).hexdigest()


def prepare_data(cfg: DataConfig, root: str, *, pretrain: Pretrain | None = None) -> PreparedData:
    """Make (or find) everything the cells read: the shard set, its curation, each target split and subset
    (and the embeddings, when a subset rule reads them; ``pretrain`` trains their model, as the study's
    pretraining stage)."""
    if cfg.synth is not None:
        raw = storage.join(root, f"raw-{digest(to_dict(cfg.synth))[:12]}")
        if not storage.exists(storage.join(raw, SUMMARY_NAME)):  # synth.json is written last
            synthesize(cfg.synth, raw)
        # synth writes <domain>/<class>/<clip>.mp4: class from the parent folder, domain from the first one
        scfg = _job_cfg(ShardJobConfig, cfg.shard, ("source.labels=folder", "source.domain_from=prefix"))
        shards = storage.join(root, f"shards-{digest([raw, to_dict(scfg)])[:12]}")
        shard(raw, shards, scfg)
        manifest_url = storage.join(shards, mf.MANIFEST_NAME)
    else:
        manifest_url = (
            cfg.manifest if cfg.manifest.endswith(".json") else storage.join(cfg.manifest, mf.MANIFEST_NAME)
        )
        shards = root
    m = mf.read_manifest(manifest_url)
    if cfg.curation is not None:
        curation_url = cfg.curation
    else:
        ccfg = _job_cfg(CurateConfig, cfg.curate)
        ident = [manifest_url, m.stats.get("fingerprint") or m.created, to_dict(ccfg)]
        curation_url = storage.join(shards, f"curation-{digest(ident)[:12]}.parquet")
        if not storage.exists(curation_url):
            run_curation(manifest_url, curation_url, ccfg)
    curation_bytes = storage.read_bytes(curation_url)
    cur_hash = hashlib.sha256(curation_bytes).hexdigest()
    table = mf.read_table(curation_url)
    df = table.to_pandas()

    targets, held_out = {}, set()
    for t in cfg.targets:
        h = digest([cur_hash, t.rule.to_dict(), t.split_dict])[:12]
        train_url = storage.join(shards, "targets", f"{t.name}-train-{h}.parquet")
        test_url = storage.join(shards, "targets", f"{t.name}-test-{h}.parquet")
        train, test, h = write_target_split(curation_url, t, train_url, test_url)
        held_out.update(train, test)
        rows = df[df["key"].isin(set(train + test))]
        domains = tuple(sorted(rows["domain"].astype(str).unique()))
        test_labels = df[df["key"].isin(set(test))]["label"]
        targets[t.name] = TargetInfo(name=t.name, train_url=train_url, test_url=test_url, train_size=len(train),
                                     test_size=len(test), inputs_hash=h, domains=domains,
                                     num_classes=int(rows["label"].max()) + 1,
                                     chance=1.0 / max(int(test_labels.nunique()), 1))  # fmt: skip

    if held_out and "dup_group" in df.columns:  # a held-out clip's near-duplicates are held out with it
        groups = set(df[df["key"].isin(held_out)]["dup_group"])
        held_out |= set(df[df["dup_group"].isin(groups)]["key"])
    exclude = frozenset(held_out) if cfg.exclude_target_keys else frozenset()
    subsets, emb_url, emb_sha = {}, None, None
    # plain rules first: the curation model is pretrained on one of them
    for rule in sorted(cfg.subsets, key=lambda r: bool(r.embedding_columns)):
        if rule.embedding_columns and emb_url is None:
            emb_url, emb_sha = embed_stage(cfg.embed, manifest_url, shards, cur_hash, subsets, pretrain)
        ident = [cur_hash, rule.to_dict()] + ([sorted(exclude)] if exclude else [])
        ident += [emb_sha] if rule.embedding_columns else []  # another embeddings table: another subset
        url = storage.join(shards, "subsets", f"{rule.name}-{digest(ident)[:12]}.parquet")
        if storage.exists(url):
            sub = mf.read_subset(url)
        else:
            sub = make_subset(curation_url, rule, url, exclude_keys=exclude,
                              embeddings_url=emb_url if rule.embedding_columns else None)  # fmt: skip
        subsets[rule.name] = _subset_info(rule.name, url, df, list(sub.keys), sub.inputs_hash)

    return PreparedData(
        manifest_url=manifest_url,
        curation_url=curation_url,
        targets=targets,
        embeddings_url=emb_url,
        subsets={r.name: subsets[r.name] for r in cfg.subsets},
    )
