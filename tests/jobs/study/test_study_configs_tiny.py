"""The CPU study configs' own machinery on a tiny grid (the four of `make studies` and C's follow-up F): each
config's cells, subsets by the same names, finetune/eval jobs and findings, with its data made tiny (64 clips) and
every fit cut to 2 steps, all five on one Ray session and one cache (as `make studies` shares runs). It asserts
what ran and what was written, never a finding's verdict: that is the real study's job (docs/studies)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pyarrow.parquet as pq
import pytest

from jobs.config import from_dict, load_config
from jobs.study.data import DataConfig, JobRef
from jobs.study.study import StudyConfig, expand_grid, run_study

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
# study -> pretraining runs it starts when run in this order: the clean tube-0.9 runs are shared by all five,
# C's clean/cut75 runs by F
CPU_STUDIES = {"scratch_vs_pretrained": 1, "masking_ratio": 3, "quality_vs_quantity": 3, "domain_shift": 2,
               "cut_scenes": 2}  # fmt: skip
NOCUT = ["static", "dark", "black", "cut"]
MIX = {"exclude_flags": ["static", "dark", "black"], "dedup": True, "take": 8, "mix_flag": "cut"}
TINY_DATA = {
    "synth": {"seed": 0, "domains": ["shapes", "textures"], "classes": ["left", "up", "rotate_cw", "zoom_in"],
              "videos_per_class": 8, "sizes": [[32, 32]], "frames": [8], "fps": [15], "workers": 1,
              "defects": {"static": 0.05, "duplicate": 0.03, "cut": 0.2, "blur": 0, "near_duplicate": 0,
                          "black": 0, "dark": 0}},
    "shard": {"config": "configs/shard/debug.yaml", "overrides": ["transcode.short_side=32"]},
    "curate": {"config": "configs/curate/debug.yaml"},
    "subsets": [
        {"name": "clean", "exclude_flags": NOCUT, "dedup": True, "take": 8},
        *({"name": f"cut{p}", **MIX, "mix_share": p / 100} for p in (25, 50, 75)),
        {"name": "clean_686", "exclude_flags": NOCUT, "dedup": True, "take": 5},
        {"name": "cut75_686", **MIX, "take": 5, "mix_share": 0.75},
        {"name": "clean_shapes", "include_domains": ["shapes"], "exclude_flags": NOCUT, "dedup": True},
        {"name": "clean_textures", "include_domains": ["textures"], "exclude_flags": NOCUT, "dedup": True},
        {"name": "all"},
    ],
    "targets": [
        {"name": "all_domains", "rule": {"exclude_flags": NOCUT, "dedup": True}, "train_per_group": 1,
         "test_per_group": 1, "stratify": ["domain", "label"]},
        {"name": "shapes", "rule": {"include_domains": ["shapes"], "exclude_flags": NOCUT, "dedup": True},
         "train_per_group": 1, "test_per_group": 1, "stratify": ["domain", "label"]},
    ],
}  # fmt: skip
SHORT = ["schedule.total_steps=2", "schedule.warmup_steps=1", "checkpoint.every_steps=2"]
PRETRAIN = [*SHORT, "metrics.image_every=2", "loader.batch_size=4"]
FINETUNE = [*SHORT, "loader.batch_size=4"]
EVAL = ["knn.k=2", "probe.epochs=5", "batch_size=8"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_each_cpu_study_config_runs_its_grid_on_tiny_data(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name each other relative to the project root
    data = from_dict(DataConfig, TINY_DATA)
    cache = str(tmp_path / "cache")
    for name, new_fits in CPU_STUDIES.items():
        real = load_config(StudyConfig, f"configs/study/{name}.yaml")
        assert [r.name for r in real.data.subsets] == [r["name"] for r in TINY_DATA["subsets"]]
        assert [t.name for t in real.data.targets] == [t["name"] for t in TINY_DATA["targets"]]
        cfg = dataclasses.replace(
            real, data=data, data_file=None, seeds=(0,), output=str(tmp_path / name), cache=cache,
            pretrain=JobRef(config=real.pretrain.config, overrides=(*real.pretrain.overrides, *PRETRAIN)),
            finetune=JobRef(config=real.finetune.config, overrides=(*real.finetune.overrides, *FINETUNE)),
            eval=JobRef(config=real.eval.config, overrides=(*real.eval.overrides, *EVAL)),
        )  # fmt: skip
        out = run_study(cfg)
        cells = expand_grid(real)
        assert (out["cells"], out["ran"], out["pretrain_runs"]) == (len(cells), len(cells), new_fits), name
        table = pq.read_table(out["files"]["results.parquet"]).to_pandas()
        assert len(table) == len(cells) and set(table["pretrain_steps"].dropna()) <= {0, 2}, name
        for metric in real.report.metrics:
            assert table[metric].map(math.isfinite).all(), (name, metric)
        findings = json.load(open(out["files"]["findings.json"]))
        names = [f["name"] for f in (findings["findings"] if isinstance(findings, dict) else findings)]
        assert names == [f.name for f in real.report.findings], name
