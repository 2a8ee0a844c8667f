"""``make demo`` end to end at a smaller size (24 clips, 4 pretraining steps), then a rerun that skips every
stage; plus the demo's config handling."""

from __future__ import annotations

import json
import os

import pytest

from jobs.config import apply_overrides, from_dict, to_dict
from jobs.demo import DemoConfig, main, run_demo
from pipeline import manifest as mf

SMALL = [
    "synth.videos_per_class=2",
    "pretrain_overrides=[schedule.total_steps=4, schedule.warmup_steps=1, checkpoint.every_steps=4, metrics.image_every=4]",
    "eval_overrides=[actors=0]",
]


def _cfg(out: str) -> DemoConfig:
    return from_dict(DemoConfig, apply_overrides(to_dict(DemoConfig()), [f"out={out}", *SMALL]))


def test_overrides_apply_on_top_of_the_embedded_default():
    cfg = _cfg("/x")
    assert cfg.synth.videos_per_class == 2 and cfg.synth.domains == DemoConfig().synth.domains
    assert cfg.subset == DemoConfig().subset and cfg.out == "/x"
    assert main(["synth.videos_per_class=0"]) == 2  # a bad value is reported, not raised


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_small_then_rerun_skips(ray_cluster, tmp_path):
    out = str(tmp_path / "demo_out")
    s = run_demo(_cfg(out))
    report = json.load(open(os.path.join(out, "eval.json")))
    assert s["linear_probe"]["top1"] == report["linear_probe"]["top1"] and s["knn"] == {
        k: report["knn"][k] for k in ("top1", "top5")
    }
    assert (s["probe_train"], s["probe_test"]) == (
        report["samples"]["train"]["videos"],
        report["samples"]["test"]["videos"],
    )
    assert (
        s["videos"] == 24
        and s["clips"] == mf.read_manifest(os.path.join(out, "bucket", "shards")).num_samples
    )
    assert s["pretrain_steps"] == 4 and open(s["recon_png"], "rb").read(4) == b"\x89PNG"
    text = open(os.path.join(out, "summary.md")).read()
    assert f"linear probe top-1 {report['linear_probe']['top1']:.3f}" in text and s["recon_png"] in text

    again = run_demo(_cfg(out))
    assert all(again["stages"][k].startswith("skipped") for k in ("synth", "curate", "pretrain", "eval"))
    assert again["linear_probe"] == s["linear_probe"] and again["checkpoint"] == s["checkpoint"]
