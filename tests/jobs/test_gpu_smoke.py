"""The prepared GPU smoke script must at least run its CPU-safe version (``--dry-run``) end to end: every
section, the result JSON, and the RESULT line — so the first GPU machine gives a full reading in one call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    assert run.stdout.strip().splitlines()[-1].startswith("RESULT gpu_smoke ")


def test_gpu_smoke_refuses_to_pretend_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_smoke.py"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 2 and "no CUDA device" in run.stderr
