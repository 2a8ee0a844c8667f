"""The first reading of a GPU machine in one short call (``benchmarks/gpu_smoke.sh``, <= 9 minutes on one
H100/H200): every GPU path of the project run once, each section timed and recorded even when another fails.

Sections: ``env`` (nvidia-smi, versions, a compiled kernel); ``model_step`` (ViT-B pretraining step, bf16,
batch 16, eager and per-block torch.compile: step time, MFU, peak memory, recompiles, whether a flash
attention kernel ran); ``finetune_compile`` (one compiled ViT-B classifier step with drop path 0.1: the
recompile-limit check); ``host_syncs`` (synchronising CUDA calls in one pretraining step, counted by
``torch.cuda.set_sync_debug_mode``); ``ray_train`` (a 1-worker Ray Train pretraining run of ~30 steps on
shards synthesised here, ``stop_at_step`` then ``--resume``: clips/s, data-wait fraction); ``fsdp`` (ViT-L with
FSDP2 + activation checkpointing, a checkpoint saved and resumed); ``loader`` (the loader alone with 14
workers, clips/s against the GPU's step rate). Writes ``benchmarks/results/gpu_smoke_<device>.json``.

``--dry-run`` runs the same sections at CPU scale (tiny models, a few steps, the CPU; ``ray_train`` without its
stop + resume, which ``fsdp`` still does), which is what CI checks; a real reading needs a GPU.

    bash benchmarks/gpu_smoke.sh              # on a GPU machine
    python benchmarks/gpu_smoke.py --dry-run  # anywhere (tests/benchmarks)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def section_env(dev: str, dry: bool) -> dict:
    out: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": dev}
    try:
        out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=30).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        out["nvidia_smi"] = f"unavailable: {type(e).__name__}"
    fn = torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False)
    x = torch.randn(1024, device=dev)
    out["compiled_kernel_ok"] = bool(torch.allclose(fn(x), torch.sin(x) * 2 + 1, atol=1e-5))
    return out


def _pretrain_model(dev: str, dry: bool):
    from model import VideoMAE, get_config

    cfg = get_config("tiny", num_frames=8) if dry else get_config("vit_b")
    return cfg, VideoMAE(cfg).to(dev)


def _batch(cfg, batch: int, dev: str):
    from pipeline.loader.masking import tube_mask

    g = torch.Generator().manual_seed(0)
    video = torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g).to(dev)
    return video, tube_mask(batch, *cfg.grid, cfg.mask_ratio, g)


def section_model_step(dev: str, dry: bool) -> dict:
    import torch._dynamo

    from jobs.train.metrics import device_peak_flops
    from model.flops import pretrain_train_flops
    from model.parallelize import parallelize

    batch, steps = (2, 3) if dry else (16, 10)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    peak = device_peak_flops(torch.device(dev))
    rows = []
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg, model = _pretrain_model(dev, dry)
        torch._dynamo.reset()
        if compiled:
            parallelize(model, compile=True)
        video, mask = _batch(cfg, batch, dev)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(steps + 2):
            _sync(dev)
            t0 = time.perf_counter()
            with torch.autocast(dev, dtype=dtype, enabled=dev == "cuda"):
                loss, _ = model(video, mask)
            loss.backward()
            model.zero_grad(set_to_none=True)
            _sync(dev)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        step = sorted(times)[len(times) // 2]
        flash = None
        if dev == "cuda":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                with torch.autocast(dev, dtype=dtype):
                    model(video, mask)[0].backward()
            flash = any("flash" in e.key.lower() for e in prof.key_averages())
        rows.append({"compile": compiled, "batch": batch, "step_s": step, "clips_per_s": batch / step,
                     "mfu": batch / step * pretrain_train_flops(cfg) / peak,
                     "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else 0.0,
                     "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
                     "flash_attention_kernel": flash})  # fmt: skip
    return {"model": "tiny" if dry else "vit_b", "rows": rows}


def section_finetune_compile(dev: str, dry: bool) -> dict:
    import torch._dynamo

    from model import VideoMAEClassifier, get_config
    from model.parallelize import parallelize

    torch._dynamo.reset()
    cfg = (
        get_config("tiny", encoder_depth=12, drop_path_rate=0.1)
        if dry
        else get_config("vit_b", drop_path_rate=0.1)
    )
    model = parallelize(VideoMAEClassifier(cfg, 400).to(dev).train(), compile=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=dev)
    y = torch.tensor([1, 2], device=dev)
    for _ in range(2):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {
        "depth": cfg.encoder_depth,
        "loss": float(loss),
        "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
    }


def section_host_syncs(dev: str, dry: bool) -> dict:
    if dev != "cuda":
        return {"skipped": "no CUDA: set_sync_debug_mode needs a GPU"}
    from jobs.train.optim import OptimConfig, build_optimizer

    cfg, model = _pretrain_model(dev, dry)
    opt = build_optimizer(model, OptimConfig(), lr=1e-4)
    video, mask = _batch(cfg, 8, dev)  # the mask stays on the CPU, as the loader delivers it

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss, _ = model(video, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"syncing_calls_per_step": len(syncs), "first": syncs[:5]}


def _shards(root: str, dry: bool) -> str:
    from jobs.config import load_config
    from jobs.data.shard import ShardJobConfig, shard
    from pipeline.curation.synth import SynthConfig, synthesize

    size = 32 if dry else 128
    synthesize(SynthConfig(domains=("shapes", "textures"), classes=("left", "up", "rotate_cw", "zoom_in"),
                           videos_per_class=4 if dry else 24, sizes=((size, size),), frames=(16,), fps=(15.0,),
                           workers=2), f"{root}/raw")  # fmt: skip
    cfg = load_config(ShardJobConfig, str(ROOT / "configs/shard/debug.yaml"),
                      [f"transcode.short_side={size}", "transcode.fps=15", "ray.num_cpus=null"])  # fmt: skip
    shard(f"{root}/raw", f"{root}/shards", cfg)
    return f"{root}/shards/manifest.json"


def _train(manifest: str, runs: str, dry: bool, extra: list[str], resume_at: int | None) -> dict:
    """A pretraining run through Ray Train: stopped at ``resume_at`` and continued with ``--resume`` (``None``:
    one uninterrupted run); the section's reading."""
    from jobs.config import load_config
    from jobs.train.config import PretrainConfig
    from jobs.train.metrics import read_metrics
    from jobs.train.pretrain import fit

    base = ["schedule.total_steps=30", "schedule.warmup_steps=3", "checkpoint.every_steps=10", "metrics.log_every=5",
            "metrics.image_every=0", f"loader.manifest={manifest}", f"storage_path={runs}", "scaling.num_workers=1"]  # fmt: skip
    if dry:
        base += ["schedule.total_steps=6", "checkpoint.every_steps=2", "metrics.log_every=1"]
        config = "configs/pretrain/debug.yaml"
    else:
        base += ["scaling.use_gpu=true", "scaling.min_workers=null", f"scaling.cpus_per_worker={max(1, (os.cpu_count() or 8) - 2)}",
                 "model.overrides={img_size: 112, num_frames: 16}", "loader.batch_size=16", "loader.num_workers=6",
                 "loader.sampling_rate=1", "loader.scales=[1.0]", "parallel.compile=false"]  # fmt: skip
        config = "configs/pretrain/vit_s.yaml"
    over = [*base, *extra]
    t0 = time.perf_counter()
    if resume_at is not None:
        fit(load_config(PretrainConfig, str(ROOT / config), [*over, f"stop_at_step={resume_at}"]))
    resumed = fit(load_config(PretrainConfig, str(ROOT / config), over), resume=resume_at is not None)
    cfg = load_config(PretrainConfig, str(ROOT / config), over)
    recs = read_metrics(os.path.join(runs, cfg.name, "logs", "metrics.jsonl"))
    last = recs[max(recs)]
    from jobs.train.checkpointing import load_any_checkpoint

    exported, meta = load_any_checkpoint(os.path.join(runs, cfg.name))  # FSDP too: the run's final/ export
    return {"wall_s": time.perf_counter() - t0, "final_step": int(resumed.metrics["step"]), "steps_logged": sorted(recs),
            "export": meta["url"], "export_params": sum(p.numel() for p in exported.parameters()),
            "clips_per_s": last["clips_per_s"], "data_wait_frac": last["data_wait_frac"], "loss": last["loss"],
            "mfu": last.get("mfu"), "peak_mem_gb": last.get("peak_mem_gb")}  # fmt: skip


