"""The GPU study prepared for one short call (``benchmarks/gpu_study.sh``, <= 10 minutes on one H100/H200): one
cell of ``configs/study/scratch_vs_pretrained_gpu.yaml`` end to end through the study's own machinery, stage by
stage: ``data`` (``prepare_data``: synth -> shard -> curate -> subsets -> target split; ``resolve_cell``),
``pretrain`` (``pretrain_stage``: Ray Train, ``use_gpu``), ``finetune_eval`` (``finetune_eval_stage``: finetune,
then the finetuned classifier and the frozen encoder evaluated; its output goes into the study's evaluation
cache), ``commit_report`` (``run_study`` itself, which finds all of that present and only commits
``cells/<id>/seed_0/result.json`` and writes ``results.parquet`` / ``results.md``). ``gpu_study.json`` (per
stage: ok, seconds, readings such as clips/s, data wait, MFU, peak memory, the finetune device, top-1s; the
estimate below) is rewritten after every stage, so a run cut short keeps what it read. At most 8 files go to
``--out`` (what comes back from the lent machine); the study's own folders stay in ``--work``.

What is reduced, and why (the study itself, 100-400 epochs of Kinetics-400, takes GPU-days):

- data: K400 (``s3://vmae/shards/k400``, unreachable from the GPU machine) -> synthetic videos made here,
  3 domains x 4 motion classes x 40 = 480 videos of 320x256 px, 64 frames at 30 fps (a 16 x stride-4 clip
  fits, and the production shard settings keep the 256-px short side, so a clip costs what a real one does;
  32 videos per shard instead of 256 MB, so decode workers and curation tasks get shards of their own).
  The YAML's curation, subset (``all``) and target rule (``clean_10pct``: 10 % of the clean clips, 30 % of
  them test) are kept: 36 labelled clips (26 train, 10 test), 439 videos to pretrain on (counted at 64x48 px);
- model: ViT-S/16 (``configs/pretrain/vit_s.yaml``) instead of the YAML's ViT-B; the finetune and eval recipes
  (``configs/finetune/vit_b.yaml``: its epochs, RandAugment, erasing, mixup; ``configs/eval/default.yaml``:
  2x3 and 5x3 views, probe, kNN) apply to the pretraining run's architecture as the study resolves them;
- grid: one cell, the first value of every axis (``init`` from ``--init``, ``pretrain.schedule.epochs: 100``),
  one seed (0): no finding can get a verdict (it needs >= 2 runs per group), the report says so;
- one GPU: ``scaling.num_workers=1`` (the YAML's 16 with min 8 is a cluster), eval ``actors=1`` (the YAML's 8
  each take a GPU: on one GPU seven would never start) with 8 CPUs;
- ``parallel.compile=false`` (pretrain and finetune): the loader bounds this run, not the model, and compiling
  costs ~1 min per run;
- the finetune runs in this process, on the device its config names (``cells.run_device``: the GPU for the
  GPU recipes); ``run_study`` would run it in a Ray task given one GPU (``cells.job_gpus``).

Budget on one H200/H100 (an estimate: not run on a GPU yet; :func:`estimate_s` computes its worst case from the
config, a test keeps that 30 s under the wrapper's 550 s, and ``gpu_study.json`` records it beside the measured
stages): imports + Ray ~15 s; data ~45 s (0.8 CPU-s per 320x256x64 video measured on the dev box: synth 0.66,
transcode 0.07, curation 0.07; over 16 cores, plus task start-up); pretraining: Ray Train start-up ~20 s, then
100 epochs x 439 videos = 43.9k clips (2744 steps of 16). ViT-S costs 3.1x fewer FLOPs per clip than ViT-B (67
vs 209 GFLOP, ``model.flops``): ~2600 clips/s model-only at the MFU of the 857 clips/s ViT-B reading (compiled;
this run is eager), while 15 decode workers deliver <= ~1250 clips/s at R=4 (83 per core,
``loader_throughput.py``) and the first reading got 230-265 through Ray Train, so 35-190 s; finetune (26 videos
x 50 epochs, R=2, RandAugment at 0.12 CPU-s per clip over 8 workers) ~40 s; evaluation (two GPU actors, 21 views
per test clip, probe 300 epochs) ~40-60 s; report 5 s. About 4 min at the loader's rate, 6.5 at the first
reading's (worst case by :func:`estimate_s`: 7.4 min, every subset as large as the whole synthetic set);
``gpu_study.sh`` stops it at 550 s, and the stages done by then are in ``gpu_study.json``.

``--tiny`` runs the same code path on the CPU at toy scale (32 tiny 32-px videos, the debug model, 2 epochs,
the target at 50 %: 10 % of 32 clips cannot be split), which is what CI checks.

    bash benchmarks/gpu_study.sh                        # on a GPU machine: results under $OUT
    python benchmarks/gpu_study.py --tiny --out DIR     # anywhere (tests/jobs/study/test_gpu_study.py)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

from jobs.config import from_dict, load_config, load_yaml, save_config  # noqa: E402
from jobs.ray_utils import init_ray  # noqa: E402
from jobs.study import cells  # noqa: E402
from jobs.study.data import prepare_data, resolve_path  # noqa: E402
from jobs.study.study import RESULT_NAME, StudyConfig, expand_grid, resolve_cell, run_study  # noqa: E402
from jobs.train.config import FinetuneConfig, PretrainConfig  # noqa: E402
from jobs.train.launch import local_log_dir  # noqa: E402
from jobs.train.metrics import read_metrics  # noqa: E402
from pipeline import storage  # noqa: E402

STUDY_YAML = "configs/study/scratch_vs_pretrained_gpu.yaml"
SUMMARY = "gpu_study.json"
CLASSES = ["left", "up", "rotate_cw", "zoom_in"]
GPU_BOX_CPUS = 16
# what estimate_s assumes (seconds, clips/s), each figure measured or read where its comment says
RATES = {
    "setup_s": 15.0,  # imports + a local Ray
    "data_cpu_s_per_video": 0.8,  # 320x256x64: synth 0.66 + transcode 0.07 + curation 0.07 CPU-s (dev box)
    "data_fixed_s": 20.0,  # shard and curation task start-up
    "ray_train_start_s": 20.0,  # a Ray Train fit's start-up (README: ~18 s on the dev box)
    "pretrain_clips_per_s": 230.0,  # the first H200 reading through Ray Train (ViT-B, loader-bound): the slowest
    "rand_augment_cpu_s_per_clip": 0.12,  # configs/finetune/vit_b.yaml (benchmarks/finetune_augment.py)
    "finetune_fixed_s": 20.0,  # model build, loader workers
    "eval_s": 60.0,  # two evaluations, each starting a GPU actor
    "report_s": 5.0,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scale:
    """What a mode changes in the study YAML: the synthetic source, the pretraining YAML, extra overrides
    appended to each job's (later ones win), grid axes replaced, the target fraction, the Ray cluster size."""

    synth: dict[str, Any]
    shard: dict[str, Any]
    pretrain_config: str
    pretrain_extra: tuple[str, ...]
    finetune_config: str | None = None  # None: the YAML's
    finetune_extra: tuple[str, ...] = ()
    eval_extra: tuple[str, ...] = ()
    axes: dict[str, list] = dataclasses.field(default_factory=dict)
    target_fraction: float | None = None  # None: the YAML's target rule as it is
    num_cpus: int | None = None


