"""``benchmarks/mfu.py`` runs its CPU stand-in at a tiny setting: the JSON holds every reading and the last line
is the RESULT line. No times are checked (the box is shared); only shapes, the numerics that hold whatever the
load, and that the script imports no Ray (the GPU machine runs it without)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = ["eager/default/2/default/fp32", "eager/fused/2/default/fp32", "model/fused/2/math/fp32"]
NO_KERNEL = "eager/default/2/cudnn/fp32"  # no cuDNN attention on the CPU: recorded as failed, the rest run


def test_mfu_quick_tiny_run_writes_its_readings(tmp_path):
    out = tmp_path / "mfu.json"
    cmd = [sys.executable, "benchmarks/mfu.py", "--quick", "--variants", *VARIANTS, NO_KERNEL, "--steps", "1", "--rounds", "2",
           "--warmup", "2", "--opt-model", "tiny", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"machine", "load_avg_before", "load_avg_after", "flop_counter", "optimizer", "rows", "skipped",
            "peak_flops_per_s", "analytic_gflops_per_clip"} <= set(result)  # fmt: skip
    assert result["device"] == "cpu" and "NOT the GPU figure" in result["peak_source"]
    assert (
        list(result["rows"]) == VARIANTS and result["skipped"] == [] and list(result["failed"]) == [NO_KERNEL]
    )
    for row in result["rows"].values():
        assert len(row["times_s"]) == 2 and row["clips_per_s"] == 2 / row["step_s"] and 0 < row["mfu"]
        assert len(row["warm_losses"]) == 2 and row["attention_kernels"]
    rows = list(result["rows"].values())
    # same init and batch: the optimizer kernel, the compile scope and the SDPA backend change rounding only
    assert rows[0]["warm_losses"][0] == rows[1]["warm_losses"][0]  # eager, before the first optimizer step
    assert max(r["max_loss_diff_vs_same_setting"] for r in rows) < 1e-5
    assert any(
        "math" in k for k in rows[2]["attention_kernels"]
    )  # the pinned backend ran in the compiled graph
    assert 0.5 < result["flop_counter"]["counted_over_analytic"] < 1.5
    last = run.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"RESULT mfu device=cpu model=tiny variants=3 skipped=0 failed=1 first_clips_s=[\d.]+ first_mfu=[\d.]+ "
        r"best=\S+ best_clips_s=[\d.]+ best_mfu=[\d.]+ best_vs_first=[\d.]+ adamw_fused_speedup=[\d.]+ "
        r"compiled_max_loss_diff=\S+ flop_counter_ratio=[\d.]+ load=[\d.]+",
        last,
    ), last


def test_mfu_imports_no_ray():
    code = "import sys; sys.path.insert(0, 'benchmarks'); import mfu; print('ray' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr[-2000:]