def section_ray_train(dev: str, dry: bool, root: str) -> dict:
    # --dry-run: one uninterrupted run (a Ray Train start-up less for CI); the fsdp section's dry run still stops
    # and resumes through the same _train, and tests/jobs/train/test_pretrain.py covers DDP stop + resume on the CPU
    return _train(_shards(root, dry), f"{root}/runs", dry, ["name=smoke"], resume_at=None if dry else 15)


def section_fsdp(dev: str, dry: bool, root: str) -> dict:
    extra = ["name=smoke-fsdp", "parallel.strategy=fsdp", "parallel.activation_checkpointing=true"]
    if not dry:
        extra += ["model.name=vit_l", "parallel.precision=bf16", "loader.batch_size=8"]
    manifest = f"{root}/shards/manifest.json"  # ray_train's shards, or (--only fsdp) its own
    return _train(manifest if os.path.exists(manifest) else _shards(root, dry), f"{root}/runs", dry, extra,
                  resume_at=3 if dry else 15)  # fmt: skip


def section_loader(dev: str, dry: bool, root: str, gpu_clips_per_s: float | None) -> dict:
    from model.config import get_config
    from pipeline.loader.loader import LoaderConfig, make_loader

    workers = 1 if dry else min(14, max(1, (os.cpu_count() or 2) - 2))
    spec = (get_config("tiny", num_frames=8) if dry else get_config("vit_s", img_size=112)).clip_spec()
    cfg = LoaderConfig(manifest=f"{root}/shards/manifest.json", batch_size=16, num_workers=workers, sampling_rate=1,
                       scales=(1.0,), shuffle_buffer=64)  # fmt: skip
    loader = make_loader(cfg, spec)
    clips, t0 = 0, time.perf_counter()
    for _ in range(1 if dry else 3):
        for batch in loader:
            clips += batch["video"].shape[0]
    rate = clips / (time.perf_counter() - t0)
    return {"workers": workers, "clips_per_s": rate, "gpu_clips_per_s": gpu_clips_per_s,
            "feeds_gpu": None if not gpu_clips_per_s else rate >= gpu_clips_per_s}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the CPU-safe version of every section (CI)")
    p.add_argument(
        "--out", default=None, help="result JSON (default benchmarks/results/gpu_smoke_<device>.json)"
    )
    p.add_argument("--only", nargs="*", default=None, help="run only these sections")
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if dev == "cpu" and not args.dry_run:
        print("gpu_smoke: no CUDA device; use --dry-run for the CPU version", file=sys.stderr)
        return 2
    name = re.sub(
        r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name() if dev == "cuda" else "cpu_dry_run"
    ).strip("_")
    out = Path(args.out) if args.out else RESULTS / f"gpu_smoke_{name}.json"
    result: dict = {"name": "gpu_smoke", "dry_run": args.dry_run, "machine": machine(), "sections": {}}
    import ray

    with tempfile.TemporaryDirectory(prefix="vmae-smoke-") as root:
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 num_cpus=2 if args.dry_run else None)  # fmt: skip
        try:
            sections = [("env", lambda: section_env(dev, args.dry_run)),
                        ("model_step", lambda: section_model_step(dev, args.dry_run)),
                        ("finetune_compile", lambda: section_finetune_compile(dev, args.dry_run)),
                        ("host_syncs", lambda: section_host_syncs(dev, args.dry_run)),
                        ("ray_train", lambda: section_ray_train(dev, args.dry_run, root)),
                        ("fsdp", lambda: section_fsdp(dev, args.dry_run, root)),
                        ("loader", lambda: section_loader(dev, args.dry_run, root, _gpu_rate(result)))]  # fmt: skip
            for key, fn in sections:
                if args.only and key not in args.only:
                    continue
                t0 = time.perf_counter()
                try:
                    result["sections"][key] = {"ok": True, **fn()}
                except Exception as e:  # noqa: BLE001 - every section is read, whatever another did
                    result["sections"][key] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500],
                                               "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
                result["sections"][key]["seconds"] = round(time.perf_counter() - t0, 1)
                print(f"gpu_smoke {key}: {'ok' if result['sections'][key]['ok'] else 'FAILED'} "
                      f"({result['sections'][key]['seconds']} s)", flush=True)  # fmt: skip
        finally:
            ray.shutdown()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    ok = sum(s["ok"] for s in result["sections"].values())
    print(f"RESULT gpu_smoke device={name} sections_ok={ok} sections={len(result['sections'])} out={out}")
    return 0 if ok == len(result["sections"]) else 1


def _gpu_rate(result: dict) -> float | None:
    rows = result["sections"].get("model_step", {}).get("rows") or []
    return max((r["clips_per_s"] for r in rows), default=None)


if __name__ == "__main__":
    sys.exit(main())
