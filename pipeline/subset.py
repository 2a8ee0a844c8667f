"""Subsets of a curated shard set: rules pick keys from ``curation.parquet``; written as subset manifests.

Why manifests: a study compares pretraining on many subsets of one shard set (N random samples, the top
quality ones, one domain, deduplicated...). Copying shards per subset would multiply storage; a subset is a
Parquet list of keys plus provenance (its rule and the hash of its inputs), and the loader reads the
selected samples straight from the original shards.

A rule runs in three steps, each optional: filter (domains, flags, minimum quality) -> dedup (one sample per
near-duplicate group, the best by quality) -> take N (or a fraction) either at random or best-first by
quality. Samples curation could not decode are never selected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import manifest, storage

ORDERS = ("random", "quality")
# rule flag -> curation column that is True when the sample has that defect
FLAGS = {"static": "is_static", "dark": "is_dark", "black": "has_black"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SubsetRule:
    """What to select. Empty/None fields do not filter; ``take``/``fraction`` unset keeps every survivor."""

    name: str = ""
    include_domains: tuple[str, ...] = ()  # keep only these domains (empty: all)
    exclude_domains: tuple[str, ...] = ()
    exclude_flags: tuple[str, ...] = ()  # drop samples flagged with any of FLAGS
    min_quality: float | None = None  # drop samples with quality_score below this
    dedup: bool = False  # keep one sample (highest quality_score, then smallest key) per dup_group
    take: int | None = None  # then keep exactly this many ...
    fraction: float | None = None  # ... or this fraction (rounded) of the survivors
    order: str = "random"  # which ones take/fraction keep: seeded "random" or best-first by "quality"
    seed: int = 0

    def __post_init__(self) -> None:
        both = sorted(set(self.include_domains) & set(self.exclude_domains))
        if both:
            raise ValueError(f"rule: domains {both} are both included and excluded")
        bad = sorted(set(self.exclude_flags) - set(FLAGS))
        if bad:
            raise ValueError(f"rule.exclude_flags: unknown flag(s) {bad}; allowed: {sorted(FLAGS)}")
        if self.min_quality is not None and not 0.0 <= self.min_quality <= 1.0:
            raise ValueError(
                f"rule.min_quality must be in [0, 1] (quality_score's range), got {self.min_quality}"
            )
        if self.take is not None and self.fraction is not None:
            raise ValueError("rule: give take or fraction, not both")
        if self.take is not None and self.take < 0:
            raise ValueError(f"rule.take must be >= 0, got {self.take}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"rule.fraction must be in (0, 1], got {self.fraction}")
        if self.order not in ORDERS:
            raise ValueError(f"rule.order must be one of {ORDERS}, got {self.order!r}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def random_rank(keys: pd.Series, seed: int) -> pd.Series:
    """Seeded pseudo-random rank (uint64) of each key: sha256(f"{seed}:{key}")'s first 8 bytes, big-endian.

    Taking the N smallest gives "random N" subsets that are nested (N=100 lies inside N=200 with the same
    seed) and stable when samples are added, which data-scaling studies want.
    """
    ranks = [int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "big") for k in keys]
    return pd.Series(np.array(ranks, np.uint64), index=keys.index)


def select(curation: pd.DataFrame, rule: SubsetRule, exclude_keys: frozenset[str] = frozenset()) -> list[str]:
    """Keys ``rule`` selects from a curation table (``curation.parquet`` as a DataFrame), in table order;
    ``exclude_keys`` are never selected (e.g. a study's labelled evaluation clips)."""
    need = {"key", "domain", "quality_score", "error", "dup_group", *FLAGS.values()}
    missing = sorted(need - set(curation.columns))
    if missing:
        raise ValueError(f"curation table lacks column(s) {missing}; is it a vmae curation.parquet?")
    df = curation[curation["error"].fillna("") == ""]
    if exclude_keys:
        df = df[~df["key"].isin(exclude_keys)]
    if rule.include_domains:
        df = df[df["domain"].isin(rule.include_domains)]
    if rule.exclude_domains:
        df = df[~df["domain"].isin(rule.exclude_domains)]
    for flag in rule.exclude_flags:
        df = df[~df[FLAGS[flag]].fillna(False).astype(bool)]
    if rule.min_quality is not None:
        df = df[df["quality_score"] >= rule.min_quality]
    best_first = df.sort_values(["quality_score", "key"], ascending=[False, True], kind="stable")
    if rule.dedup:
        best_first = best_first.drop_duplicates("dup_group", keep="first")
        df = df.loc[df.index.isin(best_first.index)]
    n = rule.take if rule.take is not None else None
    if rule.fraction is not None:
        n = int(round(rule.fraction * len(df)))
    if n is not None:
        if n > len(df):
            raise ValueError(f"rule.take={n} but only {len(df)} samples pass the rule's filters")
        if rule.order == "quality":
            chosen = best_first.index[:n]
        else:
            chosen = random_rank(df["key"], rule.seed).sort_values(kind="stable").index[:n]
        df = df.loc[df.index.isin(chosen)]
    return df["key"].tolist()


def inputs_hash(curation_bytes: bytes, rule: SubsetRule, exclude_keys: frozenset[str] = frozenset()) -> str:
    """sha256 of the curation table's bytes, the rule as sorted JSON and the excluded keys (if any): equal
    hash, equal subset."""
    blob = curation_bytes + json.dumps(rule.to_dict(), sort_keys=True).encode()
    if exclude_keys:
        blob += b"\x00exclude\x00" + "\x1f".join(sorted(exclude_keys)).encode()
    return hashlib.sha256(blob).hexdigest()


def make_subset(
    curation_url: str,
    rule: SubsetRule,
    out_url: str,
    cfg: storage.StorageConfig | None = None,
    *,
    exclude_keys: frozenset[str] = frozenset(),
) -> manifest.Subset:
    """Select with ``rule`` from ``curation_url`` and write the subset manifest to ``out_url`` (atomic).

    The manifest lists ``key`` (+ ``label``, ``domain``, ``shard`` for convenience) and records the source
    shard-set manifest named in the curation table's metadata, the rule (with the number of
    ``exclude_keys`` held out) and the inputs' hash.
    """
    try:
        raw = storage.read_bytes(curation_url, cfg)
    except FileNotFoundError as e:
        raise ValueError(f"curation table {curation_url!r} does not exist; run `vmae curate` first") from e
    table = pq.read_table(pa.BufferReader(raw))  # hashed and parsed from the same bytes
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if "source_manifest" not in meta:
        raise ValueError(
            f"{curation_url!r} has no source_manifest in its metadata; is it a vmae curation.parquet?"
        )
    df = table.to_pandas()
    keys = select(df, rule, exclude_keys)
    rows = df.set_index("key").loc[keys] if keys else df.iloc[:0].set_index("key")
    extra = {
        "label": [None if pd.isna(v) else int(v) for v in rows["label"]],
        "domain": rows["domain"].tolist(),
        "shard": rows["shard"].tolist(),
    }
    digest = inputs_hash(raw, rule, exclude_keys)
    record = {**rule.to_dict(), **({"excluded_keys": len(exclude_keys)} if exclude_keys else {})}
    manifest.write_subset(
        out_url, keys, source_manifest=meta["source_manifest"], rule=record, inputs_hash=digest,
        extra_columns=extra, cfg=cfg,
    )  # fmt: skip
    return manifest.Subset(
        keys=tuple(keys),
        source_manifest=meta["source_manifest"],
        rule=record,
        inputs_hash=digest,
        url=out_url,
    )
