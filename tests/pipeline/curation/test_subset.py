import dataclasses
import glob
import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from jobs.cli import main
from jobs.config import load_config
from pipeline import storage
from pipeline.curation.subset import SubsetRule, inputs_hash, make_subset, random_rank, select
from pipeline.ingest import manifest


def _curation(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """A curation-shaped table with random metrics, a few decode errors and planted duplicate groups."""
    rng = np.random.default_rng(seed)
    keys = [f"k{i:04d}" for i in rng.permutation(n)]  # table order is not key order
    group = np.arange(n)
    group[5:9] = 5  # one group of 4
    group[20:22] = 20
    q = rng.random(n).round(2)  # rounding makes ties: the key breaks them
    return pd.DataFrame(
        {
            "key": keys, "shard": [f"shard-{i // 20:06d}.tar" for i in range(n)],
            "label": rng.integers(0, 4, n), "domain": rng.choice(["textures", "shapes", "gradients"], n),
            "quality_score": q, "is_static": rng.random(n) < 0.1, "is_dark": rng.random(n) < 0.1,
            "has_black": rng.random(n) < 0.1, "error": np.where(rng.random(n) < 0.05, "BadSample: x", ""),
            "dup_group": group, "dup_group_size": np.bincount(group, minlength=n)[group],
        }
    )  # fmt: skip


def _with_embeddings(df: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    """``df`` with the columns ``vmae embed`` adds: semantic groups, 3 unequal clusters, recon losses."""
    rng = np.random.default_rng(seed)
    n = len(df)
    sem = np.arange(n)
    sem[30:34] = 30
    sem[40:42] = 40
    loss = rng.random(n).round(2)
    loss[3] = np.nan  # a clip without an embedding
    return df.assign(sem_group=sem, cluster=rng.choice([0, 1, 2], n, p=[0.6, 0.3, 0.1]), recon_loss=loss)


# the rule fields and defaults before embedding-based fields existed: such rules must hash as they did
OLD_RULE = {"name": "", "include_domains": [], "exclude_domains": [], "exclude_flags": [], "min_quality": None,
            "dedup": False, "take": None, "fraction": None, "order": "random", "seed": 0}  # fmt: skip


def _write(df: pd.DataFrame, url: str, source: str = "file:///set/manifest.json") -> bytes:
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({b"source_manifest": source.encode()})
    manifest.write_table_atomic(url, table)
    return storage.read_bytes(url)


def _in_order(df: pd.DataFrame, keys) -> list[str]:
    keep = set(keys)
    return [k for k in df["key"] if k in keep]


def test_filters_match_pandas():
    df = _curation()
    ok = df[df.error == ""]
    rule = SubsetRule(
        include_domains=("textures", "shapes"), exclude_flags=("static", "black"), min_quality=0.3
    )
    ref = ok[
        ok.domain.isin(["textures", "shapes"]) & ~ok.is_static & ~ok.has_black & (ok.quality_score >= 0.3)
    ]
    assert select(df, rule) == ref.key.tolist()
    assert select(df, SubsetRule(exclude_domains=("shapes",))) == ok[ok.domain != "shapes"].key.tolist()
    assert select(df, SubsetRule()) == ok.key.tolist()  # errors are never selected


def test_dedup_keeps_best_per_group():
    df = _curation()
    ok = df[df.error == ""]
    keep = set()
    for _, g in ok.groupby("dup_group"):
        best = max(g.itertuples(), key=lambda r: (r.quality_score, [-ord(c) for c in r.key]))
        keep.add(best.key)
    got = select(df, SubsetRule(dedup=True))
    assert got == _in_order(ok, keep) and len(got) == ok.dup_group.nunique()


def test_top_n_and_fraction_by_quality():
    df = _curation()
    ok = df[df.error == ""]
    top = sorted(ok.itertuples(), key=lambda r: (-r.quality_score, r.key))[:10]
    assert select(df, SubsetRule(take=10, order="quality")) == _in_order(ok, [r.key for r in top])
    n = int(round(0.3 * len(ok)))
    top = sorted(ok.itertuples(), key=lambda r: (-r.quality_score, r.key))[:n]
    assert select(df, SubsetRule(fraction=0.3, order="quality")) == _in_order(ok, [r.key for r in top])


def test_random_n_is_seeded_nested_and_composes_with_filters():
    df = _curation()
    ok = df[(df.error == "") & (df.domain != "gradients")]
    rank = {k: int.from_bytes(hashlib.sha256(f"7:{k}".encode()).digest()[:8], "big") for k in ok.key}
    ref = sorted(rank, key=rank.get)[:12]
    rule = SubsetRule(exclude_domains=("gradients",), take=12, seed=7)
    got = select(df, rule)
    assert got == _in_order(ok, ref)
    bigger = select(df, dataclasses.replace(rule, take=20))
    assert set(got) < set(bigger)  # nested in N
    assert set(select(df, dataclasses.replace(rule, seed=8))) != set(got)
    assert random_rank(pd.Series(["a", "b"]), 0).dtype == np.uint64


def test_mixed_take_has_the_share_of_the_flag_and_is_nested_in_it():
    df = _curation(300).assign(has_cut=np.random.default_rng(5).random(300) < 0.4)
    ok = df[(df.error == "") & ~df.is_static]
    rank = {k: int.from_bytes(hashlib.sha256(f"3:{k}".encode()).digest()[:8], "big") for k in ok.key}
    picked = {}
    for share in (0.0, 0.25, 0.5, 0.75):
        rule = SubsetRule(exclude_flags=("static",), take=80, seed=3, mix_flag="cut", mix_share=share)
        got = select(df, rule)
        n_cut = round(share * 80)
        ref = (
            sorted(ok.key[ok.has_cut], key=rank.get)[:n_cut]
            + sorted(ok.key[~ok.has_cut], key=rank.get)[: 80 - n_cut]
        )
        assert got == _in_order(ok, ref) and len(got) == 80
        picked[share] = set(got)
    cut = set(df.key[df.has_cut])
    assert picked[0.25] & cut < picked[0.5] & cut < picked[0.75] & cut  # the flagged part grows, nested
    assert picked[0.75] - cut < picked[0.5] - cut < picked[0.25] - cut  # the rest shrinks, nested
    plain = select(df.drop(columns=["has_cut"]), SubsetRule(exclude_flags=("static",), take=80, seed=3))
    assert len(plain) == 80  # a rule that does not name a flag does not need its column
    with pytest.raises(
        ValueError, match=r"60 of 80 samples with flag 'cut' wanted \(mix_share=0.75\), but only"
    ):
        select(df.assign(has_cut=df.has_cut & (np.arange(300) < 100)), rule)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['has_cut'\]"):
        select(df.drop(columns=["has_cut"]), rule)


def test_take_more_than_available_is_an_error():
    with pytest.raises(ValueError, match=r"rule.take=500 but only \d+ samples"):
        select(_curation(), SubsetRule(take=500))
    with pytest.raises(ValueError, match="lacks column"):
        select(_curation().drop(columns=["dup_group"]), SubsetRule())


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(include_domains=("a",), exclude_domains=("a",)), "both included and excluded"),
        (dict(exclude_flags=("blurry",)), "unknown flag"),
        (dict(min_quality=1.5), "min_quality"),
        (dict(take=3, fraction=0.5), "not both"),
        (dict(take=-1), "take must be"),
        (dict(fraction=0.0), "fraction must be"),
        (dict(order="best"), "order must be"),
        (dict(mix_flag="cut", take=3), "mix_flag and mix_share together"),
        (dict(mix_flag="blurry", mix_share=0.5, take=3), "mix_flag must be one of"),
        (dict(mix_flag="cut", mix_share=0.5, take=3, exclude_flags=("cut",)), "also in exclude_flags"),
        (dict(mix_flag="cut", mix_share=1.5, take=3), "mix_share must be in"),
        (dict(mix_flag="cut", mix_share=0.5), "needs take or fraction"),
    ],
)
def test_rule_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SubsetRule(**kw)


