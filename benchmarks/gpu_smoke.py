"""The first reading of a GPU machine in one short call (``benchmarks/gpu_smoke.sh``, <= 9 minutes on one
H100/H200): every GPU path of the project run once, each section timed and recorded even when another fails.

Sections: ``env`` (nvidia-smi, versions, a compiled kernel); ``model_step`` (ViT-B pretraining step, bf16,
batch 16, eager and per-block torch.compile: step time, MFU, peak memory, recompiles, whether a flash
attention kernel ran); ``finetune_compile`` (one compiled ViT-B classifier step with drop path 0.1: the
recompile-limit check); ``host_syncs`` (synchronising CUDA calls in one pretraining step, counted by
``torch.cuda.set_sync_debug_mode``); ``e2e`` (the ViT-B recipe of ``configs/pretrain/vit_b.yaml`` end to end:
compiled, bf16, its ``num_sample`` and ``num_workers: auto``, 300 steps under Ray Train on shards of 256 px short
side synthesised here: clips/s over ``model_step``'s compiled rate, data-wait); ``ray_train`` (a 1-worker Ray Train pretraining run of ~30 steps on
shards synthesised here, ``stop_at_step`` then ``--resume``: clips/s, data-wait fraction); ``fsdp`` (ViT-L with
FSDP2 + activation checkpointing, a checkpoint saved and resumed); ``loader`` (the loader alone with 14
workers, clips/s against the GPU's step rate). Writes ``benchmarks/results/gpu_smoke_<device>.json`` after
every section, so a run cut short keeps its readings. Budget on an H200 (estimates: no GPU has run it yet):
env 10 s, model_step 90 s, finetune_compile 60 s, host_syncs 10 s, e2e 150 s (synth + shard 30 s, Ray Train
start-up 15 s, compilation 60 s, 300 steps 10-20 s), ray_train 60 s, fsdp 120 s, loader 20 s: ~8.5 of the
9 minutes ``gpu_smoke.sh`` allows.

``--dry-run`` runs the same sections at CPU scale (tiny models, a few steps, the CPU; ``ray_train`` without its
stop + resume, which ``fsdp`` still does), which is what CI checks; a real reading needs a GPU.

    bash benchmarks/gpu_smoke.sh              # on a GPU machine
    python benchmarks/gpu_smoke.py --dry-run  # anywhere (tests/jobs/test_gpu_smoke.py)
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

RAY_TRAIN_EXTRA = ["name=smoke"]
FSDP_EXTRA = ["name=smoke-fsdp", "parallel.strategy=fsdp", "parallel.activation_checkpointing=true",
              "model.name=vit_l", "parallel.precision=bf16", "loader.batch_size=8"]  # fmt: skip
RESUME_AT = 15  # ray_train / fsdp on a GPU: stopped here, then resumed to step 30
E2E_STEPS, E2E_STEPS_DRY, E2E_LOG_EVERY = 300, 6, 50


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


def _shards(root: str, dry: bool, *, e2e: bool = False) -> str:
    """Synthesised labelled videos sharded by the shard job; returns the manifest URL. ``e2e``: the GPU recipe's
    geometry (320x256 sources, 64 frames at 30 fps, the production shard settings: short side 256 kept, GOP 32,
    fastdecode), so a 16x224^2 clip at stride 4 costs what a real one does; else small ones."""
    from jobs.config import load_config
    from jobs.data.shard import ShardJobConfig, shard
    from pipeline.curation.synth import SynthConfig, synthesize

    big = e2e and not dry
    size, frames, fps = ((320, 256), 64, 30.0) if big else (((32, 32) if dry else (128, 128)), 16, 15.0)
    folder = f"{root}/{'e2e' if big else 'small'}"
    if os.path.exists(f"{folder}/shards/manifest.json"):  # made by an earlier section
        return f"{folder}/shards/manifest.json"
    synthesize(SynthConfig(domains=("shapes", "textures"), classes=("left", "up", "rotate_cw", "zoom_in"),
                           videos_per_class=4 if dry else 24, sizes=(size,), frames=(frames,), fps=(fps,),
                           workers=2 if dry else 0), f"{folder}/raw")  # fmt: skip
    shard_cfg = "configs/shard/default.yaml" if big else "configs/shard/debug.yaml"
    over = ["ray.num_cpus=null"] + (
        [] if big else [f"transcode.short_side={min(size)}", f"transcode.fps={fps:g}"]
    )
    shard(f"{folder}/raw", f"{folder}/shards", load_config(ShardJobConfig, str(ROOT / shard_cfg), over))
    return f"{folder}/shards/manifest.json"


def train_overrides(manifest: str, runs: str, dry: bool, extra: list[str]) -> tuple[str, list[str]]:
    """(config YAML, overrides) of the ``ray_train`` / ``fsdp`` runs: 30 steps (6 dry) of the config."""
    base = ["schedule.total_steps=30", "schedule.warmup_steps=3", "checkpoint.every_steps=10", "metrics.log_every=5",
            "metrics.image_every=0", f"loader.manifest={manifest}", f"storage_path={runs}", "scaling.num_workers=1"]  # fmt: skip
    if dry:
        base += ["schedule.total_steps=6", "checkpoint.every_steps=2", "metrics.log_every=1"]
        return "configs/pretrain/debug.yaml", [*base, *extra]
    # the GPU recipes count epochs; the smoke counts steps (exactly one of the two may be set)
    base += ["schedule.epochs=null", "schedule.warmup_epochs=0", "scaling.use_gpu=true", "scaling.min_workers=null",
             f"scaling.cpus_per_worker={max(1, (os.cpu_count() or 8) - 2)}",
             "model.overrides={img_size: 112, num_frames: 16}", "loader.batch_size=16", "loader.num_workers=6",
             "loader.sampling_rate=1", "loader.scales=[1.0]", "parallel.compile=false"]  # fmt: skip
    return "configs/pretrain/vit_s.yaml", [*base, *extra]


def e2e_overrides(manifest: str, runs: str, dry: bool) -> tuple[str, list[str]]:
    """(config YAML, overrides) of the ``e2e`` run: the GPU recipe as configured (ViT-B 16x224^2, compiled,
    bf16, its ``num_sample`` and ``num_workers: auto``) for 300 steps on one GPU; dry: the debug run, 6 steps."""
    over = ["name=smoke-e2e", f"loader.manifest={manifest}", f"storage_path={runs}", "scaling.num_workers=1",
            "scaling.min_workers=null", "schedule.epochs=null", "schedule.warmup_epochs=0",
            f"schedule.total_steps={E2E_STEPS_DRY if dry else E2E_STEPS}", "schedule.warmup_steps=2",
            "checkpoint.every_steps=100000", "checkpoint.at_end=false", "checkpoint.upload=sync",
            f"metrics.log_every={1 if dry else E2E_LOG_EVERY}", "metrics.image_every=0"]  # fmt: skip
    if dry:
        return "configs/pretrain/debug.yaml", [*over, "loader.num_sample=2", "loader.num_workers=1"]
    return "configs/pretrain/vit_b.yaml", [
        *over,
        f"scaling.cpus_per_worker={max(1, (os.cpu_count() or 8) - 1)}",
    ]


def gpu_configs(root: str) -> dict[str, tuple[str, list[str]]]:
    """Every training config the smoke builds on a GPU (``dry=False``), by run: what tests resolve through the
    real config loader, so a recipe change that breaks the smoke fails on the CPU first."""
    small, runs = f"{root}/small/shards/manifest.json", f"{root}/runs"
    out = {}
    for name, extra in (("ray_train", RAY_TRAIN_EXTRA), ("fsdp", FSDP_EXTRA)):
        yaml, over = train_overrides(small, runs, False, extra)
        out[name], out[f"{name}_stop"] = (yaml, over), (yaml, [*over, f"stop_at_step={RESUME_AT}"])
    out["e2e"] = e2e_overrides(f"{root}/e2e/shards/manifest.json", runs, False)
    return out


def _train(manifest: str, runs: str, dry: bool, extra: list[str], resume_at: int | None) -> dict:
    """A pretraining run through Ray Train: stopped at ``resume_at`` and continued with ``--resume`` (``None``:
    one uninterrupted run); the section's reading."""
    from jobs.config import load_config
    from jobs.train.config import PretrainConfig
    from jobs.train.metrics import read_metrics
    from jobs.train.pretrain import fit

    config, over = train_overrides(manifest, runs, dry, extra)
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
    return _train(
        _shards(root, dry), f"{root}/runs", dry, RAY_TRAIN_EXTRA, resume_at=None if dry else RESUME_AT
    )


