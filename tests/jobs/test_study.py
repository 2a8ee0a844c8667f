"""Study runner: config loading for every shipped study, grid expansion and cell identity, the stratified target
split, the report; and (slow) a 2x2 debug study end to end on a local 2-CPU Ray cluster, rerun without training."""

from __future__ import annotations

import glob
import hashlib
import json
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs.config import load_config
from jobs.evaluate import EvalConfig
from jobs.study import StudyConfig, expand_grid, resolve_cell, run_study
from jobs.study_data import PreparedData, SubsetInfo, TargetInfo, resolve_path, stratified_split
from jobs.study_report import make_plots, markdown_table, pick_metrics, results_frame, write_report
from pipeline import manifest as mf
from pipeline import storage

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
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
                           train_size=5, test_size=5, inputs_hash=f"t-{t.name}", domains=("a",))
        for t in cfg.data.targets
    }  # fmt: skip
    return PreparedData(
        manifest_url="/data/manifest.json", curation_url="/c.parquet", subsets=subsets, targets=targets
    )


@pytest.mark.parametrize("path", STUDY_YAMLS, ids=os.path.basename)
def test_every_study_config_loads_and_resolves(path):
    cfg = load_config(StudyConfig, path)
    cells = [resolve_cell(cfg, p, fake_data(cfg)) for p in expand_grid(cfg)]
    assert len({c.id for c in cells}) == len(cells) >= 2
    for c in cells:
        assert c.pretrain.loader.subset == f"/data/{c.params['subset']}.parquet"
        assert c.pretrain.run_url.startswith(cfg.output.rstrip("/") + "/runs/")
        assert c.pretrain.loader.manifest == "/data/manifest.json"
        if c.params["mask_ratio"] is not None:  # set once, on the model; the loader's masks derive from it
            assert c.pretrain.model.build().clip_spec().mask_ratio == c.params["mask_ratio"]
        ev = load_config(
            EvalConfig, resolve_path(cfg.eval.config), [*c.eval_overrides, "checkpoint=x", "output=y"]
        )
        assert ev.train is not None
    if os.path.basename(path).endswith("_gpu.yaml"):
        assert all(c.pretrain.scaling.use_gpu for c in cells)


def test_grid_product_explicit_cells_and_dedup():
    cfg = load_config(StudyConfig, DEBUG, ["grid.cells=[{subset: all, init: scratch}, {mask_ratio: 0.9}]"])
    cells = expand_grid(cfg)
    # 2x2 product, then the explicit cells; {subset: all, init: scratch} is already in the product
    assert [(c["subset"], c["init"], c["mask_ratio"]) for c in cells] == [
        ("all", "pretrained", None), ("all", "scratch", None), ("clean", "pretrained", None),
        ("clean", "scratch", None), ("all", "pretrained", 0.9),
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
    ],
)
def test_bad_study_config_is_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(StudyConfig, DEBUG, [override])


def test_cell_identity():
    cfg = load_config(StudyConfig, DEBUG)
    data = fake_data(cfg)
    cells = {(c["subset"], c["init"]): resolve_cell(cfg, c, data) for c in expand_grid(cfg)}
    # scratch weights do not depend on the subset: one initialisation, one evaluation
    assert cells["all", "scratch"].pretrain_id == cells["clean", "scratch"].pretrain_id
    assert cells["all", "scratch"].eval_key == cells["clean", "scratch"].eval_key
    assert cells["all", "pretrained"].pretrain_id != cells["clean", "pretrained"].pretrain_id
    # a changed eval setting changes the cell id but not the pretraining run
    cfg2 = load_config(StudyConfig, DEBUG, ["eval.overrides=[actors=0, knn.k=3]"])
    c2 = resolve_cell(cfg2, {**cells["all", "pretrained"].params}, data)
    assert c2.pretrain_id == cells["all", "pretrained"].pretrain_id and c2.id != cells["all", "pretrained"].id
    # too small a subset for one global batch is refused before any training
    with pytest.raises(ValueError, match="fewer than one global batch"):
        resolve_cell(cfg, cells["all", "pretrained"].params, fake_data(cfg, size=7))


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


def _result(cell, subset, init, size, quality, target, mask, lp, knn):
    return {
        "cell_id": cell, "params": {"subset": subset, "target": target, "init": init, "mask_ratio": mask},
        "subset": {"size": size, "mean_quality": quality, "flagged_frac": 0.0, "domains": [subset]},
        "target": {"train_size": 4, "test_size": 4, "domains": [target]},
        "pretrain": {"steps": 0 if init == "scratch" else 2, "final_loss": None if init == "scratch" else 0.9,
                     "wall_s": 1.0},
        "metrics": {"knn.top1": knn, "linear_probe.top1": lp, "linear_probe.top5": 1.0},
        "eval_wall_s": 0.5, "wall_s": 1.5, "checkpoint": f"/runs/{cell}",
    }  # fmt: skip