def test_make_subset_records_rule_and_inputs_hash(tmp_path):
    df = _curation()
    raw = _write(df, str(tmp_path / "curation.parquet"))
    rule = SubsetRule(name="top", take=5, order="quality")
    sub = make_subset(str(tmp_path / "curation.parquet"), rule, str(tmp_path / "s.parquet"))
    back = manifest.read_subset(str(tmp_path / "s.parquet"))
    old = {**OLD_RULE, "name": "top", "take": 5, "order": "quality"}
    expected_hash = hashlib.sha256(raw + json.dumps(old, sort_keys=True).encode()).hexdigest()
    assert back.inputs_hash == sub.inputs_hash == expected_hash == inputs_hash(raw, rule)
    assert back.keys == tuple(select(df, rule)) and back.rule == rule.to_dict() == old
    assert back.source_manifest == "file:///set/manifest.json"
    extra = manifest.read_table(str(tmp_path / "s.parquet")).to_pandas().set_index("key")
    src = df.set_index("key").loc[list(back.keys)]
    assert extra.label.tolist() == src.label.tolist() and extra.shard.tolist() == src.shard.tolist()
    with pytest.raises(ValueError, match="does not exist"):
        make_subset(str(tmp_path / "nope.parquet"), rule, str(tmp_path / "x.parquet"))


@pytest.mark.s3
def test_make_subset_on_s3(s3_bucket):
    df = _curation(20)
    _write(df, f"{s3_bucket}/set/curation.parquet", source=f"{s3_bucket}/set/manifest.json")
    sub = make_subset(
        f"{s3_bucket}/set/curation.parquet", SubsetRule(dedup=True), f"{s3_bucket}/set/d.parquet"
    )
    back = manifest.read_subset(f"{s3_bucket}/set/d.parquet")
    assert back.keys == sub.keys and back.source_manifest == f"{s3_bucket}/set/manifest.json"


