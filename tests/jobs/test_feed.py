"""``benchmarks/feed.py`` runs end to end at a tiny setting (the real Trainer in-process, the loader, shards on
disk, the stand-in step): its JSON holds every reading and its last line is the RESULT line. No absolute
times are checked (the box is shared); only shapes, and what must hold whatever the load."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_feed_tiny_run_writes_its_readings(tmp_path):
    out = tmp_path / "feed.json"
    run = subprocess.run([sys.executable, "benchmarks/feed.py", "--tiny", "--demand", "200", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {
        "machine",
        "load_avg_before",
        "load_avg_after",
        "decode_clips_per_s_core",
        "rows",
        "clip",
        "left_out",
    } <= set(result)
    assert result["trainer_session"] == "local" and result["clip"]["num_sample"] == 2
    (row,) = result["rows"]
    # the stand-in step: batch / (demand x workers)
    assert row["demand"] == 200 and row["step_s"] == row["batch_size"] / (200 * result["loader_workers"])
    for loop in ("trainer", "bare"):
        (r,) = row["runs"][loop]
        assert r["steps"] == result["steps_per_run"] - result["log_every"]  # the first interval left out
        assert (
            0 <= r["data_wait"] <= 1 and r["step_wall_s"] >= row["step_s"]
        )  # a step lasts at least its sleep
        assert abs(r["overhead_s"] - (r["step_wall_s"] * (1 - r["data_wait"]) - row["step_s"])) < 1e-9
        assert abs(r["overhead"] - r["overhead_s"] / row["step_s"]) < 1e-9
    last = run.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"RESULT feed demand=200 data_wait=[0-9.]+ overhead=-?[0-9.]+ bare_data_wait=[0-9.]+ "
        r"bare_overhead=-?[0-9.]+ decode_clips_per_s_core=[0-9.]+ num_sample=2 workers=1 session=local "
        r"load_before=[0-9.]+ load_after=[0-9.]+",
        last,
    ), last
