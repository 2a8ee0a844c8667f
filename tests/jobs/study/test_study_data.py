"""A study's data with model-based subsets: the embed stage (a curation model pretrained on a plain subset, then
``vmae embed``) runs only for rules that read its columns, their subsets match the table, reruns skip it, and
another embeddings table makes another subset; config errors name the rule; the shipped model-curation data
is the CPU studies' data plus that stage."""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os

import pandas as pd
import pytest
import yaml

from jobs.config import from_dict, load_config
from jobs.study.cells import pretrain_stage
from jobs.study.data import DataConfig, EmbedSection, prepare_data
from jobs.study.study import StudyConfig
from pipeline.curation.subset import SubsetRule
from pipeline.ingest import manifest as mf
from pipeline.ingest.sources import make_key

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
DEBUG = os.path.join(ROOT, "configs", "study", "debug.yaml")
STEPS = ["schedule.total_steps=2", "schedule.warmup_steps=1", "checkpoint.every_steps=2", "metrics.image_every=2",
         "scaling.num_workers=1", "loader.cache=true"]  # fmt: skip
DATA = {
    "synth": {"seed": 1, "domains": ["shapes", "textures"], "classes": ["left", "up"], "videos_per_class": 6,
              "sizes": [[32, 32]], "frames": [8], "fps": [15], "workers": 1,
              "defects": {"duplicate": 0.25, "static": 0, "blur": 0, "near_duplicate": 0, "black": 0, "dark": 0}},
    "shard": {"config": "configs/shard/debug.yaml", "overrides": ["transcode.short_side=32"]},
    "subsets": [{"name": "all"}, {"name": "sem", "semantic_dedup": True}],
    "targets": [{"name": "shapes", "rule": {"include_domains": ["shapes"]}, "train_per_group": 1,
                 "test_per_group": 1, "stratify": ["domain", "label"]}],
    "embed": {"pretrain": {"config": "configs/pretrain/debug.yaml", "overrides": STEPS}, "subset": "all",
              "config": "configs/curate/embed/debug.yaml", "overrides": ["actors=0", "semantic.k_max=3"]},
}  # fmt: skip
LOCAL = functools.partial(pretrain_stage, init="pretrained", launcher="local")  # as vmae study passes it


def _boom(*_, **__):
    raise AssertionError("ran again")


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("study_data"))
    cfg = from_dict(DataConfig, DATA)
    return cfg, root, prepare_data(cfg, root, pretrain=LOCAL)


@pytest.mark.slow
def test_semantic_dedup_subset_keeps_the_best_clip_of_each_embedding_group(prepared):
    cfg, root, data = prepared
    cur = mf.read_table(data.curation_url).to_pandas()
    emb = mf.read_table(data.embeddings_url).to_pandas()
    assert sorted(emb["key"]) == sorted(cur["key"]) and (emb["error"] == "").all()
    df = cur.merge(emb[["key", "sem_group"]], on="key")
    t = data.targets["shapes"]
    held = set(mf.read_subset(t.train_url).keys) | set(mf.read_subset(t.test_url).keys)
    held |= set(df[df["dup_group"].isin(df[df["key"].isin(held)]["dup_group"])]["key"])
    pool = df[(df["error"].fillna("") == "") & ~df["key"].isin(held)]
    best = {g.sort_values(["quality_score", "key"], ascending=[False, True])["key"].iloc[0]
            for _, g in pool.groupby("sem_group")}  # fmt: skip
    sem = set(mf.read_subset(data.subsets["sem"].url).keys)
    assert sem == best and set(mf.read_subset(data.subsets["all"].url).keys) == set(pool["key"])
    # the planted exact re-encodes fall into their source's embedding group: one of each pair survives
    labels = pd.read_csv(glob.glob(os.path.join(root, "raw-*", "labels.csv"))[0]).fillna("")
    clip = {k.rsplit("_c", 1)[0]: k for k in df["key"]}  # a short video is one clip, key <source key>_c000
    pairs = [(clip[make_key(r.path)], clip[make_key(r.duplicate_of)])
             for r in labels.itertuples() if r.defect == "duplicate"]  # fmt: skip
    assert len(clip) == len(df) and len(pairs) == 6
    pairs = [p for p in pairs if not set(p) & held]
    group = dict(zip(df["key"], df["sem_group"], strict=True))
    assert pairs and all(group[a] == group[b] and len({a, b} & sem) == 1 for a, b in pairs)
    assert data.subsets["sem"].size <= data.subsets["all"].size - len(pairs)
    assert mf.read_subset(data.subsets["sem"].url).rule["embeddings"] == data.embeddings_url
    assert "embeddings" not in mf.read_subset(data.subsets["all"].url).rule
    # the table was embedded with the curation model pretrained here, on subset "all" (targets held out)
    (done,) = glob.glob(os.path.join(root, "shards-*", "embed", "model-*", "pretrain.json"))
    record = json.loads(open(done).read())
    meta = json.loads(mf.read_table(data.embeddings_url).schema.metadata[b"checkpoint"])
    assert meta["url"] == record["checkpoint"] and record["steps"] == 2
    run_cfg = yaml.safe_load(open(os.path.join(os.path.dirname(done), "config.yaml")))
    assert run_cfg["loader"]["subset"] == data.subsets["all"].url


