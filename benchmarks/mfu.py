"""Issue 20 item 5: the levers on the model step's MFU, measured side by side in one run (pretraining step =
forward + loss + backward + AdamW step; ViT-B 16x224^2, tube mask 0.9, bf16 autocast on CUDA).

A variant is ``scope/optimizer/batch/sdpa/params``:
- scope: ``eager``, ``blocks`` (each transformer block compiled, today's ``parallel.compile: true``), ``model``
  (``parallel.compile: model``: the whole forward after the host-side mask sort, ``VideoMAE.forward_indexed``);
- optimizer: ``default`` (torch's AdamW kernel: foreach on CUDA, a per-tensor loop on CPU) or ``fused``
  (``optim.fused: true``);
- batch: clips per step;
- sdpa: ``default`` (torch's choice) or a pinned backend ``flash | cudnn | efficient | math``: a
  ``torch.nn.attention.sdpa_kernel`` around the eager step, or, compiled (``model`` scope only), inside the
  compiled region: dynamo does not guard on the backend flags, so a context around a compiled call would reuse
  the graph traced under another backend (checked on CPU with torch 2.14). The attention kernels that ran are
  read with the profiler and recorded;
- params: ``fp32`` (autocast casts the weights each step) or ``bf16``: bf16 parameters and gradients, an fp32
  master copy that the optimizer updates and copies back (a benchmark-only variant: not a training option).

Each variant is built (same init seed, same batch), warmed (compiled) and read once; then ``--rounds`` rounds
time every variant in turn (interleaved), ``--steps`` steps each; the figure is the median over rounds. MFU =
clips/s x analytic FLOPs per clip (``model.flops.pretrain_train_flops``) / ``jobs.train.metrics.device_peak_flops``
(H200: 989 TFLOP/s dense bf16); the analytic count is checked against ``torch.utils.flop_counter`` on one eager
step. Peak memory = the variant's resident state (parameters, optimizer state, master copy) + the peak a step
allocates above it. The JSON is written after every variant's warm-up and every round (a run cut short keeps its
readings).

Budget on one H200 (estimates; no GPU ran this yet): inductor compiles 30-60 s for ``blocks``, 60-90 s per
``model`` graph (each new batch, pinned backend or param dtype is a new graph; fused vs default optimizer reuses
it), steps ~40 ms: the default list below fits ``--budget-s 300`` in priority order; a variant not started by 75 %
of the budget is recorded as skipped (run it with ``--variants``).

On CPU (``--quick``, < 45 s on 2 cores): the same machinery on the tiny config with ``--backend eager`` (dynamo
capture without inductor: seconds, exact numerics), plus AdamW's fused/default step-time ratio on ViT-S's
parameters. It checks that each compile scope and optimizer kernel runs and matches eager; its MFU is the
fraction of a measured CPU fp32 GEMM rate, NOT the GPU figure, and no inductor, flash/cudnn or bf16 kernel is
timed.

    python3 benchmarks/mfu.py --out $OUT/mfu.json     # GPU
    python3 benchmarks/mfu.py --quick                  # CPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch._dynamo
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402
from gpu_smoke import _batch, _sync, _write  # noqa: E402

from jobs.train.metrics import device_peak_flops  # noqa: E402
from jobs.train.optim import OptimConfig, build_optimizer  # noqa: E402
from model import VideoMAE, get_config  # noqa: E402
from model.flops import pretrain_train_flops  # noqa: E402
from model.parallelize import parallelize  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
GPU_VARIANTS = (  # priority order: the budget cuts from the end
    "eager/default/32/default/fp32",
    "blocks/default/32/default/fp32",  # today's recipe (issue 20: 857 clips/s, 18.1 %)
    "blocks/fused/32/default/fp32",
    "model/fused/32/default/fp32",
    "model/default/32/default/fp32",
    "model/fused/64/default/fp32",
    "model/fused/32/cudnn/fp32",
    "model/fused/32/default/bf16",
    "model/fused/32/flash/fp32",
    "model/fused/64/default/bf16",
)
CPU_VARIANTS = (
    "eager/default/4/default/fp32",
    "eager/fused/4/default/fp32",
    "blocks/default/4/default/fp32",
    "model/default/4/default/fp32",
    "model/fused/4/math/fp32",
)


@dataclasses.dataclass(frozen=True)
class Variant:
    scope: str
    optimizer: str
    batch: int
    sdpa: str
    params: str

    @classmethod
    def parse(cls, spec: str) -> Variant:
        parts = spec.split("/")
        if len(parts) != 5 or not parts[2].isdigit():
            raise ValueError(f"variant {spec!r} is not scope/optimizer/batch/sdpa/params")
        v = cls(parts[0], parts[1], int(parts[2]), parts[3], parts[4])
        if v.scope not in ("eager", "blocks", "model") or v.optimizer not in ("default", "fused"):
            raise ValueError(f"variant {spec!r}: scope eager|blocks|model, optimizer default|fused")
        if v.sdpa != "default" and v.sdpa not in SDPA or v.params not in ("fp32", "bf16") or v.batch < 1:
            raise ValueError(f"variant {spec!r}: sdpa default|{'|'.join(SDPA)}, params fp32|bf16, batch >= 1")
        if v.scope == "blocks" and v.sdpa != "default":
            raise ValueError(f"variant {spec!r}: a pinned sdpa backend is measured eager or with scope model")
        return v

    @property
    def name(self) -> str:
        return f"{self.scope}/{self.optimizer}/{self.batch}/{self.sdpa}/{self.params}"


class MasterWeights:
    """bf16 parameters in the model, fp32 copies in the optimizer: after backward the bf16 gradients are copied
    into the masters' gradients, AdamW steps the masters, the masters are copied back (rounded) into the model."""

    def __init__(self, model: torch.nn.Module, master: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p for p in master.parameters() if p.requires_grad]
        for p in self.masters:
            p.grad = torch.zeros_like(p)
        self.opt = opt

    @torch.no_grad()
    def step(self) -> None:
        torch._foreach_copy_([m.grad for m in self.masters], [p.grad for p in self.params])
        self.opt.step()
        torch._foreach_copy_(self.params, self.masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def _pinned(fn, backend: SDPBackend):
    def region(*args):
        with sdpa_kernel([backend]):
            return fn(*args)

    return region


def build(v: Variant, cfg, dev: str, backend: str):
    """(model, optimizer-like, resident bytes) of one variant, same init for all (seed 0)."""
    torch.manual_seed(0)
    model = VideoMAE(cfg).to(dev).train()
    opt_cfg = OptimConfig(fused=v.optimizer == "fused")
    if v.params == "bf16":
        master, model = model, copy.deepcopy(model)
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        opt = MasterWeights(model, master, build_optimizer(master, opt_cfg, lr=1e-4))
    else:
        opt = build_optimizer(model, opt_cfg, lr=1e-4)
    if (
        v.scope == "model" and v.sdpa != "default"
    ):  # parallelize's model scope, with the backend pinned inside
        region = _pinned(model.forward_indexed, SDPA[v.sdpa])
        model.forward_indexed = torch.compile(region, backend=backend, fullgraph=True, dynamic=False)
    elif v.scope != "eager":
        parallelize(model, compile=v.scope, compile_backend=backend)
    return model, opt


def _state_bytes(model, opt) -> int:
    inner = opt.opt if isinstance(opt, MasterWeights) else opt
    tensors = [p for p in model.parameters()] + [t for s in inner.state.values() for t in s.values()]
    if isinstance(opt, MasterWeights):
        tensors += [t for m in opt.masters for t in (m, m.grad)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class Runner:
    """One variant's model, optimizer and batch; ``steps(n)`` runs ``n`` training steps, returns the losses."""

    def __init__(self, v: Variant, cfg, dev: str, backend: str) -> None:
        self.v, self.dev = v, dev
        self.model, self.opt = build(v, cfg, dev, backend)
        self.video, self.mask = _batch(cfg, v.batch, dev)  # the mask stays on the CPU, as the loader's
        amp = dev == "cuda" or v.params == "bf16"
        self.autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=amp)
        eager_pin = v.scope == "eager" and v.sdpa != "default"
        self.sdpa = (lambda: sdpa_kernel([SDPA[v.sdpa]])) if eager_pin else nullcontext

    def steps(self, n: int) -> list[float]:
        losses = []
        with self.sdpa():
            for _ in range(n):
                with self.autocast:
                    loss, _ = self.model(self.video, self.mask)
                loss.backward()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                losses.append(loss.detach())
        return [float(x) for x in losses]

    def attention_kernels(self) -> list[str]:
        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if self.dev == "cuda" else []
        )
        with torch.profiler.profile(activities=acts) as prof:
            self.steps(1)
        keys = {e.key for e in prof.key_averages()}
        words = ("attention", "flash", "fmha", "cudnn", "sdpa")
        return sorted(k for k in keys if any(w in k.lower() for w in words))[:12]


