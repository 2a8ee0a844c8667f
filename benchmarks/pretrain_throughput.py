"""Pretraining throughput: clips/s and MFU vs number of data-parallel workers (1 vs 2), side by side.

CPU path (default): DDP over gloo with ``torch.multiprocessing`` processes, one torch thread each, the same
model / optimizer / mask code as ``jobs.train.trainer`` on random clips (so the number isolates compute and
gradient all-reduce; data loading is measured by ``benchmarks/loader_throughput.py``). Per-worker batch is
fixed, as in the resize policy: 2 workers should give ~2x clips/s on 2 cores (weak scaling). MFU's
denominator is the measured single-thread fp32 GEMM peak (``jobs.train.metrics.measure_cpu_peak_flops``) per worker.
Ray Train is not in the timed path: its start-up (tens of seconds) would not fit the quick mode.

GPU path (``--gpu --manifest URL``; not run on the CI machine): the real job, ``jobs.train.pretrain.fit`` with
``configs/pretrain/vit_b.yaml`` (16x224x224, tube mask 0.9, bf16 autocast, real shard loader) on 1 and
``--gpus`` workers for ``--steps`` steps; reports the medians of the per-step metrics rank 0 logs: clips/s,
MFU (against the bf16 data-sheet peak), peak memory and data-wait fraction.

    python benchmarks/pretrain_throughput.py [--quick]
    python benchmarks/pretrain_throughput.py --gpu --manifest s3://bucket/k400/manifest.json --gpus 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import machine

NAME = "pretrain_throughput"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{NAME}.json")


def _worker(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    """One DDP worker: ``spec['steps']`` timed optimizer steps after ``spec['warmup']``; rank 0 writes times."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from jobs.train.metrics import measure_cpu_peak_flops
    from jobs.train.optim import OptimConfig, build_optimizer
    from model import VideoMAE, get_config
    from pipeline.loader.masking import tube_mask

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = get_config("tiny", **spec["model"])
    torch.manual_seed(0)
    model = DDP(VideoMAE(cfg)) if world > 1 else VideoMAE(cfg)
    opt = build_optimizer(model, OptimConfig(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    b, t = spec["batch"], cfg.grid
    video = torch.randn(b, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        mask = tube_mask(b, *t, cfg.mask_ratio, g)
        dist.barrier()
        t0 = time.perf_counter()
        loss, _ = model(video, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    peak = measure_cpu_peak_flops(n=512)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"times": times, "peak_flops": peak}, f)
    dist.destroy_process_group()


def run_cpu(model_kw: dict, *, batch: int, steps: int, warmup: int, workers: int) -> dict:
    from model import get_config
    from model.flops import pretrain_train_flops

    cfg = get_config("tiny", **model_kw)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        port = 29500 + (os.getpid() % 1000) + workers
        spec = {"model": model_kw, "batch": batch, "steps": steps, "warmup": warmup}
        mp.spawn(_worker, args=(workers, port, spec, out), nprocs=workers, join=True)
        with open(out) as f:
            res = json.load(f)
    step_s = statistics.median(res["times"])
    clips_s = batch * workers / step_s
    flops = pretrain_train_flops(cfg)
    return {
        "workers": workers,
        "global_batch": batch * workers,
        "step_s": step_s,
        "clips_per_s": clips_s,
        "mfu": clips_s * flops / (res["peak_flops"] * workers),
        "train_gflops_per_clip": flops / 1e9,
        "peak_gflops_per_worker": res["peak_flops"] / 1e9,
    }


def run_gpu(manifest: str, *, gpus: int, steps: int) -> list[dict]:
    """The real job on GPUs (vit_b recipe); medians over steps after the first 5."""
    from jobs.config import load_config
    from jobs.train.config import PretrainConfig
    from jobs.train.launch import local_log_dir
    from jobs.train.metrics import read_metrics
    from jobs.train.pretrain import fit

    rows = []
    for n in sorted({1, gpus}):
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [
                f"storage_path={tmp}", f"name=bench{n}", f"loader.manifest={manifest}",
                f"scaling.num_workers={n}", "scaling.min_workers=null", f"stop_at_step={steps}",
                # the recipe's 10 CPUs per worker would never be placed on a node with fewer than 10 x n
                f"scaling.cpus_per_worker={max(1, (os.cpu_count() or 2) // n - 1)}",
                f"checkpoint.every_steps={steps}", "metrics.image_every=0", "metrics.log_every=1",
            ]  # fmt: skip
            cfg = load_config(PretrainConfig, "configs/pretrain/vit_b.yaml", overrides)
            fit(cfg)
            recs = list(read_metrics(os.path.join(local_log_dir(cfg), "metrics.jsonl")).values())[5:]
        med = {
            k: statistics.median(r[k] for r in recs)
            for k in ("clips_per_s", "mfu", "data_wait_frac", "peak_mem_gb")
        }
        rows.append({"workers": n, **med})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (< 45 s on 2 cores)")
    ap.add_argument("--gpu", action="store_true", help="run the real job on GPUs (needs --manifest)")
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()

    result: dict = {"benchmark": NAME, "machine": machine(), "quick": args.quick}
    if args.gpu:
        if not args.manifest:
            ap.error("--gpu needs --manifest (a shard set's manifest.json)")
        rows = run_gpu(args.manifest, gpus=args.gpus, steps=args.steps)
        result.update(mode="gpu", config="configs/pretrain/vit_b.yaml", rows=rows)
    else:
        model_kw = {} if args.quick else {
            "img_size": 64, "num_frames": 8, "encoder_width": 192, "encoder_depth": 4, "encoder_heads": 3,
            "decoder_width": 96,
        }  # fmt: skip
        steps, warmup, batch = (6, 2, 4) if args.quick else (20, 3, 8)
        rows = [run_cpu(model_kw, batch=batch, steps=steps, warmup=warmup, workers=w) for w in (1, 2)]
        result.update(
            mode="cpu", model="tiny" if args.quick else "small (tiny + 64px, 8 frames, width 192)", rows=rows
        )
    base = result["rows"][0]
    print(
        f"{'workers':>8} {'clips/s':>10} {'MFU':>8} {'speedup':>8}"
        + ("" if not args.gpu else f" {'mem GB':>8} {'wait':>6}")
    )
    for r in result["rows"]:
        extra = "" if not args.gpu else f" {r['peak_mem_gb']:8.1f} {r['data_wait_frac']:6.3f}"
        print(
            f"{r['workers']:>8} {r['clips_per_s']:10.1f} {r['mfu']:8.4f} {r['clips_per_s'] / base['clips_per_s']:8.2f}"
            + extra
        )
    last = result["rows"][-1]
    result["speedup"] = last["clips_per_s"] / base["clips_per_s"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"RESULT {NAME} mode={result['mode']} workers={last['workers']} clips_per_s_1={base['clips_per_s']:.1f} "
        f"clips_per_s_{last['workers']}={last['clips_per_s']:.1f} speedup={result['speedup']:.2f} "
        f"mfu_1={base['mfu']:.4f} mfu_{last['workers']}={last['mfu']:.4f}"
    )


if __name__ == "__main__":
    main()