@pytest.mark.slow
def test_rerun_skips_and_another_embedding_makes_another_subset(prepared, monkeypatch):
    cfg, root, data = prepared
    done = glob.glob(os.path.join(root, "shards-*", "embed", "model-*", "pretrain.json"))
    stamps = {p: os.stat(p).st_mtime_ns for p in [*done, data.embeddings_url]}
    with monkeypatch.context() as m:  # nothing is trained or embedded again
        m.setattr("jobs.study.data.run_embed", _boom)
        assert prepare_data(cfg, root, pretrain=_boom) == data
        plain = dataclasses.replace(cfg, subsets=cfg.subsets[:1])  # no rule reads the embeddings: no stage
        assert prepare_data(plain, root).embeddings_url is None
    assert len(done) == 1 and {p: os.stat(p).st_mtime_ns for p in stamps} == stamps

    ckpt = json.loads(open(done[0]).read())["checkpoint"]
    given = dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, pretrain=None, checkpoint=ckpt))
    other = prepare_data(given, root)  # the same model, named by URL: another table, so another subset
    assert other.embeddings_url != data.embeddings_url and other.subsets["all"] == data.subsets["all"]
    assert other.subsets["sem"].url != data.subsets["sem"].url
    a, b = (mf.read_table(d.embeddings_url).to_pandas() for d in (data, other))
    assert a["sem_group"].equals(b["sem_group"]) and other.subsets["sem"].size == data.subsets["sem"].size


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.subsets=[{name: all}, {name: learnable, min_recon_pct: 20}]",
         r"^data.subsets: rule 'learnable' reads recon_loss of the embeddings table; add a data.embed section"),
        ("data.targets=[{name: t, rule: {balance_clusters: true}}]", r"^target 't': .* not cluster"),
        ("data.embed={subset: all}", "exactly one of pretrain"),
        ("data.embed={checkpoint: /m, pretrain: {config: x}}", "exactly one of pretrain"),
        ("data.embed={subset: nope, pretrain: {config: configs/pretrain/debug.yaml}}",
         r"data.embed.subset 'nope' must name a subset that needs no embeddings, from \['all', 'clean', 'cut50'\]"),
    ],
)  # fmt: skip
def test_an_embedding_rule_without_its_stage_fails_at_config_load(override, message):
    with pytest.raises(ValueError, match=message) as e:
        load_config(StudyConfig, DEBUG, [override])
    assert "\n" not in str(e.value)


def test_model_curation_data_is_the_cpu_data_plus_its_embed_stage(monkeypatch):
    monkeypatch.chdir(ROOT)
    study = load_config(StudyConfig, "configs/study/model_curation.yaml")
    cpu = load_config(DataConfig, "configs/study/data/cpu.yaml")
    data = study.data
    assert dataclasses.replace(data, subsets=data.subsets[:-1], embed=None) == cpu  # shares the cached data
    assert data.subsets[-1] == SubsetRule(name="model_curated", semantic_dedup=True, min_recon_pct=25.0)
    assert data.embed == EmbedSection(
        pretrain=study.pretrain, subset="all", config="configs/curate/embed/debug.yaml"
    )
    assert [c.get("subset", c.get("init")) for c in study.grid.cells] == [
        "clean",
        "model_curated",
        "all",
        "scratch",
    ]
    assert study.seeds == (0, 1, 2) and study.cache == "studies/_cpu_shared"
    findings = {f.name: (f.kind, f.better, f.worse) for f in study.report.findings}
    assert findings == {
        "model-curated beats everything": ("greater", {"subset": "model_curated"}, {"subset": "all"}),
        "model-curated is not worse than flag-curated clean": (
            "not_worse", {"subset": "model_curated"}, {"subset": "clean"}),
    }  # fmt: skip


