"""Study runner: config loading for every shipped study, grid expansion and cell identity, the stratified target
split, the report; and (slow) a 2x2 debug study end to end on a local 2-CPU Ray cluster, rerun without training."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import statistics

import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs.config import load_config
from jobs.eval.eval import EvalConfig
from jobs.study.data import PreparedData, SubsetInfo, TargetInfo, resolve_path, stratified_split
from jobs.study.report import finding_verdicts, pick_metrics, results_frame, summarize, write_report
from jobs.study.study import StudyConfig, expand_grid, resolve_cell, run_study
from jobs.train.config import PretrainConfig
from pipeline import storage
from pipeline.ingest import manifest as mf

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
STUDY_YAMLS = sorted(glob.glob(os.path.join(ROOT, "configs", "study", "*.yaml")))
DEBUG = os.path.join(ROOT, "configs", "study", "debug.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_data(cfg: StudyConfig, size: int = 10_000) -> PreparedData:
    """Prepared-data stand-in with a subset/target per configured name (URLs are never read)."""
    subsets = {
        r.name: SubsetInfo(name=r.name, url=f"/data/{r.name}.parquet", size=size, inputs_hash=f"h-{r.name}",
                           mean_quality=0.5, flagged_frac=0.1, domains=("a",))
        for r in cfg.data.subsets
    }  # fmt: skip
    targets = {
        t.name: TargetInfo(name=t.name, train_url=f"/data/{t.name}-train.parquet", test_url=f"/t/{t.name}.parquet",
                           train_size=5, test_size=5, inputs_hash=f"t-{t.name}", domains=("a",), num_classes=4,
                           chance=0.25)
        for t in cfg.data.targets
    }  # fmt: skip
    return PreparedData(
        manifest_url="/data/manifest.json", curation_url="/c.parquet", subsets=subsets, targets=targets
    )


@pytest.mark.parametrize("path", STUDY_YAMLS, ids=os.path.basename)
def test_every_study_config_loads_and_resolves(path):
    cfg = load_config(StudyConfig, path)
    runs = [resolve_cell(cfg, p, fake_data(cfg), seed) for p in expand_grid(cfg) for seed in cfg.seeds]
    assert len({r.url_part for r in runs}) == len(runs) >= 2
    assert len({r.cell_id for r in runs}) == len(expand_grid(cfg))  # one id per cell, whatever the seed
    for r in runs:
        pc = r.pretrain
        assert (
            pc.loader.subset == f"/data/{r.params['subset']}.parquet"
            and pc.loader.manifest == "/data/manifest.json"
        )
        assert pc.run_url.startswith(cfg.store.rstrip("/") + "/runs/") and pc.seed == pc.loader.seed == r.seed
        spec = pc.model.build().clip_spec()  # the mask is set once, on the model
        if r.params["mask_ratio"] is not None:
            assert spec.mask_ratio == r.params["mask_ratio"]
        if r.params["mask_type"] is not None:
            assert spec.mask_type == r.params["mask_type"]
        if spec.mask_type == "motion":
            assert not pc.loader.cache  # motion masks read the bytes; the decoded-frame cache has none
        if cfg.finetune is not None:
            ft = r.job["finetune"]
            assert (
                ft["loader"]["subset"] == f"/data/{r.params['target']}-train.parquet" and ft["seed"] == r.seed
            )
            assert (
                ft["model"]["overrides"].items() >= pc.model.overrides.items()
            )  # the pretrained architecture
            assert ft["pretrained"] == (None if r.params["init"] == "scratch" else r.job["encoder"])
        ev = load_config(
            EvalConfig, resolve_path(cfg.eval.config), [*r.job["eval_overrides"], "checkpoint=x", "output=y"]
        )
        assert ev.test.manifest
    if os.path.basename(path).endswith("_gpu.yaml"):
        assert all(r.pretrain.scaling.use_gpu for r in runs)


def test_grid_product_explicit_cells_and_dedup():
    cfg = load_config(StudyConfig, DEBUG, ["grid.cells=[{subset: all, init: scratch}, {mask_ratio: 0.9}]"])
    cells = expand_grid(cfg)
    # 2x2 product (its two scratch cells are one: a scratch cell has no pretraining subset), then the explicit
    # cells; {subset: all, init: scratch} is already there
    assert [(c["subset"], c["init"], c["mask_ratio"]) for c in cells] == [
        ("all", "pretrained", None), ("all", "scratch", None), ("clean", "pretrained", None),
        ("all", "pretrained", 0.9),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        ("grid.axes={subsett: [all]}", "unknown parameter 'subsett'"),
        ("grid.axes={subset: [nope]}", "subset 'nope' is not in data.subsets"),
        ("grid.axes={init: [finetuned]}", "init must be one of"),
        ("grid.axes={mask_ratio: [1.5]}", "mask_ratio must be a number in"),
        ("grid.axes={subset: []}", "must be a non-empty list"),
        ("data.manifest=/x/manifest.json", "exactly one of synth"),
        ("seeds=[1, 1]", "distinct"),
        ("runner.pretrain=slurm", "runner.pretrain must be one of"),
        (
            "report.findings=[{name: x, better: {init: scratch}, worse: {initt: x}}]",
            "unknown parameter 'initt'",
        ),
    ],
)
def test_bad_study_config_is_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(StudyConfig, DEBUG, [override])


def test_cell_identity():
    cfg = load_config(StudyConfig, DEBUG)
    data = fake_data(cfg)
    cells = {(c["subset"], c["init"]): c for c in expand_grid(cfg)}
    run = lambda cell, seed=0, c=cfg: resolve_cell(c, cell, data, seed)  # noqa: E731
    pre_all, pre_clean, scratch = (
        run(cells["all", "pretrained"]),
        run(cells["clean", "pretrained"]),
        run(cells["all", "scratch"]),
    )
    assert pre_all.pretrain_id != pre_clean.pretrain_id and pre_all.eval_id != scratch.eval_id
    # seeds: the same cell, other runs
    s1 = run(cells["all", "pretrained"], 1)
    assert (
        s1.cell_id == pre_all.cell_id
        and s1.pretrain_id != pre_all.pretrain_id
        and s1.url_part != pre_all.url_part
    )
    # a changed eval setting changes the cell and its evaluation, not the pretraining run
    cfg2 = load_config(StudyConfig, DEBUG, ["eval.overrides=[actors=0, knn.k=3]"])
    c2 = run(cells["all", "pretrained"], 0, cfg2)
    assert (
        c2.pretrain_id == pre_all.pretrain_id
        and c2.cell_id != pre_all.cell_id
        and c2.eval_id != pre_all.eval_id
    )
    # the recipe's own mask settings spelled out are the same run (the identity is the resolved model) ...
    ref = cfg.pretrain  # the study's pretraining recipe
    recipe = load_config(PretrainConfig, resolve_path(ref.config), list(ref.overrides)).model.build()
    spelled = {**cells["all", "pretrained"], "mask_type": recipe.mask_type, "mask_ratio": recipe.mask_ratio}
    assert run(spelled).pretrain_id == pre_all.pretrain_id
    # ... and another ratio is another run
    other = {**spelled, "mask_ratio": 0.5 if recipe.mask_ratio != 0.5 else 0.75}
    assert run(other).pretrain_id != pre_all.pretrain_id
    # too small a subset for one global batch is refused before any training
    with pytest.raises(ValueError, match="fewer than one global batch"):
        resolve_cell(cfg, cells["all", "pretrained"], fake_data(cfg, size=3), 0)


def test_stratified_split_matches_independent_ranking():
    labels = [0] * 7 + [1] * 4 + [2] * 1 + [3] * 2
    df = pd.DataFrame({"key": [f"k{i:03d}" for i in range(len(labels))], "label": labels})
    train, test = stratified_split(df, 0.3, seed=5)
    assert not set(train) & set(test) and sorted(train + test) == sorted(df["key"])
    for label, n in ((0, 7), (1, 4), (2, 1), (3, 2)):
        keys = df[df["label"] == label]["key"].tolist()
        rank = {k: int.from_bytes(hashlib.sha256(f"5:{k}".encode()).digest()[:8], "big") for k in keys}
        n_test = 0 if n < 2 else min(max(round(0.3 * n), 1), n - 1)  # 2, 1, 0, 1
        assert sorted(k for k in keys if k in test) == sorted(sorted(keys, key=rank.get)[:n_test])
    assert stratified_split(df, 0.3, seed=5) == (train, test)


def test_stratified_split_fixed_counts_per_domain_and_label():
    rows = [
        (f"{d}{c}{i:02d}", d, c)
        for d in "ab"
        for c in range(2)
        for i in range(6 if (d, c) != ("b", 1) else 3)
    ]
    df = pd.DataFrame(rows, columns=["key", "domain", "label"])
    train, test = stratified_split(
        df[df["key"].str[1] != "1"], 0.5, seed=2, by=("domain", "label"), counts=(2, 3)
    )
    for d in "ab":
        keys = sorted(
            df[(df["domain"] == d) & (df["label"] == 0)]["key"],
            key=lambda k: hashlib.sha256(f"2:{k}".encode()).digest()[:8],
        )
        assert sorted(k for k in test if k[0] == d) == sorted(keys[:3])
        assert sorted(k for k in train if k[0] == d) == sorted(keys[3:5])
    with pytest.raises(
        ValueError, match=r"'domain': 'b', 'label': 1.* has 3 samples, fewer than 2 train \+ 3 test"
    ):
        stratified_split(df, 0.5, seed=2, by=("domain", "label"), counts=(2, 3))


def _result(cell, seed, init, ft, lp, *, subset="s", mask=None, mask_type=None, eval_id=None):
    return {
        "cell_id": cell, "seed": seed, "eval_id": eval_id or f"{cell}-{seed}",
        "params": {"subset": subset, "target": "t", "init": init, "mask_ratio": mask, "mask_type": mask_type},
        "subset": {"size": 10, "mean_quality": 0.5, "flagged_frac": 0.0, "domains": [subset]},
        "target": {"train_size": 4, "test_size": 8, "domains": ["t"], "chance": 0.25},
        "pretrain": {"steps": 0 if init == "scratch" else 2, "final_loss": None if init == "scratch" else 0.9,
                     "wall_s": 10.0, "overhead_s": 4.0},
        "metrics": {"finetune.top1": ft, "linear_probe.top1": lp, "linear_probe.top5": 1.0},
        "finetune_wall_s": 2.0, "eval_wall_s": 0.5, "checkpoint": f"/runs/{cell}",
    }  # fmt: skip


def test_report_means_verdicts_and_plots(tmp_path):
    from jobs.study.study import FindingSpec, ReportConfig

    pre = [0.50, 0.55, 0.60]
    scr = [0.30, 0.32, 0.28]
    results = [
        _result("p", i, "pretrained", v, v - 0.1, mask=0.9, mask_type="tube") for i, v in enumerate(pre)
    ]
    results += [
        _result("m", i, "pretrained", v, v, mask=0.5, mask_type="tube")
        for i, v in enumerate([0.5, 0.52, 0.48])
    ]
    results += [_result("z", i, "scratch", v, v) for i, v in enumerate(scr)]
    results += [
        _result("z2", i, "scratch", v, v, subset="other", eval_id=f"z-{i}") for i, v in enumerate(scr)
    ]
    df = results_frame(results)
    assert len(df) == 12 and pick_metrics(df) == ["finetune.top1", "linear_probe.top1"]
    with pytest.raises(ValueError, match="report.metrics"):
        pick_metrics(df, ["top1"])
    summary = summarize(df, ["finetune.top1"])
    row = summary.set_index("cell_id").loc["p"]
    assert row["seeds"] == 3 and row["finetune.top1.mean"] == pytest.approx(statistics.mean(pre))
    assert row["finetune.top1.std"] == pytest.approx(statistics.stdev(pre))
    findings = (
        FindingSpec(
            name="pre > scratch", better={"init": "pretrained", "mask_ratio": 0.9}, worse={"init": "scratch"}
        ),
        FindingSpec(name="0.5 > 0.9", better={"mask_ratio": 0.5}, worse={"mask_ratio": 0.9}),
        FindingSpec(
            name="0.9 not worse", kind="not_worse", better={"mask_ratio": 0.9}, worse={"mask_ratio": 0.5}
        ),
        FindingSpec(name="by subset", better={"subset": "s"}, worse={"init": "scratch"}),
    )
    v = {x["name"]: x for x in finding_verdicts(df, findings)}
    se = math.sqrt(statistics.variance(pre) / 3 + statistics.variance(scr) / 3)  # z2 = z's runs: counted once
    assert v["pre > scratch"]["n_worse"] == 3 and v["pre > scratch"]["se"] == pytest.approx(se)
    assert v["pre > scratch"]["diff"] == pytest.approx(statistics.mean(pre) - statistics.mean(scr))
    assert v["pre > scratch"]["verdict"] == "reproduced"
    assert v["0.5 > 0.9"]["verdict"] == "not reproduced" and v["0.9 not worse"]["verdict"] == "reproduced"
    # scratch rows carry subset "s" too, but a subset selector means the pretrained cells (p and m) only
    assert v["by subset"]["n_better"] == 6 and v["by subset"]["n_worse"] == 3
    files = write_report(
        results, str(tmp_path), report=ReportConfig(metrics=("finetune.top1",), findings=findings)
    )
    md = open(files["results.md"]).read()
    assert f"{statistics.mean(pre):.3f} ± {statistics.stdev(pre):.3f}" in md and "**reproduced**" in md
    assert "**not reproduced**" in md and "| 0.250 |" in md  # chance
    assert (
        open(files["summary"], "rb").read(8) == PNG_MAGIC
        and open(files["masking_ratio"], "rb").read(8) == PNG_MAGIC
    )
    table = pq.read_table(files["results.parquet"]).to_pandas()
    assert sorted(table["finetune.top1"].tolist()) == sorted(df["finetune.top1"].tolist())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_debug_study_end_to_end_and_rerun(ray_cluster, tmp_path):
    """The machinery of every study on a tiny grid (never a finding: that is the study's job): 3 cells x 2 seeds
    through synth -> ... -> Ray Train pretrain -> finetune task -> eval, then a rerun that runs nothing."""
    out, cache = str(tmp_path / "study"), str(tmp_path / "cache")
    cfg = load_config(StudyConfig, DEBUG, [f"output={out}", f"cache={cache}"])
    first = run_study(cfg)
    assert (first["cells"], first["runs"], first["ran"], first["pretrain_runs"]) == (3, 6, 6, 4)
    table = pq.read_table(first["files"]["results.parquet"]).to_pandas()
    assert len(table) == 6 and sorted(set(zip(table["subset"], table["init"], strict=True))) == [
        ("all", "pretrained"), ("all", "scratch"), ("clean", "pretrained")
    ]  # fmt: skip
    for _, row in table.iterrows():  # each row holds the evaluators' own numbers and the subset's real size
        cell = json.load(
            open(os.path.join(out, "cells", row["cell_id"], f"seed_{row['seed']}", "result.json"))
        )
        evals = os.path.join(cache, "evals", cell["eval_id"])
        encoder, finetuned = (
            json.load(open(os.path.join(evals, n))) for n in ("encoder.json", "finetuned.json")
        )
        assert (
            row["linear_probe.top1"] == encoder["linear_probe"]["top1"]
            and row["knn.top1"] == encoder["knn"]["top1"]
        )
        assert row["finetune.top1"] == finetuned["multiview"]["1x1"]["top1"]
        assert (
            finetuned["checkpoint_meta"]["kind"] == "classifier"
            and encoder["checkpoint_meta"]["kind"] == "pretrain"
        )
        assert row["subset_size"] == len(mf.read_subset(cell["subset"]["url"]).keys)
        assert (
            row["target_test_size"] == finetuned["samples"]["test"]["videos"] == 8
        )  # 2 domains x 4 classes x 1
        assert os.path.exists(os.path.join(row["checkpoint"], "vmae.json"))
        if row["init"] == "pretrained":
            assert row["pretrain_steps"] == 2 and row["pretrain_overhead_s"] > 0
    held_out = set(mf.read_subset(cell["target"]["train_url"]).keys) | set(
        mf.read_subset(cell["target"]["test_url"]).keys
    )
    for sub in {c["subset"]["url"] for c in first["results"]}:  # no pretraining subset holds a target clip
        assert not held_out & set(mf.read_subset(sub).keys)
    subsets = os.path.dirname(first["results"][0]["subset"]["url"])
    (mixed,) = glob.glob(os.path.join(subsets, "cut50-*.parquet"))  # a subset no cell uses is still made
    curation = pd.read_parquet(glob.glob(os.path.join(os.path.dirname(subsets), "curation-*.parquet"))[0])
    flagged = curation.set_index("key").loc[list(mf.read_subset(mixed).keys), "has_cut"]
    assert len(flagged) == 8 and flagged.sum() == 4 and not held_out & set(flagged.index)
    md = open(first["files"]["results.md"]).read()
    assert "## Findings" in md and "pretraining beats scratch" in md
    assert open(first["files"]["summary"], "rb").read(8) == PNG_MAGIC
    stamps = {
        p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "cells", "*", "*", "result.json"))
    }
    assert len(stamps) == 6

    again = run_study(cfg)  # every cell committed: nothing runs, nothing is rewritten
    assert (again["ran"], again["skipped"], again["pretrain_runs"]) == (0, 6, 0)
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps

    os.remove(next(iter(stamps)))  # a cell that crashed before its commit: rerun from the shared cache
    third = run_study(cfg)
    assert (third["ran"], third["pretrain_runs"]) == (1, 0)


@pytest.mark.s3
def test_report_to_s3(s3_bucket):
    results = [_result("a", 0, "pretrained", 0.6, 0.5), _result("a", 1, "pretrained", 0.5, 0.4)]
    files = write_report(results, f"{s3_bucket}/study", title="s3")
    assert set(files) == {"results.parquet", "results.md", "findings.json", "summary"}
    assert len(mf.read_table(files["results.parquet"])) == 2
    assert storage.read_bytes(files["summary"])[:8] == PNG_MAGIC
    assert storage.read_bytes(files["results.md"]).decode().startswith("# s3: 1 cells")