def test_report_table_and_plots(tmp_path):
    results = [
        _result("a", "small", "pretrained", 10, 0.9, "t1", 0.5, 0.6, 0.5),
        _result("b", "big", "pretrained", 40, 0.4, "t1", 0.5, 0.4, 0.3),
        _result("c", "small", "pretrained", 10, 0.9, "t2", 0.9, 0.8, 0.7),
        _result("d", "small", "scratch", 10, 0.9, "t1", None, 0.2, 0.25),
    ]
    df = results_frame(results)
    assert len(df) == 4 and df.loc[1, "subset_size"] == 40 and df.loc[2, "mask_ratio"] == 0.9
    assert pick_metrics(df) == ["linear_probe.top1", "knn.top1"]
    with pytest.raises(ValueError, match="report.metrics"):
        pick_metrics(df, ["top1"])
    md = markdown_table(df, ["linear_probe.top1"])
    rows = [line for line in md.splitlines() if line.startswith("| ") and "cell_id" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| c", "| a", "| b", "| d"]  # best first
    plots = make_plots(df, ["linear_probe.top1"])
    assert set(plots) == {"acc_vs_subset_size", "quality_vs_quantity", "domain_shift", "masking_ratio"}
    assert all(p.startswith(PNG_MAGIC) for p in plots.values())
    files = write_report(results, str(tmp_path))
    table = pq.read_table(files["results.parquet"]).to_pandas()
    assert table["linear_probe.top1"].tolist() == [0.6, 0.4, 0.8, 0.2]
    assert open(files["masking_ratio"], "rb").read(8) == PNG_MAGIC


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_debug_study_end_to_end_and_rerun(ray_cluster, tmp_path):
    out = str(tmp_path / "study")
    cfg = load_config(StudyConfig, DEBUG, [f"output={out}"])
    first = run_study(cfg)
    assert (first["cells"], first["ran"], first["pretrain_runs"]) == (4, 4, 2)
    table = pq.read_table(first["files"]["results.parquet"]).to_pandas()
    assert len(table) == 4 and set(zip(table["subset"], table["init"], strict=True)) == {
        ("all", "pretrained"), ("all", "scratch"), ("clean", "pretrained"), ("clean", "scratch")
    }  # fmt: skip
    for _, row in table.iterrows():  # each row holds the evaluator's own numbers and the subset's real size
        cell = json.load(open(os.path.join(out, "cells", row["cell_id"], "result.json")))
        report = json.load(open(cell["eval_report"]))
        assert row["linear_probe.top1"] == report["linear_probe"]["top1"]
        assert row["knn.top1"] == report["knn"]["top1"]
        subset_url = cell["subset"]["url"]
        assert row["subset_size"] == len(mf.read_subset(subset_url).keys)
        assert row["target_test_size"] == report["samples"]["test"]["videos"]
        assert os.path.exists(os.path.join(row["checkpoint"], "vmae.json"))
    md = open(first["files"]["results.md"]).read()
    assert md.count("\n| ") == 5  # header + 4 cells
    for name in ("acc_vs_subset_size", "quality_vs_quantity"):
        assert open(first["files"][name], "rb").read(8) == PNG_MAGIC
    stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "cells", "*", "result.json"))}

    again = run_study(cfg)  # every cell committed: nothing runs, nothing is rewritten
    assert (again["ran"], again["skipped"], again["pretrain_runs"]) == (0, 4, 0)
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps

    os.remove(
        next(iter(stamps))
    )  # a cell that crashed before its commit reruns alone, reusing its pretraining
    cfg_k = load_config(StudyConfig, DEBUG, [f"output={out}"])
    third = run_study(cfg_k)
    assert (third["ran"], third["pretrain_runs"]) == (1, 0)


@pytest.mark.s3
def test_report_to_s3(s3_bucket):
    results = [
        _result("a", "small", "pretrained", 10, 0.9, "t1", None, 0.6, 0.5),
        _result("b", "big", "pretrained", 40, 0.4, "t1", None, 0.4, 0.3),
    ]
    files = write_report(results, f"{s3_bucket}/study", title="s3")
    assert set(files) == {
        "results.parquet",
        "results.md",
        "acc_vs_subset_size",
        "quality_vs_quantity",
        "domain_shift",
    }
    assert len(mf.read_table(files["results.parquet"])) == 2
    assert storage.read_bytes(files["quality_vs_quantity"])[:8] == PNG_MAGIC
    assert storage.read_bytes(files["results.md"]).decode().startswith("# s3: 2 cells")
