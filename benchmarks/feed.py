"""Can the loader feed a GPU, and what does the trainer cost per step? The real Trainer on real shards, with a
stand-in model whose step takes as long as a GPU step would (``benchmarks/standin.py``: it sleeps, so the CPU
and the GIL stay with the loader), side by side with a bare loop over the same loader calling the same step.

Demand: one H200 runs a compiled bf16 ViT-B pretraining step at ~857 clips/s (issue 20.3; 136 clips/s per core
at 40 % MFU); a node has ~14 CPU cores for its loader workers per GPU, so each loader core must deliver
``--demand`` clips/s (61 = 857 / 14). The stand-in step lasts ``batch_size / (demand x num_workers)`` seconds,
so the loader keeps up exactly when each of its workers decodes ``demand`` clips/s.

Shards: the GPU configs' clip geometry and decode cost — videos of the shard job's default settings (320 px
short side, 30 fps, GOP 32, ``fastdecode``), 16-frame clips at sampling rate 4 cropped to 224^2, tube masks —
and the GPU recipe's loader settings (``configs/pretrain/vit_b.yaml``: ``num_sample`` R, batch size, shuffle
buffer). The decode rate of one core at this geometry (clips per CPU-second, no workers) is measured too: it
is the demand one loader core can meet.

Measured, per run (interleaved: trainer, bare, trainer, bare, ...; medians over the repeats; the first
logged interval of each run, which holds worker start-up, is left out):

* ``data_wait``: time the loop waits for the next batch / its wall time (the trainer's own
  ``data_wait_frac``; the bare loop times ``next()`` the same way);
* ``overhead``: wall time per step not spent waiting nor in the stand-in's sleep, as a fraction of the step
  (the trainer's bookkeeping, autocast, backward, optimizer, metrics; the bare loop's backward + optimizer).

Where it runs: the full mode runs the trainer under Ray Train (``jobs.train.launch.fit``, one CPU worker, the
normal launch path); ``--quick`` runs the same ``Trainer`` in this process (``LocalSession``: Ray Train's
start-up, ~15 s a run on 2 cores, does not fit 45 s). Left out: the GPU, the host-to-device copy, NCCL.

Writes ``benchmarks/results/feed.json`` (full) or ``feed_quick.json`` (``--quick``).

    python benchmarks/feed.py [--quick] [--demand 61] [--workers 1] [--session ray_train|local]
        [--set loader.num_sample=2 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, source_frames  # noqa: E402
from standin import StandInConfig, StandInTask, bare_step  # noqa: E402

from jobs.config import load_config  # noqa: E402
from jobs.train.metrics import read_metrics  # noqa: E402
from pipeline.ingest.encode import encode_mp4  # noqa: E402
from pipeline.ingest.transcode import TranscodeConfig, transcode  # noqa: E402
from pipeline.loader.loader import make_loader  # noqa: E402

NAME = "feed"
RESULTS = ROOT / "benchmarks" / "results"
GPU_CONFIG = "configs/pretrain/vit_b.yaml"
H200_CLIPS_PER_S = 857.0  # compiled bf16 ViT-B pretraining step on one H200 (issue 20.3)
CORES_PER_GPU = 14
DEMANDS = (61.0, 136.0)  # clips/s per loader core: 857 / 14, and the demand at 40 % MFU


def make_shards(
    root: str, *, videos: int, copies: int, frames: int, source_hw: tuple[int, int] = (720, 1280)
) -> str:
    """``videos`` distinct sources (``source_hw``, 1280x720 by default) transcoded by the shard job's default
    settings (320 px short side, as ``benchmarks/loader_throughput.py`` does: the same decode cost per clip),
    ``copies`` keys each (an epoch long enough to amortise its start-up, as in real data); returns the
    manifest URL."""
    from loader_throughput import write_shard_set  # local: it imports decord, which only this helper needs

    mp4s = []
    for i in range(videos):
        path = os.path.join(root, f"src{i:03d}.mp4")
        with open(path, "wb") as f:
            f.write(encode_mp4(source_frames(i, frames, *source_hw), fps=30, gop=250, crf=23, threads=0))
        mp4s.append(transcode(path, TranscodeConfig())[0])
    write_shard_set(os.path.join(root, "shards"), mp4s, copies)
    return os.path.join(root, "shards", "manifest.json")


def run_config(manifest: str, storage: str, name: str, *, steps: int, step_s: float, workers: int,
               log_every: int, extra: list[str]) -> StandInConfig:  # fmt: skip
    """The GPU recipe's loader and clips (``GPU_CONFIG``), on one CPU worker, for ``steps`` steps (stopped
    there, checkpointed after the last measured step: the stand-in model cannot be exported)."""
    over = [f"name={name}", f"storage_path={storage}", f"loader.manifest={manifest}",
            f"loader.num_workers={workers}", "loader.pin_memory=false", "schedule.epochs=null",
            "schedule.warmup_epochs=0", f"schedule.total_steps={10 * steps}", "schedule.warmup_steps=0",
            f"stop_at_step={steps}",
            f"checkpoint.every_steps={steps + 1}", "checkpoint.at_end=false", "checkpoint.upload=sync",
            "parallel.compile=false", "parallel.precision=fp32", "scaling.num_workers=1",
            "scaling.min_workers=null", "scaling.use_gpu=false", "scaling.cpus_per_worker=1",
            f"metrics.log_every={log_every}", "metrics.image_every=0", f"step_s={step_s}", *extra]  # fmt: skip
    return load_config(StandInConfig, str(ROOT / GPU_CONFIG), over)


def trainer_run(cfg: StandInConfig, ray_train: bool) -> dict:
    """One run of the real trainer; its logged intervals after the first (worker start-up) summed."""
    if ray_train:
        from jobs.train.launch import fit, local_log_dir

        fit(cfg, StandInTask)
        log_dir = local_log_dir(cfg)
    else:
        from jobs.train.trainer import run_local

        run_url = os.path.join(cfg.storage_path, cfg.name)
        log_dir = os.path.join(run_url, "logs")
        run_local(StandInTask(cfg), run_url=run_url, log_dir=log_dir, export_url=f"{run_url}/final",
                  device="cpu")  # fmt: skip
    recs = list(read_metrics(os.path.join(log_dir, "metrics.jsonl")).values())
    clips_per_step = cfg.loader.batch_size * cfg.optim.accum_steps
    wall = steps = wait = 0.0
    for prev, r in zip(recs, recs[1:], strict=False):
        n = r["step"] - prev["step"]
        # wall: between two logged steps' metrics, so the logging and Ray Train report of the first count too;
        # wait: the trainer's own data-wait fraction of its interval (which starts after that report)
        wall += r["elapsed_s"] - prev["elapsed_s"]
        wait += r["data_wait_frac"] * clips_per_step * n / r["clips_per_s"]
        steps += n
    return _summary(wall, wait, steps, cfg.step_s)


def bare_run(cfg: StandInConfig, skip: int) -> dict:
    """The same loader and stand-in step without the trainer; the first ``skip`` steps left out."""
    task = StandInTask(cfg)
    loader = make_loader(cfg.loader, task.clip_spec())
    model = task.build_model(resuming=False)
    opt = task.build_optimizer(model, 0.01)
    stream = (b for _ in iter(int, 1) for b in loader)  # endless, epoch after epoch
    wall = wait = 0.0
    total = cfg.stop_at_step
    for i in range(total):
        t0 = time.perf_counter()
        batch = next(stream)
        t1 = time.perf_counter()
        bare_step(model, opt, batch)
        if i >= skip:
            wall, wait = wall + time.perf_counter() - t0, wait + t1 - t0
    stream.close()
    return _summary(wall, wait, total - skip, cfg.step_s)


def _summary(wall: float, wait: float, steps: float, step_s: float) -> dict:
    per_step = wall / steps
    return {"steps": int(steps), "wall_s": wall, "step_wall_s": per_step, "data_wait": wait / wall,
            "overhead_s": per_step - wait / steps - step_s, "overhead": (per_step - wait / steps - step_s) / step_s}  # fmt: skip


def decode_rate(cfg: StandInConfig, seconds: float) -> float:
    """Clips per CPU-second of this process decoding the shards with no workers (= clips/s on one core)."""
    import dataclasses

    loader = make_loader(dataclasses.replace(cfg.loader, num_workers=0), StandInTask(cfg).clip_spec())
    torch.set_num_threads(1)
    clips, it = 0, iter(loader)
    next(it)  # first decode: codec set-up
    c0 = time.process_time()
    while time.process_time() - c0 < seconds:
        try:
            clips += next(it)["video"].shape[0]
        except StopIteration:
            it = iter(loader)
    return clips / (time.process_time() - c0)


def measure(manifest: str, root: str, *, demand: float, workers: int, steps: int, log_every: int,
            repeats: int, ray_train: bool, extra: list[str], tag: str) -> dict:  # fmt: skip
    """Interleaved trainer / bare runs at ``demand`` clips/s per loader core; medians."""
    probe = run_config(manifest, root, "probe", steps=steps, step_s=0.0, workers=workers,
                       log_every=log_every, extra=extra)  # fmt: skip
    step_s = probe.loader.batch_size / (demand * workers)
    runs: dict[str, list[dict]] = {"trainer": [], "bare": []}
    for r in range(repeats):
        cfg = run_config(manifest, os.path.join(root, "runs"), f"{tag}-{r}", steps=steps, step_s=step_s,
                         workers=workers, log_every=log_every, extra=extra)  # fmt: skip
        runs["trainer"].append(trainer_run(cfg, ray_train))
        runs["bare"].append(bare_run(cfg, skip=log_every))
        print(f"  demand {demand:g}: repeat {r}: trainer wait {runs['trainer'][-1]['data_wait']:.1%} "
              f"overhead {runs['trainer'][-1]['overhead']:.1%}; bare wait {runs['bare'][-1]['data_wait']:.1%} "
              f"overhead {runs['bare'][-1]['overhead']:.1%}", flush=True)  # fmt: skip
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("data_wait", "overhead", "overhead_s",
                                                               "step_wall_s")} for k, v in runs.items()}  # fmt: skip
    return {"demand": demand, "step_s": step_s, "batch_size": probe.loader.batch_size,
            "num_sample": probe.loader.num_sample, "median": med, "runs": runs}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="in-process trainer, few steps: < 45 s on 2 cores")
    p.add_argument("--demand", type=float, default=DEMANDS[0], help="clips/s per loader core (default 61)")
    p.add_argument("--workers", type=int, default=1, help="loader worker processes (cores)")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/feed[_quick].json)")
    p.add_argument(
        "--set", nargs="*", default=[], help="overrides of the GPU config, e.g. loader.num_sample=2"
    )
    p.add_argument("--session", choices=("auto", "ray_train", "local"), default="auto",
                   help="where the trainer runs (auto: Ray Train in the full mode, in-process with --quick/--tiny)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="tests: tiny clips and videos, a few steps (seconds)")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    demands = sorted({args.demand, *DEMANDS}) if not (args.quick or args.tiny) else [args.demand]
    # distinct videos, frames and (height, width) of the sources; steps per run, log interval, repeats,
    # CPU-seconds of the decode-rate reading; overrides of the GPU config
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    (videos, frames, hw), steps, log_every, repeats, rate_s, extra = {
        "tiny": ((2, 20, (64, 112)), 6, 2, 1, 0.3, ["model.name=tiny", "loader.sampling_rate=2",
                 "loader.batch_size=4", "loader.num_sample=2", "loader.shuffle_buffer=8"]),
        "quick": ((2, 128, (720, 1280)), 20, 5, 2, 1.5, []),
        "full": ((4, 160, (720, 1280)), 100, 20, 3, 6.0, []),
    }[mode]  # fmt: skip
    extra = [*extra, *args.set]
    ray_train = args.session == "ray_train" or (args.session == "auto" and mode == "full")
    probe = run_config("unused", "unused", "probe", steps=steps, step_s=0.0, workers=args.workers,
                       log_every=log_every, extra=extra)  # fmt: skip
    # one epoch covers a run (real epochs hold ~10^5 videos: their boundaries are too rare to count here)
    copies = -(-(steps + 2) * probe.loader.videos_per_batch * args.workers // videos)
    with tempfile.TemporaryDirectory(prefix="vmae-feed-") as root:
        manifest = make_shards(root, videos=videos, frames=frames, copies=copies, source_hw=hw)
        if ray_train:
            import ray

            paths = os.pathsep.join([str(ROOT), str(Path(__file__).resolve().parent)])
            ray.init(include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": paths}})  # fmt: skip
        try:
            probe = run_config(manifest, root, "probe", steps=steps, step_s=0.0, workers=args.workers,
                               log_every=log_every, extra=extra)  # fmt: skip
            rate = decode_rate(probe, rate_s)
            rows = [measure(manifest, root, demand=d, workers=args.workers, steps=steps, log_every=log_every,
                            repeats=repeats, ray_train=ray_train, extra=extra, tag=f"d{d:g}") for d in demands]  # fmt: skip
        finally:
            if ray_train:
                ray.shutdown()
    load_after = os.getloadavg()
    spec = StandInTask(probe).clip_spec()
    print(f"\nload average before {load_before[0]:.1f} / after {load_after[0]:.1f} on {os.cpu_count()} cores; "
          f"trainer under {'Ray Train' if ray_train else 'LocalSession (in-process)'}; {args.workers} loader "
          f"worker(s); clips {spec.num_frames}x{spec.input_size}^2 from {min(TranscodeConfig().short_side, hw[0])}p shards, R={probe.loader.num_sample}, "
          f"batch {probe.loader.batch_size}; one core decodes {rate:.1f} clips/s")  # fmt: skip
    print(
        f"{'demand/core':>11} {'step ms':>8} {'loop':>8} {'data-wait':>9} {'overhead':>9} {'overhead ms':>11}"
    )
    for row in rows:
        for k in ("trainer", "bare"):
            m = row["median"][k]
            print(f"{row['demand']:>11g} {row['step_s'] * 1e3:>8.1f} {k:>8} {m['data_wait']:>9.1%} "
                  f"{m['overhead']:>9.1%} {m['overhead_s'] * 1e3:>11.2f}")  # fmt: skip
    result = {"name": NAME, "quick": args.quick, "tiny": args.tiny, "machine": machine(),
              "load_avg_before": load_before, "load_avg_after": load_after,
              "seconds": time.perf_counter() - t_start, "trainer_session": "ray_train" if ray_train else "local",
              "gpu_config": GPU_CONFIG, "h200_clips_per_s": H200_CLIPS_PER_S, "cores_per_gpu": CORES_PER_GPU,
              "loader_workers": args.workers, "overrides": args.set, "steps_per_run": steps, "log_every": log_every, "repeats": repeats,
              "clip": {"num_frames": spec.num_frames, "input_size": spec.input_size,
                       "sampling_rate": probe.loader.sampling_rate, "num_sample": probe.loader.num_sample,
                       "batch_size": probe.loader.batch_size, "shard_short_side": min(TranscodeConfig().short_side, hw[0]),
                       "videos": videos, "keys": videos * copies},
              "decode_clips_per_s_core": rate, "rows": rows,
              "left_out": "no GPU, no host-to-device copy or on-device normalisation, no NCCL all-reduce"}  # fmt: skip
    out = Path(args.out) if args.out else RESULTS / (f"{NAME}_quick.json" if args.quick else f"{NAME}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    head = next(r for r in rows if r["demand"] == args.demand)["median"]
    more = " ".join(f"data_wait_{r['demand']:g}={r['median']['trainer']['data_wait']:.3f} "
                    f"overhead_{r['demand']:g}={r['median']['trainer']['overhead']:.3f}" for r in rows
                    if r["demand"] != args.demand)  # fmt: skip
    print(
        f"RESULT {NAME} demand={args.demand:g} data_wait={head['trainer']['data_wait']:.3f} "
        f"overhead={head['trainer']['overhead']:.3f} bare_data_wait={head['bare']['data_wait']:.3f} "
        f"bare_overhead={head['bare']['overhead']:.3f} {more + ' ' if more else ''}"
        f"decode_clips_per_s_core={rate:.1f} num_sample={probe.loader.num_sample} workers={args.workers} "
        f"session={result['trainer_session']} load_before={load_before[0]:.1f} load_after={load_after[0]:.1f}"
    )
    return result


if __name__ == "__main__":
    main()
