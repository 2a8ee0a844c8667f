"""``benchmarks/gpu_study.py``, the GPU study prepared for one call: its GPU configuration resolves, through the
study's own loader, to the one ViT-S cell its docstring describes and fits the time budget; its ``--tiny`` mode
runs the same stages on the CPU and writes the files a GPU run brings back, their values checked against
independent counts (steps from epochs x subset / batch, the stratified split) and against each other."""

from __future__ import annotations

import json
import math
import os
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from jobs.config import load_config
from jobs.eval.eval import EvalConfig
from jobs.study.data import PreparedData, SubsetInfo, TargetInfo, resolve_path
from jobs.study.study import StudyConfig, expand_grid, resolve_cell
from jobs.train.metrics import read_metrics
from pipeline.ingest import manifest as mf

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_study  # noqa: E402 - a script module: benchmarks/ on the path first

YAML = os.path.join(ROOT, gpu_study.STUDY_YAML)
FILES = {"gpu_study.json", "study_config.yaml", "pretrain_metrics.jsonl", "finetune_metrics.jsonl", "result.json",
         "results.parquet", "results.md"}  # fmt: skip


def _fake_data(cfg: StudyConfig, size: int = 440) -> PreparedData:
    subsets = {r.name: SubsetInfo(name=r.name, url=f"/d/{r.name}.parquet", size=size, inputs_hash="h", mean_quality=0.5,
                                  flagged_frac=0.1, domains=("shapes",)) for r in cfg.data.subsets}  # fmt: skip
    targets = {t.name: TargetInfo(name=t.name, train_url="/d/train.parquet", test_url="/d/test.parquet", train_size=26,
                                  test_size=12, inputs_hash="t", domains=("shapes",), num_classes=4, chance=0.25)
               for t in cfg.data.targets}  # fmt: skip
    return PreparedData(
        manifest_url="/d/manifest.json", curation_url="/d/c.parquet", subsets=subsets, targets=targets
    )


def test_gpu_cell_is_the_yaml_cut_to_one_vit_s_cell_on_one_gpu():
    cfg = gpu_study.study_config(gpu_study.GPU, init="pretrained", output="/nonexistent/study")
    raw, orig = yaml.safe_load(open(YAML)), load_config(StudyConfig, YAML)
    (cell,) = expand_grid(cfg)
    assert cell["init"] == "pretrained" and cfg.seeds == (0,)
    assert cell["pretrain.schedule.epochs"] == raw["grid"]["axes"]["pretrain.schedule.epochs"][0] == 100
    # the YAML's data rules, runner and report; only the source is synthetic
    assert cfg.data.manifest is None and cfg.data.synth is not None
    assert (cfg.data.subsets, cfg.data.targets, cfg.data.curate) == (
        orig.data.subsets,
        orig.data.targets,
        orig.data.curate,
    )
    assert (cfg.runner, cfg.report, cfg.num_cpus) == (orig.runner, orig.report, None)
    run = resolve_cell(cfg, cell, _fake_data(cfg), 0)
    p, spec = run.pretrain, run.pretrain.model.build()
    assert p.model.name == "vit_s" and (spec.num_frames, spec.img_size, spec.mask_ratio) == (16, 224, 0.9)
    syn = cfg.data.synth  # sources hold a whole 16 x stride-4 clip at the recipe's crop size
    assert (
        min(syn.frames) >= spec.num_frames * p.loader.sampling_rate
        and min(map(min, syn.sizes)) >= spec.img_size
    )
    assert p.scaling.use_gpu and (p.scaling.num_workers, p.scaling.min_workers) == (1, None)
    assert p.parallel.compile is False and p.parallel.precision == "bf16" and p.checkpoint.every_steps == 2000
    assert (p.schedule.epochs, p.schedule.warmup_epochs) == (100, 10)  # the cell's epochs, the YAML's warm-up
    loader = (p.loader.num_sample, p.loader.num_workers, p.loader.batch_size)
    assert loader == (4, "auto", 16)  # vit_s.yaml's
    ft, recipe = run.job["finetune"], yaml.safe_load(open(os.path.join(ROOT, "configs/finetune/vit_b.yaml")))
    assert (
        ft["model"]["name"] == "vit_s"
        and ft["pretrained"] == run.job["encoder"]
        and ft["parallel"]["compile"] is False
    )
    assert ft["schedule"]["epochs"] == 50 and ft["loader"]["rand_augment"] == recipe["loader"]["rand_augment"]
    ev = load_config(
        EvalConfig, resolve_path(cfg.eval.config), [*run.job["eval_overrides"], "checkpoint=x", "output=y"]
    )
    default = load_config(EvalConfig, resolve_path("configs/eval/default.yaml"))
    # one actor, on the GPU when there is one
    assert (ev.actors, ev.cpus_per_actor, ev.use_gpu) == (1, 8, None)
    assert ev.view_sets == default.view_sets and ev.probe == default.probe
    (scratch,) = expand_grid(
        gpu_study.study_config(gpu_study.GPU, init="scratch", output="/nonexistent/study")
    )
    assert scratch["init"] == "scratch"