GPU = Scale(
    synth={"seed": 0, "domains": ["shapes", "textures", "gradients"], "classes": CLASSES, "videos_per_class": 40,
           "sizes": [[320, 256]], "frames": [64], "fps": [30], "workers": 0},
    # 32 videos per shard: the decode workers and curation tasks get shards of their own, as on K400's 256-MB
    # shards (the production limit alone puts all 480 videos in one shard)
    shard={"config": "configs/shard/default.yaml", "overrides": ["ray.num_cpus=null", "shards.max_samples=32"]},
    pretrain_config="configs/pretrain/vit_s.yaml",
    pretrain_extra=("scaling.num_workers=1", "scaling.min_workers=null", "parallel.compile=false"),
    finetune_extra=("scaling.num_workers=1", "scaling.min_workers=null", "parallel.compile=false"),
    eval_extra=("actors=1", "cpus_per_actor=8"),
)  # fmt: skip
TINY = Scale(
    synth={"seed": 0, "domains": ["shapes", "textures"], "classes": CLASSES, "videos_per_class": 4,
           "sizes": [[32, 32]], "frames": [16], "fps": [15], "workers": 1,
           "defects": {k: 0.0 for k in ("blur", "static", "duplicate", "near_duplicate", "black", "dark")}},
    shard={"config": "configs/shard/debug.yaml", "overrides": ["transcode.short_side=32"]},
    pretrain_config="configs/pretrain/debug.yaml",
    pretrain_extra=("scaling.num_workers=1", "scaling.min_workers=null", "schedule.total_steps=null",
                    "schedule.warmup_steps=0", "schedule.warmup_epochs=0.5", "metrics.image_every=0",
                    "loader.cache=true"),
    finetune_config="configs/finetune/debug.yaml",
    finetune_extra=("scaling.num_workers=1", "scaling.min_workers=null", "schedule.total_steps=null",
                    "schedule.warmup_steps=0", "schedule.epochs=4", "schedule.warmup_epochs=1"),
    eval_extra=("actors=1", "cpus_per_actor=1", "probe.epochs=20"),
    axes={"pretrain.schedule.epochs": [2]},
    target_fraction=0.5,
    num_cpus=2,
)  # fmt: skip


