"""The data a study trains and evaluates on: synth -> shard -> curate -> subsets and labelled target splits.

Why content-addressed: every stage writes under a name that ends with the hash of its inputs and config
(``raw-<h>``, ``shards-<h>``, ``curation-<h>.parquet``, ``subsets/<name>-<h>.parquet``), so a rerun finds
the stages that are already there and skips them, and a changed config writes next to, never over, the old
data. Stages call the jobs' Python APIs (``synthesize``, ``shard``, ``run_curation``, ``make_subset``) on
the Ray instance the study started.

A *target* is a labelled evaluation set: a subset rule (usually clean samples of some domains) whose keys are
split per class into a probe-train and a probe-test subset (stratified, seeded, disjoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.config import load_config, to_dict
from pipeline import manifest as mf
from pipeline import storage
from pipeline.subset import SubsetRule, make_subset, random_rank, select
from pipeline.synth import SUMMARY_NAME, SynthConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetSpec:
    """A labelled target set: ``rule`` picks its samples, ``test_fraction`` of each class is probe-test."""

    name: str
    rule: SubsetRule = dataclasses.field(default_factory=SubsetRule)
    test_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("data.targets: every target needs a name")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(
                f"target {self.name!r}: test_fraction must be in (0, 1), got {self.test_fraction}"
            )


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class SubsetInfo:
    name: str
    url: str
    size: int
    inputs_hash: str
    mean_quality: float
    flagged_frac: float  # fraction flagged static, dark or with black frames by curation
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

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreparedData:
    manifest_url: str
    curation_url: str
    subsets: dict[str, SubsetInfo]
    targets: dict[str, TargetInfo]


def stratified_split(df: pd.DataFrame, test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split rows (columns ``key``, ``label``) per label: the ``round(test_fraction * n)`` keys of smallest
    seeded random rank go to test (at least one train and one test key per label with >= 2 samples)."""
    train, test = [], []
    for _, g in df.groupby("label", sort=True):
        keys = [k for _, k in sorted(zip(random_rank(g["key"], seed), g["key"], strict=True))]
        n = len(keys)
        n_test = min(max(int(round(test_fraction * n)), 1), n - 1) if n >= 2 else 0
        test += keys[:n_test]
        train += keys[n_test:]
    return sorted(train), sorted(test)


def _subset_info(name: str, url: str, df: pd.DataFrame, keys: list[str], inputs_hash: str) -> SubsetInfo:
    rows = df[df["key"].isin(set(keys))]
    flagged = (
        rows["is_static"].fillna(False) | rows["is_dark"].fillna(False) | rows["has_black"].fillna(False)
    )
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
    ident = {"rule": spec.rule.to_dict(), "test_fraction": spec.test_fraction, "seed": spec.seed,
             "curation": hashlib.sha256(raw).hexdigest()}  # fmt: skip
    h = digest(ident)
    if storage.exists(train_url) and storage.exists(test_url):
        return list(mf.read_subset(train_url).keys), list(mf.read_subset(test_url).keys), h
    table = pq.read_table(pa.BufferReader(raw))
    source = (table.schema.metadata or {}).get(b"source_manifest", b"").decode()
    df = table.to_pandas()
    chosen = df[df["key"].isin(set(select(df, spec.rule)))]
    if chosen["label"].isna().any():
        raise ValueError(f"target {spec.name!r}: {int(chosen['label'].isna().sum())} samples have no label")
    train, test = stratified_split(chosen, spec.test_fraction, spec.seed)
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


def prepare_data(cfg: DataConfig, root: str) -> PreparedData:
    """Make (or find) everything the cells read: the shard set, its curation, each subset and target split."""
    from jobs.curate import CurateConfig, run_curation
    from jobs.shard import ShardJobConfig, shard

    def job_cfg(cls: type, ref: JobRef, extra: tuple[str, ...] = ()) -> Any:
        return load_config(cls, resolve_path(ref.config) if ref.config else None, [*ref.overrides, *extra])

    if cfg.synth is not None:
        from pipeline.synth import synthesize

        raw = storage.join(root, f"raw-{digest(to_dict(cfg.synth))[:12]}")
        if not storage.exists(storage.join(raw, SUMMARY_NAME)):  # synth.json is written last
            synthesize(cfg.synth, raw)
        # synth writes <domain>/<class>/<clip>.mp4: class from the parent folder, domain from the first one
        scfg = job_cfg(ShardJobConfig, cfg.shard, ("source.labels=folder", "source.domain_from=prefix"))
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
        ccfg = job_cfg(CurateConfig, cfg.curate)
        ident = [manifest_url, m.stats.get("fingerprint") or m.created, to_dict(ccfg)]
        curation_url = storage.join(shards, f"curation-{digest(ident)[:12]}.parquet")
        if not storage.exists(curation_url):
            run_curation(manifest_url, curation_url, ccfg)
    curation_bytes = storage.read_bytes(curation_url)
    cur_hash = hashlib.sha256(curation_bytes).hexdigest()
    table = mf.read_table(curation_url)
    df = table.to_pandas()

    subsets = {}
    for rule in cfg.subsets:
        url = storage.join(
            shards, "subsets", f"{rule.name}-{digest([cur_hash, rule.to_dict()])[:12]}.parquet"
        )
        sub = mf.read_subset(url) if storage.exists(url) else make_subset(curation_url, rule, url)
        subsets[rule.name] = _subset_info(rule.name, url, df, list(sub.keys), sub.inputs_hash)

    targets = {}
    for t in cfg.targets:
        h = digest([cur_hash, t.rule.to_dict(), t.test_fraction, t.seed])[:12]
        train_url = storage.join(shards, "targets", f"{t.name}-train-{h}.parquet")
        test_url = storage.join(shards, "targets", f"{t.name}-test-{h}.parquet")
        train, test, h = write_target_split(curation_url, t, train_url, test_url)
        domains = tuple(sorted(df[df["key"].isin(set(train + test))]["domain"].astype(str).unique()))
        targets[t.name] = TargetInfo(name=t.name, train_url=train_url, test_url=test_url, train_size=len(train),
                                     test_size=len(test), inputs_hash=h, domains=domains)  # fmt: skip
    return PreparedData(
        manifest_url=manifest_url, curation_url=curation_url, subsets=subsets, targets=targets
    )