def test_gpu_cell_fits_the_time_budget():
    """Worst case 30 s under the 550 s at which gpu_study.sh stops the run; a doubled data set does not fit (the
    estimate follows the config)."""
    r = gpu_study.RATES
    est = gpu_study.estimate_s(gpu_study.study_config(gpu_study.GPU, init="pretrained", output="/x"))
    videos = 3 * 4 * 40
    assert est["pretrain"] == pytest.approx(
        r["ray_train_start_s"] + 100 * videos / r["pretrain_clips_per_s"], abs=0.1
    )
    # 50 epochs of at most 10 % of the videos, 2 clips per decode, RandAugment over the recipe's 8 workers
    assert est["finetune"] == pytest.approx(r["finetune_fixed_s"] + 50 * videos * 0.1 * 2 * 0.12 / 8, abs=0.1)
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"), abs=0.5)
    assert est["total"] <= 520
    big = gpu_study.study_config(
        gpu_study.GPU, init="pretrained", output="/x", extra=["data.synth.videos_per_class=80"]
    )
    assert gpu_study.estimate_s(big)["total"] > 520


def test_gpu_study_refuses_to_pretend_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_study.main(["--out", str(tmp_path)]) == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_run_writes_the_cell_and_its_readings(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    assert gpu_study.main(["--tiny", "--out", str(out), "--work", str(work)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT gpu_study device=cpu_tiny ok=True")
    assert set(os.listdir(out)) == FILES  # <= 8: what comes back from the GPU machine
    summary = json.loads((out / "gpu_study.json").read_text())
    res = json.loads((out / "result.json").read_text())
    st = summary["stages"]
    assert list(st) == ["data", "pretrain", "finetune_eval", "commit_report"] and all(
        s["ok"] for s in st.values()
    )
    # run_study found the data, the pretraining run and the evaluation: it trained nothing, committed the cell
    assert {k: st["commit_report"][k] for k in ("cells", "runs", "ran", "skipped", "pretrain_runs")} == {
        "cells": 1,
        "runs": 1,
        "ran": 1,
        "skipped": 0,
        "pretrain_runs": 0,
    }
    assert summary["device"] == "cpu" and summary["tiny"]
    assert 0 < sum(s["seconds"] for s in st.values()) <= summary["wall_s"]
    assert res["params"] == st["data"]["params"] and res["params"]["pretrain.schedule.epochs"] == 2

    # data: 2 x 4 x 4 defect-free videos, half of them the target (split per label), the rest pretrains
    tgt = res["target"]
    assert st["data"]["subsets"] == {"all": 16} and res["subset"]["size"] == 16
    assert st["data"]["targets"]["clean_10pct"]["test"] == tgt["test_size"]
    train, test = (mf.read_table(tgt[f"{part}_url"]).to_pandas() for part in ("train", "test"))
    assert len(train) + len(test) == 16 and not set(train["key"]) & set(test["key"])
    per_label = pd.concat([train, test])["label"].value_counts()
    # per label: round(0.3 n) test clips, at least 1, at most n - 1
    assert len(test) == tgt["test_size"] == sum(min(max(round(0.3 * n), 1), n - 1) for n in per_label)

    # pretraining through Ray Train: 2 epochs x 16 videos / 4 clips per step
    steps = math.ceil(2 * 16 / 4)
    pre = read_metrics(str(out / "pretrain_metrics.jsonl"))
    assert res["pretrain"]["steps"] == max(pre) == st["pretrain"]["steps"] == steps
    assert st["pretrain"]["launcher"] == "train" and st["pretrain"]["clips_per_s"] > 0
    assert 0 <= st["pretrain"]["data_wait_frac"] <= 1
    assert os.path.exists(os.path.join(res["checkpoint"], "vmae.json"))

    # finetune in this process on the run's device: 4 epochs x the labelled videos / (8 clips / 2 per video)
    fe = st["finetune_eval"]
    ft_steps = max(read_metrics(str(out / "finetune_metrics.jsonl")))
    assert fe["finetune_device"] == ["cpu"] and ft_steps == math.ceil(4 * tgt["train_size"] / 4)
    m = res["metrics"]  # the committed result holds this stage's evaluation, read back from the study's cache
    assert (res["eval_wall_s"], res["finetune_wall_s"]) == (fe["eval_wall_s"], fe["finetune_wall_s"])
    assert m == fe["metrics"] and set(m) >= {"finetune.top1", "linear_probe.top1", "knn.top1"}
    for name in ("finetune", "linear_probe", "knn"):
        top1 = m[f"{name}.top1"]
        assert 0 <= top1 <= m[f"{name}.top5"] <= 1
        # an accuracy on the test clips: a multiple of 1 / test size
        assert top1 * tgt["test_size"] == pytest.approx(round(top1 * tgt["test_size"]), abs=1e-4)

    # the report: one row, the committed result's numbers
    (row,) = pq.read_table(out / "results.parquet").to_pylist()
    assert (row["cell_id"], row["seed"], row["init"]) == (res["cell_id"], 0, "pretrained")
    assert row["pretrain_steps"] == steps and row["subset_size"] == 16
    assert row["finetune.top1"] == pytest.approx(m["finetune.top1"])
    assert "no verdict" in (out / "results.md").read_text()  # one cell, one seed: no finding can be tested
    saved = load_config(StudyConfig, str(out / "study_config.yaml"))
    assert saved == gpu_study.study_config(gpu_study.TINY, init="pretrained", output=saved.output)


def test_in_process_fits_run_where_their_config_says():
    """A study's run_local fits (finetune tasks, local pretraining) take the device of their config, and its
    Ray tasks ask for the GPU it needs: a GPU recipe is never trained on the CPU in silence."""
    from jobs.study.cells import job_gpus, run_device

    assert run_device(False) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            run_device(True)
    assert job_gpus({"finetune": None}) == 0
    assert job_gpus({"finetune": {"scaling": {"use_gpu": False}}}) == 0
    assert job_gpus({"finetune": {"scaling": {"use_gpu": True}}}) == 1