def study_config(
    scale: Scale, *, init: str, output: str, extra: tuple[str, ...] | list[str] = ()
) -> StudyConfig:
    """The study YAML cut to one cell and seed at ``scale``, through the study's own config loader (every key
    checked, every value validated); ``extra``: the caller's ``a.b=c`` overrides, applied last."""
    raw = load_yaml(str(ROOT / STUDY_YAML))
    data = {k: v for k, v in raw["data"].items() if k not in ("manifest", "curation")}
    data.update(synth=scale.synth, shard=scale.shard)
    if scale.target_fraction is not None:
        data["targets"] = [
            {**t, "rule": {**t["rule"], "fraction": scale.target_fraction}} for t in data["targets"]
        ]
    axes = {k: [v[0]] for k, v in raw["grid"]["axes"].items()} | {"init": [init]} | scale.axes
    ref = lambda job, config, more: {"config": config or raw[job]["config"],  # noqa: E731
                                     "overrides": [*raw[job].get("overrides", []), *more]}  # fmt: skip
    over = {"output": output, "cache": None, "seeds": [0], "data": data, "grid": {"axes": axes},
            "pretrain": ref("pretrain", scale.pretrain_config, scale.pretrain_extra),
            "finetune": ref("finetune", scale.finetune_config, scale.finetune_extra),
            "eval": ref("eval", None, scale.eval_extra), "num_cpus": scale.num_cpus}  # fmt: skip
    return load_config(
        StudyConfig, str(ROOT / STUDY_YAML), [f"{k}={json.dumps(v)}" for k, v in over.items()] + list(extra)
    )