def test_quality_study_varies_the_cut_share_and_nothing_else(monkeypatch):
    """Study C's knob: equal-size subsets, the same filters, seed and random order, only the share of clips
    curation flags as crossing a cut differs (0 % is the shared ``clean`` subset); the four CPU studies run
    their fits in one Ray task each (runner.pretrain=local)."""
    monkeypatch.chdir(ROOT)
    study = load_config(StudyConfig, "configs/study/quality_vs_quantity.yaml")
    rules = {r.name: r for r in study.data.subsets}
    clean = rules["clean"]
    assert (clean.take, clean.seed, clean.dedup, set(clean.exclude_flags)) == (
        1200,
        0,
        True,
        {"static", "dark", "black", "cut"},
    )
    for share in (25, 50, 75):
        rule = rules[f"cut{share}"]
        assert (rule.mix_flag, rule.mix_share) == ("cut", share / 100)
        assert (
            dataclasses.replace(
                rule, name="clean", mix_flag="", mix_share=None, exclude_flags=clean.exclude_flags
            )
            == clean
        )
    assert [c.get("subset", c.get("init")) for c in study.grid.cells] == [
        "clean",
        "cut25",
        "cut50",
        "cut75",
        "scratch",
    ]
    assert study.data.synth.defects.cut == 0.25 and study.data.synth.videos_per_class == 360
    for t in study.data.targets:  # labelled clips never cross a cut
        assert "cut" in t.rule.exclude_flags
    for name in (
        "scratch_vs_pretrained",
        "masking_ratio",
        "quality_vs_quantity",
        "domain_shift",
        "model_curation",
        "cut_scenes",
    ):
        cfg = load_config(StudyConfig, f"configs/study/{name}.yaml")
        assert (cfg.runner.pretrain, cfg.runner.parallel, cfg.num_cpus) == ("local", 2, 2), name


def test_cut_scenes_study_holds_scenes_or_clips_fixed(monkeypatch):
    """Study F (C's follow-up): cut75_686 has as many scenes as clean (172 whole clips + 514 cut clips of two
    scenes each = 1200) and as many clips as clean_686; both are C's rules with a smaller take (nested in them),
    on C's data, cache and recipes, so clean, cut75 and scratch are the runs C made."""
    monkeypatch.chdir(ROOT)
    study = load_config(StudyConfig, "configs/study/cut_scenes.yaml")
    quality = load_config(StudyConfig, "configs/study/quality_vs_quantity.yaml")
    rules = {r.name: r for r in study.data.subsets}
    assert study.data == quality.data and study.data_file == "configs/study/data/cpu.yaml"
    assert rules["clean_686"] == dataclasses.replace(rules["clean"], name="clean_686", take=686)
    assert rules["cut75_686"] == dataclasses.replace(rules["cut75"], name="cut75_686", take=686)
    n_cut = int(round(rules["cut75_686"].mix_share * 686))
    assert (686 - n_cut) + 2 * n_cut == rules["clean"].take == 1200
    assert [c.get("subset", c.get("init")) for c in study.grid.cells] == [
        "clean_686", "cut75_686", "clean", "cut75", "scratch"]  # fmt: skip
    for part in ("pretrain", "finetune", "eval"):
        assert getattr(study, part) == getattr(quality, part), part
    assert (study.seeds, study.cache) == (quality.seeds, quality.cache)
    findings = {f.name: (f.kind, f.better, f.worse) for f in study.report.findings}
    assert findings == {
        "no cuts beat 75 % cut clips at equal scenes (1200 vs 686 clips)": (
            "greater", {"subset": "clean"}, {"subset": "cut75_686"}),
        "no cuts beat 75 % cut clips at 686 clips": ("greater", {"subset": "clean_686"}, {"subset": "cut75_686"}),
        "1200 clean clips beat 686": ("greater", {"subset": "clean"}, {"subset": "clean_686"}),
    }  # fmt: skip
