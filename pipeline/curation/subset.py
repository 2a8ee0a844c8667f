"""Subsets of a curated shard set: rules pick keys from ``curation.parquet``; written as subset manifests.

Why manifests: a study compares pretraining on many subsets of one shard set (N random samples, the top
quality ones, one domain, deduplicated...). Copying shards per subset would multiply storage; a subset is a
Parquet list of keys plus provenance (its rule and the hash of its inputs), and the loader reads the
selected samples straight from the original shards.

A rule runs in three steps, each optional: filter (domains, flags, minimum quality, domain clusters, a
percentile band of learnability) -> dedup (one sample per near-duplicate group, the best by quality; by the
pHash's ``dup_group`` and/or the embeddings' ``sem_group``) -> take N (or a fraction) either at random or
best-first by quality, optionally balanced across clusters, or with a set share of one flag (``mix_flag``,
``mix_share``: equal-size subsets whose defect share is the only thing that differs). Samples curation could not decode are never
selected.

The model-based columns (``sem_group``, ``cluster``, ``recon_loss``) live in ``embeddings.parquet``
(``vmae embed``), next to ``curation.parquet``; a rule that uses them joins it on ``key`` and its hash goes
into the inputs' hash. A rule that leaves them unset records and hashes exactly as before they existed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.ingest import manifest

ORDERS = ("random", "quality")
# rule flag -> curation column that is True when the sample has that defect
FLAGS = {"static": "is_static", "dark": "is_dark", "black": "has_black", "cut": "has_cut"}
EMBEDDINGS_NAME = "embeddings.parquet"  # written by ``vmae embed`` beside curation.parquet
# rule field -> the embeddings column it reads; left out of the rule's record and hash when at its default
EMBEDDING_FIELDS = {
    "semantic_dedup": "sem_group", "include_clusters": "cluster", "balance_clusters": "cluster",
    "min_recon_pct": "recon_loss", "max_recon_pct": "recon_loss",
}  # fmt: skip


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
    semantic_dedup: bool = False  # keep one sample (best quality_score) per embedding near-duplicate group
    include_clusters: tuple[int, ...] = ()  # keep only these embedding clusters (empty: all)
    balance_clusters: bool = False  # take/fraction pick equally from every cluster (while it has samples)
    min_recon_pct: float | None = None  # drop samples whose recon_loss percentile (0-100) is below this ...
    max_recon_pct: float | None = None  # ... or above this (percentiles over all decodable embedded samples)
    mix_flag: str = ""  # with take/fraction: round(mix_share * N) of the N taken have this flag, the rest not
    mix_share: float | None = None

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
        if bool(self.mix_flag) != (self.mix_share is not None):
            raise ValueError("rule: give mix_flag and mix_share together")
        if self.mix_flag:
            if self.mix_flag not in FLAGS:
                raise ValueError(f"rule.mix_flag must be one of {sorted(FLAGS)}, got {self.mix_flag!r}")
            if self.mix_flag in self.exclude_flags:
                raise ValueError(f"rule: mix_flag {self.mix_flag!r} is also in exclude_flags")
            if not 0.0 <= self.mix_share <= 1.0:
                raise ValueError(f"rule.mix_share must be in [0, 1], got {self.mix_share}")
            if self.take is None and self.fraction is None:
                raise ValueError("rule: mix_share needs take or fraction (the size it shares out)")
            if self.balance_clusters:
                raise ValueError("rule: mix_flag with balance_clusters is not supported")
        lo, hi = self.min_recon_pct or 0.0, 100.0 if self.max_recon_pct is None else self.max_recon_pct
        if not 0.0 <= lo <= hi <= 100.0:
            raise ValueError(
                f"rule.min_recon_pct/max_recon_pct must be percentiles 0 <= min <= max <= 100, got {self.min_recon_pct}, {self.max_recon_pct}"
            )

    @property
    def embedding_columns(self) -> list[str]:
        """The embeddings columns this rule reads (empty: it needs only curation.parquet)."""
        return sorted({EMBEDDING_FIELDS[f] for f in EMBEDDING_FIELDS if getattr(self, f) != _DEFAULTS[f]})

    @property
    def flag_columns(self) -> list[str]:
        """The curation flag columns this rule reads."""
        return sorted({FLAGS[f] for f in (*self.exclude_flags, *([self.mix_flag] if self.mix_flag else []))})

    def to_dict(self) -> dict:
        """The rule as JSON-safe dict; embedding and mix fields at their defaults are left out, so rules
        written before they existed keep their record and inputs hash."""
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        return {k: v for k, v in d.items() if k not in _LATER_FIELDS or getattr(self, k) != _DEFAULTS[k]}


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SubsetRule)}
_LATER_FIELDS = {*EMBEDDING_FIELDS, "mix_flag", "mix_share"}  # added after rules were first recorded


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
    need = {"key", "domain", "quality_score", "error", "dup_group", *rule.flag_columns}
    missing = sorted(need - set(curation.columns))
    if missing:
        raise ValueError(f"curation table lacks column(s) {missing}; is it a vmae curation.parquet?")
    missing = sorted(set(rule.embedding_columns) - set(curation.columns))
    if missing:
        raise ValueError(f"the rule needs column(s) {missing} of {EMBEDDINGS_NAME}; run `vmae embed` first")
    if rule.min_recon_pct is not None or rule.max_recon_pct is not None:
        ok = curation[(curation["error"].fillna("") == "") & curation["recon_loss"].notna()]
        pct = ok["recon_loss"].rank(pct=True, method="average") * 100.0  # ties share their mean rank
        lo, hi = rule.min_recon_pct or 0.0, 100.0 if rule.max_recon_pct is None else rule.max_recon_pct
        curation = curation.loc[pct.index[(pct >= lo) & (pct <= hi)]] if len(pct) else curation.iloc[:0]
    df = curation[curation["error"].fillna("") == ""]
    for column in rule.embedding_columns:  # a sample without an embedding (or a cluster) is not selected
        df = df[df[column].notna() & ((df[column] >= 0) if column == "cluster" else True)]
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
    if rule.include_clusters:
        df = df[df["cluster"].isin(rule.include_clusters)]
    best_first = df.sort_values(["quality_score", "key"], ascending=[False, True], kind="stable")
    for flag, column in (("dedup", "dup_group"), ("semantic_dedup", "sem_group")):
        if getattr(rule, flag):
            best_first = best_first.drop_duplicates(column, keep="first")
            df = df.loc[df.index.isin(best_first.index)]
    n = rule.take if rule.take is not None else None
    if rule.fraction is not None:
        n = int(round(rule.fraction * len(df)))
    if n is not None:
        if n > len(df):
            raise ValueError(f"rule.take={n} but only {len(df)} samples pass the rule's filters")
        if rule.order == "quality":
            ranked = best_first.index
        else:
            ranked = random_rank(df["key"], rule.seed).sort_values(kind="stable").index
        if rule.balance_clusters:
            ranked = _round_robin(ranked, df["cluster"])
        if rule.mix_flag:
            flagged = df[FLAGS[rule.mix_flag]].fillna(False).astype(bool)
            n_flagged = int(round(rule.mix_share * n))
            parts = [(ranked[flagged[ranked].to_numpy()], n_flagged, "with"),
                     (ranked[~flagged[ranked].to_numpy()], n - n_flagged, "without")]  # fmt: skip
            for part, want, which in parts:
                if want > len(part):
                    raise ValueError(
                        f"rule: {want} of {n} samples {which} flag {rule.mix_flag!r} wanted "
                        f"(mix_share={rule.mix_share}), but only {len(part)} pass the rule's filters"
                    )
            ranked = parts[0][0][:n_flagged].append(parts[1][0][: n - n_flagged])
        df = df.loc[df.index.isin(ranked[:n])]
    return df["key"].tolist()


def _round_robin(ranked: pd.Index, cluster: pd.Series) -> pd.Index:
    """``ranked`` reordered so every cluster gives its best one, then every cluster its second best, ...
    (clusters in id order within a round): a prefix of any length is as balanced as the clusters allow."""
    c = cluster.loc[ranked].to_numpy()
    position = pd.Series(c).groupby(c).cumcount().to_numpy()
    order = np.lexsort((c, position))
    return ranked[order]


def inputs_hash(
    curation_bytes: bytes,
    rule: SubsetRule,
    exclude_keys: frozenset[str] = frozenset(),
    embeddings_bytes: bytes | None = None,
) -> str:
    """sha256 of the curation table's bytes, the rule as sorted JSON, the excluded keys (if any) and the
    embeddings table's bytes (if the rule reads it): equal hash, equal subset."""
    blob = curation_bytes + json.dumps(rule.to_dict(), sort_keys=True).encode()
    if exclude_keys:
        blob += b"\x00exclude\x00" + "\x1f".join(sorted(exclude_keys)).encode()
    if embeddings_bytes is not None:
        blob += b"\x00embeddings\x00" + hashlib.sha256(embeddings_bytes).digest()
    return hashlib.sha256(blob).hexdigest()