def section_fsdp(dev: str, dry: bool, root: str) -> dict:
    extra = FSDP_EXTRA[:3] if dry else FSDP_EXTRA
    # ray_train's shards, or (--only fsdp) its own
    return _train(_shards(root, dry), f"{root}/runs", dry, extra, resume_at=3 if dry else RESUME_AT)


def section_e2e(dev: str, dry: bool, root: str, model_clips_per_s: float | None) -> dict:
    """The GPU recipe end to end (``e2e_overrides``): clips/s of the whole run (Ray Train, the loader at its
    configured ``num_sample`` and workers, the trainer) over the model-only rate of the same model and batch
    (``model_step``'s compiled row, this run: forward + backward on one fixed batch, no optimizer step, so a
    perfectly fed run reads a little below 1), and the data-wait fraction; medians over the logged intervals
    after the first (compilation, worker start-up)."""
    import statistics

    from jobs.config import load_config
    from jobs.train.config import PretrainConfig
    from jobs.train.metrics import read_metrics
    from jobs.train.pretrain import fit

    config, over = e2e_overrides(_shards(root, dry, e2e=True), f"{root}/runs", dry)
    cfg = load_config(PretrainConfig, str(ROOT / config), over)
    t0 = time.perf_counter()
    fit(cfg)
    recs = read_metrics(os.path.join(f"{root}/runs", cfg.name, "logs", "metrics.jsonl"))
    steady = [r for step, r in recs.items() if step > min(recs)]
    rate = statistics.median(r["clips_per_s"] for r in steady)
    return {"wall_s": time.perf_counter() - t0, "config": config, "model": cfg.model.name, "steps": max(recs),
            "batch_size": cfg.loader.batch_size, "num_sample": cfg.loader.num_sample,
            "loader_workers": cfg.loader.num_workers, "cpus": os.cpu_count(), "compile": cfg.parallel.compile,
            "precision": cfg.parallel.precision, "clips_per_s": rate, "model_clips_per_s": model_clips_per_s,
            "e2e_over_model": rate / model_clips_per_s if model_clips_per_s else None,
            "data_wait_frac": statistics.median(r["data_wait_frac"] for r in steady),
            "intervals": [{k: r.get(k) for k in ("step", "clips_per_s", "data_wait_frac", "mfu")} for r in recs.values()]}  # fmt: skip


