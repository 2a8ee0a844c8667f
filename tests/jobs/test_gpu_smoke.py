"""The prepared GPU smoke script must at least run its CPU-safe version (``--dry-run``) end to end: every
section, the result JSON, and the RESULT line — so the first GPU machine gives a full reading in one call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from jobs.config import load_config
from jobs.train.config import PretrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_smoke  # noqa: E402 - a script module: benchmarks/ on the path first


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_smoke_dry_run(tmp_path):
    out = tmp_path / "smoke.json"
    run = subprocess.run([sys.executable, "benchmarks/gpu_smoke.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=580)  # fmt: skip
    result = json.loads(out.read_text())
    failed = {k: v.get("error") for k, v in result["sections"].items() if not v["ok"]}
    assert run.returncode == 0 and not failed, (failed, run.stderr[-3000:])
    assert set(result["sections"]) == {
        "env",
        "model_step",
        "finetune_compile",
        "host_syncs",
        "e2e",
        "ray_train",
        "fsdp",
        "loader",
    }
    s = result["sections"]
    assert s["env"]["compiled_kernel_ok"] and [r["compile"] for r in s["model_step"]["rows"]] == [False, True]
    assert (
        s["finetune_compile"]["depth"] == 12
    )  # a deep compiled model with drop path: no recompile-limit hit
    assert (
        s["ray_train"]["final_step"] == 6 and s["fsdp"]["final_step"] == 6
    )  # fsdp stopped at 3, resumed to the end; ray_train's dry run is one run (DDP resume: test_pretrain.py)
    assert s["fsdp"]["export"].endswith("/final") and s["fsdp"]["export_params"] > 0  # FSDP writes an export
    assert s["loader"]["clips_per_s"] > 0
    e2e = s["e2e"]  # the GPU end-to-end section's code path, at debug scale
    assert e2e["steps"] == 6 and e2e["num_sample"] == 2 and e2e["clips_per_s"] > 0
    assert e2e["model_clips_per_s"] == next(r["clips_per_s"] for r in s["model_step"]["rows"] if r["compile"])
    assert e2e["e2e_over_model"] == pytest.approx(e2e["clips_per_s"] / e2e["model_clips_per_s"])
    assert 0 <= e2e["data_wait_frac"] <= 1 and [r["step"] for r in e2e["intervals"]] == [1, 2, 3, 4, 5, 6]
    assert run.stdout.strip().splitlines()[-1].startswith("RESULT gpu_smoke ")


def test_gpu_smoke_refuses_to_pretend_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_smoke.py"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 2 and "no CUDA device" in run.stderr


def test_every_config_the_smoke_builds_for_a_gpu_resolves(monkeypatch):
    """Not only the dry-run ones: each GPU run's YAML + overrides through the real config loader (a GPU once
    failed at ``schedule: set exactly one of epochs / total_steps``, which no CPU run had built)."""
    monkeypatch.chdir(ROOT)
    configs = gpu_smoke.gpu_configs("/nonexistent/smoke")
    assert set(configs) == {"ray_train", "ray_train_stop", "fsdp", "fsdp_stop", "e2e"}
    loaded = {
        name: load_config(PretrainConfig, os.path.join(ROOT, y), over) for name, (y, over) in configs.items()
    }
    for name, cfg in loaded.items():
        assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 1 and cfg.schedule.epochs is None, name
    assert loaded["ray_train_stop"].stop_at_step == loaded["fsdp_stop"].stop_at_step == gpu_smoke.RESUME_AT
    assert loaded["fsdp"].parallel.strategy == "fsdp" and loaded["fsdp"].model.name == "vit_l"
    e2e, recipe = loaded["e2e"], yaml.safe_load(open(os.path.join(ROOT, "configs/pretrain/vit_b.yaml")))
    # the recipe as configured: its model, clips, compile, precision, repeated sampling and workers
    assert (e2e.model.name, e2e.parallel.compile, e2e.parallel.precision) == ("vit_b", True, "bf16")
    assert (e2e.loader.num_sample, e2e.loader.num_workers, e2e.loader.batch_size) == (
        recipe["loader"]["num_sample"], recipe["loader"]["num_workers"], recipe["loader"]["batch_size"])  # fmt: skip
    assert (e2e.model.build().num_frames, e2e.model.build().img_size) == (16, 224)
    assert e2e.schedule.total_steps >= 300 and e2e.stop_at_step is None