def estimate_s(cfg: StudyConfig, cpus: int = GPU_BOX_CPUS) -> dict[str, float]:
    """Worst-case seconds per stage of ``cfg``'s first cell on a ``cpus``-core GPU machine (``RATES``): the
    pretraining subset and the labelled split each taken as large as the whole synthetic set allows (they are
    smaller), pretraining at the slowest rate seen through Ray Train."""
    syn, r, cell = cfg.data.synth, RATES, expand_grid(cfg)[0]
    videos = len(syn.domains) * len(syn.classes) * syn.videos_per_class
    grid = [f"{k.split('.', 1)[1]}={json.dumps(v)}" for k, v in cell.items() if k.startswith("pretrain.")]
    pcfg = load_config(PretrainConfig, resolve_path(cfg.pretrain.config), [*cfg.pretrain.overrides, *grid])
    fcfg = load_config(FinetuneConfig, resolve_path(cfg.finetune.config), list(cfg.finetune.overrides))
    if pcfg.schedule.epochs is None or fcfg.schedule.epochs is None:
        raise ValueError("estimate_s needs epoch schedules (pretrain and finetune)")
    labelled = videos * max(t.rule.fraction or 1.0 for t in cfg.data.targets)
    ft_clips = fcfg.schedule.epochs * labelled * fcfg.loader.num_sample
    workers = fcfg.loader.num_workers if isinstance(fcfg.loader.num_workers, int) else cpus - 1
    out = {
        "setup": r["setup_s"],
        "data": r["data_fixed_s"] + videos * r["data_cpu_s_per_video"] / cpus,
        "pretrain": 0.0 if cell["init"] == "scratch"
        else r["ray_train_start_s"] + pcfg.schedule.epochs * videos / r["pretrain_clips_per_s"],
        "finetune": r["finetune_fixed_s"] + ft_clips * r["rand_augment_cpu_s_per_clip"] / max(workers, 1),
        "eval": r["eval_s"],
        "report": r["report_s"],
    }  # fmt: skip
    return {**{k: round(v, 1) for k, v in out.items()}, "total": round(sum(out.values()), 1)}


def _rates(log_dir: str, unit: str) -> dict[str, Any]:
    """Median throughput, data wait, MFU, and the peak memory of a run's ``metrics.jsonl``, over the logged
    intervals after the first (start-up); the first alone for a run logged once."""
    path = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    recs = read_metrics(path)
    steady = [r for s, r in recs.items() if s > min(recs)] or list(recs.values())
    med = lambda k: statistics.median(r[k] for r in steady) if all(k in r for r in steady) else None  # noqa: E731
    return {"logged_steps": sorted(recs), f"{unit}_per_s": med(f"{unit}_per_s"),
            "data_wait_frac": med("data_wait_frac"), "mfu": med("mfu"),
            "peak_mem_gb": max(r.get("peak_mem_gb", 0.0) for r in recs.values())}  # fmt: skip


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(out / SUMMARY)


def _keep(src: str | None, out: Path, name: str) -> None:
    """Copy a local file of the study into ``out`` (at most 8 files come back from the GPU machine)."""
    if src and os.path.exists(src):
        shutil.copyfile(src, out / name)