def section_loader(dev: str, dry: bool, root: str, gpu_clips_per_s: float | None) -> dict:
    from model.config import get_config
    from pipeline.loader.loader import LoaderConfig, make_loader

    workers = 1 if dry else min(14, max(1, (os.cpu_count() or 2) - 2))
    spec = (get_config("tiny", num_frames=8) if dry else get_config("vit_s", img_size=112)).clip_spec()
    cfg = LoaderConfig(manifest=f"{root}/small/shards/manifest.json", batch_size=16, num_workers=workers, sampling_rate=1,
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
                        ("e2e", lambda: section_e2e(dev, args.dry_run, root, _model_rate(result))),
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
                _write(out, result)  # after every section: a run cut short keeps what it read
        finally:
            ray.shutdown()
    _write(out, result)
    ok = sum(s["ok"] for s in result["sections"].values())
    print(f"RESULT gpu_smoke device={name} sections_ok={ok} sections={len(result['sections'])} out={out}")
    return 0 if ok == len(result["sections"]) else 1


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(out)


def _model_rate(result: dict) -> float | None:
    """Clips/s of the compiled model step (``model_step``), the model-only rate ``e2e`` compares against."""
    rows = result["sections"].get("model_step", {}).get("rows") or []
    return next((r["clips_per_s"] for r in rows if r["compile"]), None)


def _gpu_rate(result: dict) -> float | None:
    rows = result["sections"].get("model_step", {}).get("rows") or []
    return max((r["clips_per_s"] for r in rows), default=None)


if __name__ == "__main__":
    sys.exit(main())
