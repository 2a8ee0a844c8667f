"""Kill and resume (issue 22.3): ``vmae study`` killed with SIGKILL while its first cell is pretraining, then the
same command again, ends with the ``results.parquet`` of an uninterrupted run (every column but the timings, bit
for bit) and the same exported models, and leaves no process behind. The grid order of the results, which makes
a rerun's table comparable row by row, is checked without Ray."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pandas as pd
import pytest

from jobs.config import load_config
from jobs.study.study import StudyConfig, in_grid_order, run_study

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DEBUG = "configs/study/debug.yaml"
STEPS = 8  # pretraining steps, a checkpoint after each: the kill lands between two of them
# the debug study cut to one cell and one seed; its pretraining runs as the trainer in a Ray task
# (runner.pretrain=local): the same trainer, checkpoints and resume as a Ray Train fit, without the fit's
# 15-25 s of start-up, paid three times here
ARGS = ["grid.axes={init: [pretrained], subset: [all]}", "seeds=[0]", "runner.pretrain=local",
        f"pretrain.overrides=[schedule.total_steps={STEPS}, schedule.warmup_steps=1, checkpoint.every_steps=1, "
        "metrics.image_every=0, scaling.num_workers=1, loader.cache=true]"]  # fmt: skip
TIMES = ["pretrain_wall_s", "pretrain_overhead_s", "finetune_wall_s", "eval_wall_s"]  # differ run to run


def _session(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: everything a study started, Ray's processes included
    (Ray gives its workers process groups of their own, not sessions)."""
    pids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
        except (OSError, ValueError, IndexError):
            continue
        if fields[3] == str(sid) and fields[0] not in "ZX":
            pids.append(int(name))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILL the process group of the study's driver (itself, Ray's GCS, raylet and agents), then every other
    process of its session (Ray's workers)."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(3):  # a process started while the first sweep ran
        for pid in _session(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start(out: str, cache: str, log: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.cli", "study", "--config", DEBUG, f"output={out}",
           f"cache={cache}", *ARGS]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    with open(log, "ab") as f:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _finish(proc: subprocess.Popen, log: str) -> None:
    """Wait for a study to end; it must succeed and leave no process of its session behind."""
    try:
        rc = proc.wait(240)
        deadline = time.time() + 30  # ray.shutdown's children end just after the driver
        while _session(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        left = _session(proc.pid)
    finally:
        _kill_session(proc.pid)
    assert rc == 0, open(log).read()[-3000:]
    assert not left, f"processes outlived the study: {left}"


def _models(cache: str) -> dict[str, str]:
    """sha256 of every exported model (pretraining and finetuning runs) by run name."""
    paths = glob.glob(os.path.join(cache, "runs", "*", "final", "model.safetensors"))
    return {p.split(os.sep)[-3]: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in sorted(paths)}


def _checkpoint_steps(run: str) -> list[int]:
    return sorted(int(d.split("_")[-1]) for d in glob.glob(os.path.join(run, "step_*")) if
                  os.path.exists(os.path.join(d, "trainer.pt")))  # fmt: skip


def _logged_steps(run: str) -> list[int]:
    with open(os.path.join(run, "logs", "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def test_results_in_grid_order_whatever_order_they_finished():
    runs = [SimpleNamespace(cell_id=c, seed=s) for c in ("b-1", "a-2") for s in (1, 0)]
    done = [{"cell_id": c, "seed": s, "n": i} for i, (c, s) in enumerate([("a-2", 0), ("b-1", 0), ("a-2", 1),
                                                                          ("b-1", 1)])]  # fmt: skip
    assert [(r["cell_id"], r["seed"]) for r in in_grid_order(done, runs)] == [
        ("b-1", 1), ("b-1", 0), ("a-2", 1), ("a-2", 0)
    ]  # fmt: skip
    assert in_grid_order(done[::-1], runs) == in_grid_order(done, runs)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_mid_cell_then_rerun_equals_uninterrupted(tmp_path, monkeypatch):
    out, cache = str(tmp_path / "study"), str(tmp_path / "cache")
    log = str(tmp_path / "study.log")
    # the uninterrupted run: in this process (its imports are paid already), on a local Ray of its own
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_study(load_config(StudyConfig, os.path.join(ROOT, DEBUG), [f"output={out}", f"cache={cache}", *ARGS]))
    ref, ref_models = pd.read_parquet(os.path.join(out, "results.parquet")), _models(cache)
    assert len(ref) == 1 and len(ref_models) == 2  # the cell's pretraining and finetuning runs
    # the same study again from its data (kept: the same inputs at the same URLs, so the same run identities)
    for d in (out, os.path.join(cache, "runs"), os.path.join(cache, "evals")):
        shutil.rmtree(d)

    proc = _start(out, cache, log)
    pattern = os.path.join(cache, "runs", "pretrained-*", "step_*", "trainer.pt")
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline and not glob.glob(pattern):
            time.sleep(0.02)
        assert proc.poll() is None, "the study ended before it could be killed"
        # its Ray workers too: killed with the driver's process group only, they notice the raylet's death
        # ~3 s later and train on until then (a crash of the machine stops them at once)
        _kill_session(proc.pid)
        proc.wait(30)
        time.sleep(0.5)
        assert not _session(proc.pid)
    finally:
        _kill_session(proc.pid)
    (run,) = glob.glob(os.path.join(cache, "runs", "pretrained-*"))
    killed_at = _checkpoint_steps(run)
    # mid-cell: pretraining between checkpoints, nothing exported or committed
    assert killed_at and killed_at[-1] < STEPS, killed_at
    assert not os.path.exists(os.path.join(run, "final", "vmae.json"))
    assert not os.path.exists(os.path.join(run, "pretrain.json"))
    assert not glob.glob(os.path.join(out, "cells", "*", "*", "result.json"))
    logged = len(_logged_steps(run))

    _finish(_start(out, cache, log), log)  # the same command again
    got = pd.read_parquet(os.path.join(out, "results.parquet"))
    # the rerun continued the run from its last checkpoint, not from scratch
    assert _logged_steps(run)[logged:] == list(range(killed_at[-1] + 1, STEPS + 1))
    pd.testing.assert_frame_equal(got.drop(columns=TIMES), ref.drop(columns=TIMES), check_exact=True)
    assert _models(cache) == ref_models