def run(
    scale: Scale, *, init: str, out: Path, work: str, device: str, extra: tuple[str, ...] | list[str] = ()
) -> dict:
    """Run the cell stage by stage; ``out/gpu_study.json`` after each. Returns the summary."""
    t_start = time.perf_counter()
    cfg = study_config(scale, init=init, output=os.path.join(work, "study"), extra=extra)
    result: dict[str, Any] = {"name": "gpu_study", "tiny": scale is TINY, "study": STUDY_YAML, "init": init,
                              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "machine": machine(), "work": work, "estimate_s": estimate_s(cfg),
                              "stages": {}}  # fmt: skip
    save_config(cfg, str(out), "study_config.yaml")
    state: dict[str, Any] = {}

    def stage_data() -> dict:
        pretrain = functools.partial(cells.pretrain_stage, init="pretrained", launcher=cfg.runner.pretrain)
        data = prepare_data(cfg.data, storage.join(cfg.store, "data"), pretrain=pretrain)
        cells_ = expand_grid(cfg)
        assert len(cells_) == 1, cells_
        state["run"] = resolve_cell(cfg, cells_[0], data, cfg.seeds[0])
        return {"cell_id": state["run"].cell_id, "params": cells_[0],
                "subsets": {k: v.size for k, v in data.subsets.items()},
                "targets": {k: {"train": v.train_size, "test": v.test_size, "num_classes": v.num_classes,
                                "chance": v.chance} for k, v in data.targets.items()}}  # fmt: skip

    def stage_pretrain() -> dict:
        r = state["run"]
        pre = cells.pretrain_stage(r.pretrain, r.params["init"], cfg.runner.pretrain)
        plan = r.pretrain.loader
        _keep(os.path.join(local_log_dir(r.pretrain), "metrics.jsonl"), out, "pretrain_metrics.jsonl")
        return {**pre, "launcher": cfg.runner.pretrain, "model": r.pretrain.model.name,
                "batch_size": plan.batch_size, "num_sample": plan.num_sample, "loader_workers": plan.num_workers,
                **_rates(local_log_dir(r.pretrain), "clips")}  # fmt: skip

    def stage_finetune_eval() -> dict:
        r = state["run"]
        ev = cells.finetune_eval_stage(r.job)
        # the study's evaluation cache (what its run writes after this stage): run_study finds it and reuses it
        storage.write_bytes_atomic(storage.join(r.job["out"], RESULT_NAME), json.dumps(ev, indent=1).encode())
        fcfg = from_dict(FinetuneConfig, r.job["finetune"])
        used = [cells.run_device(fcfg.scaling.use_gpu)]
        _keep(os.path.join(local_log_dir(fcfg), "metrics.jsonl"), out, "finetune_metrics.jsonl")
        return {"finetune_device": used, "finetune_wall_s": ev["finetune_wall_s"], "eval_wall_s": ev["eval_wall_s"],
                "metrics": ev["metrics"], "num_classes": ev.get("num_classes"),
                "finetune": _rates(local_log_dir(fcfg), "videos")}  # fmt: skip

    def stage_commit_report() -> dict:
        """``run_study`` itself: every stage is present (data, pretraining run, evaluation), so it only commits
        the cell's ``result.json`` and writes the report."""
        r, done = state["run"], run_study(cfg)
        _keep(storage.join(cfg.output, "cells", r.url_part, RESULT_NAME), out, RESULT_NAME)
        for name in ("results.parquet", "results.md"):
            _keep(done["files"][name], out, name)
        return {k: done[k] for k in ("cells", "runs", "ran", "skipped", "pretrain_runs", "wall_s")} | {
            "files": sorted(done["files"])
        }

    started = init_ray(
        None, new_local=True, num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False
    )
    try:
        for key, fn in (("data", stage_data), ("pretrain", stage_pretrain), ("finetune_eval", stage_finetune_eval),
                        ("commit_report", stage_commit_report)):  # fmt: skip
            t0 = time.perf_counter()
            try:
                result["stages"][key] = {"ok": True, **fn()}
            except Exception as e:  # noqa: BLE001 - record what failed; later stages need this one
                result["stages"][key] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500],
                                         "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
            result["stages"][key]["seconds"] = round(time.perf_counter() - t0, 1)
            result["wall_s"] = round(time.perf_counter() - t_start, 1)
            print(f"gpu_study {key}: {'ok' if result['stages'][key]['ok'] else 'FAILED'} "
                  f"({result['stages'][key]['seconds']} s)", flush=True)  # fmt: skip
            _write(out, result)
            if not result["stages"][key]["ok"]:
                break
    finally:
        if started:
            import ray

            ray.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the same code path at toy scale on the CPU (CI)")
    p.add_argument("--init", choices=("pretrained", "scratch"), default="pretrained", help="the cell's init")
    p.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default $OUT, else "
                   "benchmarks/results/gpu_study_<device>)")  # fmt: skip
    p.add_argument(
        "--work", default=None, help="where the study writes data, runs, cells (default: a temp dir)"
    )
    p.add_argument("overrides", nargs="*", help="extra study overrides a.b=c, applied last")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu" and not args.tiny:
        print("gpu_study: no CUDA device; use --tiny for the CPU version", file=sys.stderr)
        return 2
    tag = (
        "cpu_tiny" if args.tiny else "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name())
    )
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu_study_{tag}"
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="vmae-gpu-study-"))
        result = run(TINY if args.tiny else GPU, init=args.init, out=out, work=os.path.abspath(work),
                     device=device, extra=args.overrides)  # fmt: skip
    ok = all(s["ok"] for s in result["stages"].values()) and len(result["stages"]) == 4
    m = result["stages"].get("finetune_eval", {}).get("metrics", {})
    print(f"RESULT gpu_study device={tag} ok={ok} wall_s={result.get('wall_s')} "
          f"finetune_top1={m.get('finetune.top1')} out={out}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
