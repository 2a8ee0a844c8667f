"""VideoMAE pretraining step throughput: forward+backward clips/s and MFU, variants side by side.

MFU = (clips/s x analytic fwd+bwd FLOPs per clip, ``model.flops.pretrain_train_flops``) / peak FLOP/s. GPU peak
comes from a table (dense bf16; fp32 runs are also divided by it, as training MFU is usually quoted); on CPU
the peak is measured in the same run with a large matmul of the variant's dtype, so the CPU number reads as
"achieved fraction of matmul peak".

Variants (ratios against the first): fp32 eager, bf16 autocast eager, and with ``--compile`` the chosen dtype
with every transformer block torch.compile'd (``model.parallelize``).

    python benchmarks/model_step.py --quick                  # CPU: tiny + ViT-S (8x112 clip), < 45 s
    python benchmarks/model_step.py --device cuda --model vit_b --batch 32 --mask-ratio 0.9 --dtype bf16 --compile
        # the reference GPU setting: ViT-B, 16x224x224, tube mask 0.9, batch 32 (not run here: no GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine  # noqa: E402

from model import VideoMAE, get_config  # noqa: E402
from model.flops import pretrain_train_flops  # noqa: E402
from model.parallelize import parallelize  # noqa: E402
from pipeline.loader.masking import tube_mask  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_flops(device: str, dtype: str, *, size: int = 2048, reps: int = 3) -> tuple[float, str]:
    """Peak FLOP/s: GPU table entry, or the best of ``reps`` ``size^3`` matmuls measured now on CPU."""
    if device == "cuda":
        from jobs.train.metrics import GPU_PEAK_FLOPS, peak_flops_for

        name = torch.cuda.get_device_name()
        peak = peak_flops_for(name)
        if peak is None:
            raise ValueError(f"no peak FLOP/s entry for GPU {name!r}; known: {sorted(GPU_PEAK_FLOPS)}")
        return peak, f"table (jobs.train.metrics): {name} dense bf16"
    a = torch.randn(size, size, dtype=DTYPES[dtype])
    b = torch.randn(size, size, dtype=DTYPES[dtype])
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best, f"measured: best of {reps} {size}^3 {dtype} matmuls"


def time_steps(model, cfg, *, batch, device, dtype, steps, warmup, desc) -> float:
    """Seconds per forward+backward step (median over ``steps`` after ``warmup``)."""
    gen = torch.Generator().manual_seed(0)
    video = torch.randn(batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=gen).to(
        device
    )
    masks = [tube_mask(batch, *cfg.grid, cfg.mask_ratio, gen) for _ in range(warmup + steps)]
    autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    times = []
    for i in tqdm(range(warmup + steps), desc=desc, leave=False, file=sys.stderr):
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss, _ = model(video, masks[i])
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(name, cfg, *, batch, device, variants, steps, warmup, peaks) -> list[dict]:
    rows = []
    flops = pretrain_train_flops(cfg)
    for dtype, compiled in variants:
        torch.manual_seed(0)
        model = VideoMAE(cfg).to(device).train()
        if compiled:
            parallelize(model, compile=True)
        label = f"{name} {dtype}{' compile' if compiled else ''}"
        sec = time_steps(
            model, cfg, batch=batch, device=device, dtype=dtype, steps=steps, warmup=warmup, desc=label
        )
        clips = batch / sec
        peak = peaks[dtype][0]
        rows.append(
            {
                "model": name,
                "dtype": dtype,
                "compile": compiled,
                "batch": batch,
                "step_s": sec,
                "clips_per_s": clips,
                "tflops_per_s": clips * flops / 1e12,
                "mfu": clips * flops / peak,
                "gflops_per_clip_fwd_bwd": flops / 1e9,
                "clip": f"{cfg.num_frames}x{cfg.img_size}x{cfg.img_size}",
                "mask_ratio": cfg.mask_ratio,
            }
        )
    for r in rows:
        r["speedup_vs_first"] = r["clips_per_s"] / rows[0]["clips_per_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_b")
    p.add_argument("--batch", type=int, default=None, help="clips per step (default 32 on cuda, 2 on cpu)")
    p.add_argument("--mask-ratio", type=float, default=0.9)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the compiled variant")
    p.add_argument("--compile", action="store_true", help="add a torch.compile variant (inductor, per block)")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny + ViT-S (8x112), fp32 vs bf16")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/model_step[_<device>].json)"
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but no CUDA device is visible")
    if args.batch is not None and args.batch <= 0:
        raise ValueError(f"--batch must be positive, got {args.batch}")
    t_start = time.perf_counter()
    variants = [("fp32", False), ("bf16", False)] + ([(args.dtype, True)] if args.compile else [])
    peaks = {d: peak_flops(args.device, d) for d in {v[0] for v in variants}}
    if args.quick:
        runs = [
            ("tiny", get_config("tiny"), 8, 8, 2),
            ("vit_s", get_config("vit_s", num_frames=8, img_size=112, mask_ratio=args.mask_ratio), 2, 3, 1),
        ]
    else:
        batch = args.batch or (32 if args.device == "cuda" else 2)
        runs = [
            (args.model, get_config(args.model, mask_ratio=args.mask_ratio), batch, args.steps, args.warmup)
        ]
    rows = []
    for name, cfg, batch, steps, warmup in runs:
        rows += bench(
            name,
            cfg,
            batch=batch,
            device=args.device,
            variants=variants,
            steps=steps,
            warmup=warmup,
            peaks=peaks,
        )

    print(
        f"{'model':8} {'clip':>10} {'variant':14} {'batch':>5} {'step s':>8} {'clips/s':>9} {'TFLOP/s':>8} "
        f"{'MFU':>7} {'ratio':>6}"
    )
    for r in rows:
        variant = r["dtype"] + (" compile" if r["compile"] else " eager")
        print(
            f"{r['model']:8} {r['clip']:>10} {variant:14} {r['batch']:>5} {r['step_s']:8.4f} {r['clips_per_s']:9.2f} "
            f"{r['tflops_per_s']:8.4f} {r['mfu']:7.2%} {r['speedup_vs_first']:6.2f}"
        )
    peak_note = {d: {"flops_per_s": v[0], "source": v[1]} for d, v in peaks.items()}
    print("peak: " + ", ".join(f"{d} {v[0] / 1e12:.3f} TFLOP/s ({v[1]})" for d, v in peaks.items()))
    result = {
        "benchmark": "model_step",
        "quick": args.quick,
        "device": args.device,
        "machine": machine(torch_threads=torch.get_num_threads()),
        "peak": peak_note,
        "mfu_meaning": "achieved fraction of matmul peak"
        if args.device == "cpu"
        else "fraction of dense bf16 peak",
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,
    }
    out = (
        Path(args.out)
        if args.out
        else RESULTS / ("model_step.json" if args.quick else f"model_step_{args.device}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    kv = []
    for r in rows:
        tag = f"{r['model']}_{r['dtype']}{'_compile' if r['compile'] else ''}"
        kv += [
            f"{tag}_clips_s={r['clips_per_s']:.3f}",
            f"{tag}_mfu={r['mfu']:.4f}",
            f"{tag}_ratio={r['speedup_vs_first']:.3f}",
        ]
    print(f"RESULT model_step device={args.device} " + " ".join(kv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