def flop_check(cfg, dev: str, batch: int = 2) -> dict:
    """FLOPs of one eager forward + backward by ``torch.utils.flop_counter``, per clip, against the analytic count."""
    torch.manual_seed(0)
    model = VideoMAE(cfg).to(dev).train()
    video, mask = _batch(cfg, batch, dev)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss, _ = model(video, mask)
        loss.backward()
    counted, analytic = counter.get_total_flops() / batch, pretrain_train_flops(cfg)
    return {"counted_gflops_per_clip": counted / 1e9, "analytic_gflops_per_clip": analytic / 1e9,
            "counted_over_analytic": counted / analytic}  # fmt: skip


def optimizer_ratio(dev: str, model_name: str, reps: int) -> dict:
    """AdamW step seconds, default vs fused kernel, on ``model_name``'s pretraining parameters with random
    gradients, interleaved, medians (the optimizer alone: what the fused kernel changes)."""
    torch.manual_seed(0)
    model = VideoMAE(get_config(model_name)).to(dev)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opts = {k: build_optimizer(model, OptimConfig(fused=k == "fused"), lr=1e-4) for k in ("default", "fused")}
    times: dict[str, list[float]] = {k: [] for k in opts}
    for i in range(reps + 1):
        for k, opt in opts.items():
            _sync(dev)
            t0 = time.perf_counter()
            opt.step()
            _sync(dev)
            if i:  # the first step allocates the state
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    params = sum(p.numel() for p in model.parameters())
    return {"model": model_name, "params": params, "default_s": med["default"], "fused_s": med["fused"],
            "fused_over_default_speed": med["default"] / med["fused"], "reps": reps}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU: tiny config, dynamo eager backend, < 45 s")
    p.add_argument("--variants", nargs="*", default=None, help="scope/optimizer/batch/sdpa/params specs")
    p.add_argument("--model", default=None, help="model config (default vit_b on CUDA, tiny with --quick)")
    p.add_argument(
        "--backend", default=None, help="torch.compile backend (default inductor; eager with --quick)"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compilation)")
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--opt-model", default=None, help="model whose parameters time the AdamW kernels")
    p.add_argument("--out", default=None, help="JSON (default $OUT/mfu.json if $OUT is set, else results/)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if dev == "cpu" and not args.quick:
        print("mfu: no CUDA device; use --quick for the CPU stand-in", file=sys.stderr)
        return 2
    cfg = get_config(args.model or ("vit_b" if dev == "cuda" else "tiny"))
    variants = [
        Variant.parse(s) for s in (args.variants or (GPU_VARIANTS if dev == "cuda" else CPU_VARIANTS))
    ]
    backend = args.backend or ("inductor" if dev == "cuda" else "eager")
    steps = args.steps or (10 if dev == "cuda" else 3)
    out = Path(args.out) if args.out else RESULTS / ("mfu.json" if dev == "cuda" else "mfu_quick.json")
    if not args.out and dev == "cuda" and os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "mfu.json"
    torch._dynamo.config.cache_size_limit = (
        64  # every variant's graphs stay cached for the interleaved rounds
    )
    flops = pretrain_train_flops(cfg)
    peak = device_peak_flops(torch.device(dev))
    load_before = os.getloadavg()
    result: dict = {
        "benchmark": "mfu", "device": dev, "quick": args.quick, "machine": machine(torch_threads=torch.get_num_threads()),
        "model": args.model or ("vit_b" if dev == "cuda" else "tiny"),
        "clip": f"{cfg.num_frames}x{cfg.img_size}x{cfg.img_size}", "mask_ratio": cfg.mask_ratio,
        "compile_backend": backend, "peak_flops_per_s": peak,
        "peak_source": "data sheet, dense bf16 (jobs.train.metrics)" if dev == "cuda"
        else "measured CPU fp32 GEMM: MFU here is NOT the GPU figure",
        "analytic_gflops_per_clip": flops / 1e9, "steps": steps, "rounds": args.rounds, "budget_s": args.budget_s,
        "load_avg_before": load_before, "rows": {}, "skipped": [], "failed": {},
    }  # fmt: skip
    result["flop_counter"] = flop_check(cfg, dev)
    _write(out, result)
    runners: dict[str, Runner] = {}
    for v in variants:
        if time.perf_counter() - t_start > 0.75 * args.budget_s:
            result["skipped"].append(v.name)
            continue
        t0 = time.perf_counter()
        try:
            run = Runner(v, cfg, dev, backend)
            losses = run.steps(args.warmup)
            _sync(dev)
            kernels = run.attention_kernels()
        except Exception as e:  # noqa: BLE001 - e.g. a pinned SDPA backend without a kernel here: the rest run
            result["failed"][v.name] = f"{type(e).__name__}: {e}"[:1000]
            print(f"mfu {v.name}: FAILED {result['failed'][v.name][:300]}", file=sys.stderr, flush=True)
            _write(out, result)
            continue
        row = {"variant": v.name, **dataclasses.asdict(v), "warm_s": time.perf_counter() - t0,
               "warm_losses": losses, "attention_kernels": kernels, "times_s": []}  # fmt: skip
        runners[v.name], result["rows"][v.name] = run, row
        print(f"mfu {v.name}: warm {row['warm_s']:.1f} s, loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
        _write(out, result)
    for _ in range(args.rounds):
        for name, run in runners.items():
            row = result["rows"][name]
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            _sync(dev)
            t0 = time.perf_counter()
            run.steps(steps)
            _sync(dev)
            row["times_s"].append((time.perf_counter() - t0) / steps)
            step_s = statistics.median(row["times_s"])
            row.update(
                step_s=step_s, clips_per_s=run.v.batch / step_s, mfu=run.v.batch / step_s * flops / peak
            )
            if dev == "cuda":
                resident = _state_bytes(run.model, run.opt)
                row["peak_mem_gb"] = (torch.cuda.max_memory_allocated() - base + resident) / 1e9
        _write(out, result)
    rows = list(result["rows"].values())
    for r in rows:
        r["speed_vs_first"] = r["clips_per_s"] / rows[0]["clips_per_s"]
        same = [x for x in rows if x["params"] == r["params"] and x["batch"] == r["batch"]]
        r["max_loss_diff_vs_same_setting"] = max(
            abs(a - b) for x in same for a, b in zip(x["warm_losses"], r["warm_losses"], strict=True)
        )
    result["optimizer"] = optimizer_ratio(dev, args.opt_model or ("vit_b" if dev == "cuda" else "vit_s"),
                                          reps=10 if dev == "cuda" else 4)  # fmt: skip
    result["load_avg_after"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start
    _write(out, result)
    if not rows:
        print(f"RESULT mfu device={dev} variants=0 failed={len(result['failed'])} out={out}")
        return 1
    _report(result, out)
    return 0


def _report(result: dict, out: Path) -> None:
    rows = list(result["rows"].values())

    def mem(r: dict) -> str:
        return f"{r['peak_mem_gb']:.2f}" if "peak_mem_gb" in r else "-"

    print(
        f"{'variant':34} {'warm s':>7} {'step s':>8} {'clips/s':>9} {'MFU':>7} {'vs 1st':>6} {'mem GB':>7} attention"
    )
    for r in rows:
        kern = ",".join(k.split("(")[0][:40] for k in r["attention_kernels"][:2])
        print(f"{r['variant']:34} {r['warm_s']:7.1f} {r['step_s']:8.4f} {r['clips_per_s']:9.2f} {r['mfu']:7.2%} "
              f"{r['speed_vs_first']:6.2f} {mem(r):>7} {kern}")  # fmt: skip
    fc, opt = result["flop_counter"], result["optimizer"]
    print(f"flops/clip: analytic {fc['analytic_gflops_per_clip']:.3f} G, flop_counter {fc['counted_gflops_per_clip']:.3f} G "
          f"({fc['counted_over_analytic']:.3f}x); AdamW on {opt['model']} ({opt['params'] / 1e6:.1f} M params): "
          f"fused {opt['fused_over_default_speed']:.2f}x the default kernel's speed")  # fmt: skip
    for name, err in result["failed"].items():
        print(f"FAILED {name}: {err[:200]}")
    if result["skipped"]:
        print(f"skipped (budget {result['budget_s']:.0f} s): {', '.join(result['skipped'])}")
    if result["device"] == "cpu":
        print("CPU stand-in: MFU is the fraction of a measured CPU fp32 GEMM rate, not the GPU figure; compile "
              f"backend {result['compile_backend']!r}, no inductor/flash/cudnn/bf16 kernel timed")  # fmt: skip
    print(f"wrote {out}")
    best = max(rows, key=lambda r: r["clips_per_s"])
    compiled = [
        r["max_loss_diff_vs_same_setting"] for r in rows if r["scope"] != "eager" and r["params"] == "fp32"
    ]
    print(f"RESULT mfu device={result['device']} model={result['model']} variants={len(rows)} "
          f"skipped={len(result['skipped'])} failed={len(result['failed'])} first_clips_s={rows[0]['clips_per_s']:.3f} "
          f"first_mfu={rows[0]['mfu']:.4f} best={best['variant']} best_clips_s={best['clips_per_s']:.3f} "
          f"best_mfu={best['mfu']:.4f} best_vs_first={best['speed_vs_first']:.3f} "
          f"adamw_fused_speedup={opt['fused_over_default_speed']:.3f} "
          f"compiled_max_loss_diff={max(compiled, default=0.0):.2e} "
          f"flop_counter_ratio={fc['counted_over_analytic']:.4f} load={result['load_avg_after'][0]:.2f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
