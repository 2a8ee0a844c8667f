"""``make demo`` end to end at a smaller size (fewer clips, a few pretraining and finetuning steps), then a rerun
that runs nothing; plus the demo's config handling. The numbers are the study's own, never asserted to beat
chance (that is the study's job, not CI's)."""

from __future__ import annotations

import json
import os

import pytest

from jobs.config import apply_overrides, from_dict, to_dict
from jobs.demo import DemoConfig, main, run_demo
from pipeline.ingest import manifest as mf

SMALL = [
    "videos_per_group=10", "train_per_group=2", "test_per_group=3", "synth.domains=[shapes, textures]",
    "pretrain.overrides=[schedule.total_steps=4, schedule.warmup_steps=1, checkpoint.every_steps=4, "
    "metrics.image_every=4, metrics.log_every=1, loader.batch_size=8]",
    "finetune.overrides=[schedule.total_steps=3, schedule.warmup_steps=1, checkpoint.every_steps=3, loader.batch_size=8]",
    "eval.overrides=[probe.epochs=10, knn.k=2]",
]  # fmt: skip


def _cfg(out: str) -> DemoConfig:
    return from_dict(DemoConfig, apply_overrides(to_dict(DemoConfig()), [f"out={out}", *SMALL]))


def test_overrides_apply_on_top_of_the_embedded_default():
    cfg = _cfg("/x")
    assert cfg.videos_per_group == 10 and cfg.synth.classes == DemoConfig().synth.classes
    study = cfg.study()
    assert (
        study.data.synth.videos_per_class == 10 and study.output == "/x/study" and study.cache == "/x/cache"
    )
    assert [c["init"] for c in study.grid.cells] == ["pretrained", "scratch"] and study.seeds == (0,)
    assert main(["videos_per_group=0"]) == 2  # a bad value is reported, not raised
    assert main(["nope=1"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_small_then_rerun_skips(ray_cluster, tmp_path):
    out = str(tmp_path / "demo_out")
    s = run_demo(_cfg(out))
    cells = {json.load(open(p))["params"]["init"]: json.load(open(p))
             for p in __import__("glob").glob(os.path.join(out, "study", "cells", "*", "seed_0", "result.json"))}  # fmt: skip
    assert set(cells) == {"pretrained", "scratch"}
    for init in ("pretrained", "scratch"):  # the summary shows the evaluators' own numbers
        assert s[init] == {
            m: cells[init]["metrics"][m] for m in ("finetune.top1", "linear_probe.top1", "knn.top1")
        }
    assert (s["labelled_train"], s["test"]) == (2 * 4 * 2, 3 * 4 * 2) and s["chance"] == 0.25
    assert s["pretrain_steps"] == 4 and open(s["recon_png"], "rb").read(4) == b"\x89PNG"
    assert open(s["plot"], "rb").read(4) == b"\x89PNG"
    shards = os.path.dirname(cells["pretrained"]["subset"]["url"].rsplit("/subsets/", 1)[0] + "/x")
    assert mf.read_manifest(shards).num_samples == 10 * 4 * 2
    text = open(os.path.join(out, "summary.md")).read()
    p, z = s["pretrained"], s["scratch"]
    assert (
        f"finetune {p['finetune.top1']:.2f} pretrained vs {z['finetune.top1']:.2f} scratch (chance 0.25)"
        in text
    )
    assert s["recon_png"] in text

    again = run_demo(_cfg(out))
    assert (
        again["ran"] == 0
        and again["pretrained"] == s["pretrained"]
        and again["checkpoint"] == s["checkpoint"]
    )