def _join_embeddings(
    df: pd.DataFrame, url: str, columns: list[str], cfg: storage.StorageConfig | None
) -> tuple[pd.DataFrame, bytes]:
    """``df`` with the embeddings ``columns`` joined on ``key`` (NaN where a key has no embedding row)."""
    try:
        raw = storage.read_bytes(url, cfg)
    except FileNotFoundError as e:
        raise ValueError(
            f"the rule needs {url!r} ({', '.join(columns)}); run `vmae embed --output` there first"
        ) from e
    emb = pq.read_table(pa.BufferReader(raw), columns=["key", *columns]).to_pandas()
    if len(df) and not df["key"].isin(emb["key"]).any():
        raise ValueError(f"{url!r} shares no key with the curation table: embeddings of another shard set?")
    return df.merge(emb, on="key", how="left", validate="one_to_one"), raw


def make_subset(
    curation_url: str,
    rule: SubsetRule,
    out_url: str,
    cfg: storage.StorageConfig | None = None,
    *,
    exclude_keys: frozenset[str] = frozenset(),
    embeddings_url: str | None = None,
) -> manifest.Subset:
    """Select with ``rule`` from ``curation_url`` and write the subset manifest to ``out_url`` (atomic).

    The manifest lists ``key`` (+ ``label``, ``domain``, ``shard`` for convenience) and records the source
    shard-set manifest named in the curation table's metadata, the rule (with the number of
    ``exclude_keys`` held out, and the embeddings table when the rule reads one) and the inputs' hash.
    ``embeddings_url`` defaults to ``embeddings.parquet`` beside the curation table.
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
    emb_raw, record_extra = None, {}
    if rule.embedding_columns:
        base = curation_url.rsplit("/", 1)[0] if "/" in curation_url else "."
        embeddings_url = embeddings_url or storage.join(base, EMBEDDINGS_NAME)
        df, emb_raw = _join_embeddings(df, embeddings_url, rule.embedding_columns, cfg)
        record_extra = {
            "embeddings": embeddings_url,
            "embeddings_sha256": hashlib.sha256(emb_raw).hexdigest(),
        }
    keys = select(df, rule, exclude_keys)
    rows = df.set_index("key").loc[keys] if keys else df.iloc[:0].set_index("key")
    extra = {
        "label": [None if pd.isna(v) else int(v) for v in rows["label"]],
        "domain": rows["domain"].tolist(),
        "shard": rows["shard"].tolist(),
    }
    digest = inputs_hash(raw, rule, exclude_keys, emb_raw)
    record = {
        **rule.to_dict(),
        **({"excluded_keys": len(exclude_keys)} if exclude_keys else {}),
        **record_extra,
    }
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