def test_subset_cli_with_config_and_rule_overrides(tmp_path, capsys):
    df = _curation()
    _write(df, str(tmp_path / "c.parquet"))
    out = str(tmp_path / "n.parquet")
    args = ["subset", "--curation", str(tmp_path / "c.parquet"), "--output", out]
    assert main([*args, "--config", "configs/curate/subsets/clean.yaml", "--rule", "take=5", "seed=3"]) == 0
    rule = dataclasses.replace(load_config(SubsetRule, "configs/curate/subsets/clean.yaml"), take=5, seed=3)
    assert manifest.read_subset(out).keys == tuple(select(df, rule))
    assert "5 samples" in capsys.readouterr().out
    assert main(args) == 2  # bad input: one line on stderr, rc 2
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(glob.glob("configs/curate/subsets/*.yaml")))
def test_rule_yamls_load_and_select(path):
    rule = load_config(SubsetRule, path)
    assert rule.name == path.rsplit("/", 1)[1].removesuffix(".yaml")
    df = _with_embeddings(_curation(200))
    keys = select(df, rule)
    assert keys and len(set(keys)) == len(keys) and set(keys) <= set(df.key)


def test_rule_yamls_exist():
    assert len(glob.glob("configs/curate/subsets/*.yaml")) >= 4


def test_semantic_dedup_clusters_and_learnability_band_match_pandas():
    df = _with_embeddings(_curation())
    ok = df[df.error == ""]
    keep = set()
    for _, g in ok.groupby("sem_group"):
        keep.add(max(g.itertuples(), key=lambda r: (r.quality_score, [-ord(c) for c in r.key])).key)
    assert select(df, SubsetRule(semantic_dedup=True)) == _in_order(ok, keep)
    both = select(df, SubsetRule(semantic_dedup=True, dedup=True))
    assert len(both) < len(keep) and set(both) <= keep
    assert select(df, SubsetRule(include_clusters=(0, 2))) == ok[ok.cluster.isin([0, 2])].key.tolist()
    # percentile band: by the empirical CDF over decodable clips that have a loss, computed directly
    have = df[(df.error == "") & df.recon_loss.notna()]
    pct = {k: 100.0 * ((have.recon_loss < v).sum() + ((have.recon_loss == v).sum() + 1) / 2) / len(have)
           for k, v in zip(have.key, have.recon_loss, strict=True)}  # fmt: skip
    want = [k for k in have.key if 10 <= pct[k] <= 90]
    assert select(df, SubsetRule(min_recon_pct=10, max_recon_pct=90)) == want
    assert 0.75 * len(have) < len(want) < 0.85 * len(have)


def test_balanced_take_is_as_even_as_the_clusters_allow():
    df = _with_embeddings(_curation(200))
    ok = df[df.error == ""]
    sizes = ok.cluster.value_counts()
    got = select(df, SubsetRule(take=30, balance_clusters=True, seed=2))
    counts = ok.set_index("key").loc[got].cluster.value_counts()
    assert len(got) == 30 and counts.max() - counts.min() <= 1 and set(counts.index) == {0, 1, 2}
    many = select(df, SubsetRule(take=3 * int(sizes.min()) + 30, balance_clusters=True))
    counts = ok.set_index("key").loc[many].cluster.value_counts()
    assert counts[sizes.idxmin()] == sizes.min()  # the smallest cluster is used up, the others share the rest
    plain = ok.set_index("key").loc[select(df, SubsetRule(take=30, seed=2))].cluster.value_counts()
    assert plain.max() - plain.min() > 5  # unbalanced, the 60/30/10 split shows through


def test_embedding_rules_join_embeddings_and_record_them(tmp_path):
    df = _curation()
    emb = _with_embeddings(df)[["key", "sem_group", "cluster", "recon_loss"]]
    raw = _write(df, str(tmp_path / "curation.parquet"))
    rule = SubsetRule(semantic_dedup=True, include_clusters=(0, 1), min_recon_pct=5.0)
    with pytest.raises(ValueError, match="run `vmae embed"):
        make_subset(str(tmp_path / "curation.parquet"), rule, str(tmp_path / "s.parquet"))
    emb_raw = _write(emb, str(tmp_path / "embeddings.parquet"))
    sub = make_subset(str(tmp_path / "curation.parquet"), rule, str(tmp_path / "s.parquet"))
    assert sub.keys == tuple(select(df.merge(emb, on="key"), rule))
    back = manifest.read_subset(str(tmp_path / "s.parquet"))
    assert back.rule["embeddings"] == str(tmp_path / "embeddings.parquet")
    assert back.rule["embeddings_sha256"] == hashlib.sha256(emb_raw).hexdigest()
    assert back.rule["include_clusters"] == [0, 1] and "balance_clusters" not in back.rule
    assert back.inputs_hash == inputs_hash(raw, rule, embeddings_bytes=emb_raw) != inputs_hash(raw, rule)
    with pytest.raises(ValueError, match="needs column"):
        select(df, rule)  # without the join
    with pytest.raises(ValueError, match="percentiles"):
        SubsetRule(min_recon_pct=80, max_recon_pct=20)
