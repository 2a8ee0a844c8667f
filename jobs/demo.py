"""``make demo`` / ``python -m jobs.demo [key=value ...]``: the whole pipeline on one machine, in minutes.

synth (a labelled multi-domain video set into ``demo_out/bucket``, the local folder standing in for a bucket)
-> ``vmae shard`` -> ``vmae curate`` -> ``vmae subset`` (clean clips) + a class-stratified labelled split
-> ``vmae pretrain`` (debug config, Ray Train) -> ``vmae eval`` (linear probe + kNN on frozen features)
-> ``demo_out/summary.md`` (printed too) with the numbers and the reconstruction PNG.

Every stage goes through the ``vmae`` CLI in this process (``jobs.cli.main``) on one local Ray instance, and
every stage is skipped when its output is already there for the same config, so a rerun is quick and an
interrupted demo continues where it stopped. Settings are the embedded :class:`DemoConfig`; override any field
with ``key=value`` (e.g. ``synth.videos_per_class=2 out=/tmp/demo``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

from jobs import cli
from jobs.config import apply_overrides, from_dict, load_config, save_config, to_dict
from jobs.study_data import TargetSpec, digest, resolve_path, write_target_split
from pipeline import manifest as mf
from pipeline import storage
from pipeline.subset import SubsetRule
from pipeline.synth import SUMMARY_NAME, DefectFractions, SynthConfig

CLEAN = SubsetRule(name="clean", exclude_flags=("static", "dark", "black"), dedup=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """The embedded default: 3 domains x 4 motion classes x 6 clips (72 clips of 64x64, 16 frames), ~10 %
    defects; the debug shard/curate/pretrain/eval configs; 16 pretraining steps of the tiny model."""

    out: str = "demo_out"
    synth: SynthConfig = dataclasses.field(
        default_factory=lambda: SynthConfig(
            domains=("textures", "shapes", "gradients"), classes=("left", "right", "rotate_cw", "zoom_in"),
            videos_per_class=6, sizes=((64, 64),), frames=(16,), fps=(15.0,), workers=1,
            defects=DefectFractions(blur=0.03, static=0.03, duplicate=0.02, near_duplicate=0.0, black=0.02, dark=0.0),
        )
    )  # fmt: skip
    shard_config: str = "configs/shard/debug.yaml"
    curate_config: str = "configs/curate/debug.yaml"
    subset: SubsetRule = CLEAN  # what pretraining sees
    target: TargetSpec = TargetSpec(name="labelled", rule=CLEAN, test_fraction=0.5)  # probe train/test
    pretrain_config: str = "configs/pretrain/debug.yaml"
    pretrain_overrides: tuple[str, ...] = (
        "schedule.total_steps=16",
        "checkpoint.every_steps=8",
        "metrics.image_every=8",
    )
    eval_config: str = "configs/eval/debug.yaml"
    eval_overrides: tuple[str, ...] = ("actors=1",)
    num_cpus: int = 2

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("out must name the demo's output folder")
        if self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {self.num_cpus}")


def _vmae(*argv: str) -> None:
    """Run one ``vmae`` subcommand in this process; a non-zero exit code stops the demo."""
    print(f"\n$ vmae {' '.join(argv)}", flush=True)
    rc = cli.main(list(argv))
    if rc:
        raise RuntimeError(f"`vmae {' '.join(argv)}` exited with {rc}")


def _pretrain_done(run_url: str, total_steps: int | None) -> bool:
    """Whether the run's latest checkpoint is its last step."""
    from jobs import checkpointing as ckpt

    last = ckpt.latest_checkpoint_dir(run_url)
    if last is None or total_steps is None or storage.protocol(last) != "file":
        return False
    return int(ckpt.read_trainer_state(last)["progress"]["step"]) >= total_steps


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run (or finish) every stage; returns the summary's numbers and paths (also in ``out/summary.md``)."""
    import ray

    from jobs import checkpointing as ckpt
    from jobs.launch import local_log_dir, run_exists
    from jobs.train_config import PretrainConfig

    out = cfg.out.rstrip("/")
    bucket = storage.join(out, "bucket")
    raw, shards = storage.join(bucket, "raw"), storage.join(bucket, "shards")
    manifest_url = storage.join(shards, mf.MANIFEST_NAME)
    curation_url, subset_url = (
        storage.join(shards, "curation.parquet"),
        storage.join(shards, "subsets", "clean.parquet"),
    )
    conf = storage.join(out, "configs")
    stages: dict[str, str] = {}
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        t = time.time()
        synth_yaml = save_config(cfg.synth, conf, "synth.yaml")
        done = storage.exists(storage.join(raw, SUMMARY_NAME)) and storage.exists(
            storage.join(raw, "synth_config.yaml")
        )
        if done and load_config(SynthConfig, storage.join(raw, "synth_config.yaml")) == cfg.synth:
            stages["synth"] = "skipped (present)"
        else:
            _vmae("synth", "--output", raw, "--config", synth_yaml)
            stages["synth"] = f"{time.time() - t:.1f} s"

        t = time.time()  # no-op when the shard set is complete for these inputs and config
        _vmae("shard", "--input", raw, "--output", shards, "--config", resolve_path(cfg.shard_config),
              "--overwrite", "source.labels=folder", "source.domain_from=prefix")  # fmt: skip
        stages["shard"] = f"{time.time() - t:.1f} s"

        t = time.time()
        m = mf.read_manifest(manifest_url)
        cur_meta = mf.read_table(curation_url).schema.metadata if storage.exists(curation_url) else {}
        if cur_meta and cur_meta.get(b"created", b"").decode() >= m.created:
            stages["curate"] = "skipped (newer than the shard set)"
        else:
            _vmae(
                "curate",
                "--shards",
                manifest_url,
                "--output",
                curation_url,
                "--config",
                resolve_path(cfg.curate_config),
            )
            stages["curate"] = f"{time.time() - t:.1f} s"

        t = time.time()  # cheap and deterministic: always redone
        defaults = SubsetRule().to_dict()
        rule = [f"{k}={json.dumps(v)}" for k, v in cfg.subset.to_dict().items() if v != defaults[k]]
        _vmae("subset", "--curation", curation_url, "--output", subset_url, "--rule", *rule)
        h = digest([curation_url, cfg.target.rule.to_dict(), cfg.target.test_fraction, cfg.target.seed])[:12]
        train_url = storage.join(shards, "targets", f"{cfg.target.name}-train-{h}.parquet")
        test_url = storage.join(shards, "targets", f"{cfg.target.name}-test-{h}.parquet")
        train, test, _ = write_target_split(curation_url, cfg.target, train_url, test_url)
        stages["subset"] = f"{time.time() - t:.1f} s"

        t = time.time()
        over = [*cfg.pretrain_overrides, f"loader.manifest={manifest_url}", f"loader.subset={subset_url}",
                f"storage_path={storage.join(out, 'runs')}"]  # fmt: skip
        pcfg = load_config(PretrainConfig, resolve_path(cfg.pretrain_config), over)
        run_name = f"demo-{digest({k: v for k, v in to_dict(pcfg).items() if k != 'storage_path'})[:8]}"
        pcfg = dataclasses.replace(pcfg, name=run_name)
        if _pretrain_done(pcfg.run_url, pcfg.schedule.total_steps):
            stages["pretrain"] = "skipped (finished)"
        else:
            resume = ["--resume"] if run_exists(pcfg) else []
            _vmae(
                "pretrain", "--config", resolve_path(cfg.pretrain_config), *over, f"name={run_name}", *resume
            )
            stages["pretrain"] = f"{time.time() - t:.1f} s"

        t = time.time()
        eval_url = storage.join(out, "eval.json")
        eval_over = [*cfg.eval_overrides, f"checkpoint={pcfg.run_url}", f"output={eval_url}",
                     f"train.manifest={manifest_url}", f"train.subset={train_url}",
                     f"test.manifest={manifest_url}", f"test.subset={test_url}"]  # fmt: skip
        last = ckpt.latest_checkpoint_dir(pcfg.run_url)
        stamp_url, stamp = storage.join(out, "eval.stamp"), digest([last, cfg.eval_config, eval_over])
        if (
            storage.exists(eval_url)
            and storage.exists(stamp_url)
            and storage.read_bytes(stamp_url).decode() == stamp
        ):
            stages["eval"] = "skipped (same checkpoint and config)"
        else:
            _vmae("eval", "--config", resolve_path(cfg.eval_config), *eval_over)
            storage.write_bytes_atomic(stamp_url, stamp.encode())
            stages["eval"] = f"{time.time() - t:.1f} s"
        report = json.loads(storage.read_bytes(eval_url))
    finally:
        if started:
            ray.shutdown()

    from jobs.metrics import read_metrics

    logs = local_log_dir(pcfg)
    steps = (
        read_metrics(os.path.join(logs, "metrics.jsonl"))
        if os.path.exists(os.path.join(logs, "metrics.jsonl"))
        else {}
    )
    images = (
        sorted(os.listdir(os.path.join(logs, "images")))
        if os.path.isdir(os.path.join(logs, "images"))
        else []
    )
    cur = json.loads(mf.read_table(curation_url).schema.metadata[b"summary"])
    summary = {
        "stages": stages, "videos": m.stats.get("videos_in"), "clips": m.num_samples, "shards": len(m.shards),
        "rejected": m.stats.get("rejected"), "curation": {k: cur.get(k) for k in ("static", "dark", "with_black_frames", "removable_duplicates")},
        "subset_size": len(mf.read_subset(subset_url).keys), "probe_train": len(train), "probe_test": len(test),
        "pretrain_steps": max(steps) if steps else None, "first_loss": steps[min(steps)]["loss"] if steps else None,
        "final_loss": steps[max(steps)]["loss"] if steps else None,
        "recon_png": os.path.join(logs, "images", images[-1]) if images else None, "checkpoint": last,
        "linear_probe": {k: report["linear_probe"][k] for k in ("top1", "top5")},
        "knn": {k: report["knn"][k] for k in ("top1", "top5")}, "num_classes": report.get("num_classes"),
        "eval_report": eval_url,
    }  # fmt: skip
    text = summary_markdown(summary)
    storage.write_bytes_atomic(storage.join(out, "summary.md"), text.encode())
    print("\n" + text)
    return summary


def summary_markdown(s: dict[str, Any]) -> str:
    """The demo's summary as Markdown (accuracies as fractions; chance = 1 / classes)."""
    chance = 1.0 / s["num_classes"] if s.get("num_classes") else float("nan")
    lines = [
        "# vmae demo", "", "| stage | time |", "|---|---|", *[f"| {k} | {v} |" for k, v in s["stages"].items()], "",
        f"- data: {s['videos']} synthetic videos -> {s['clips']} clips in {s['shards']} shards ({s['rejected']} rejected)",
        f"- curation flags: {json.dumps(s['curation'])}; pretraining subset 'clean': {s['subset_size']} clips",
        f"- labelled split for the probe: {s['probe_train']} train / {s['probe_test']} test clips",
        f"- pretraining: {s['pretrain_steps']} steps, loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}" if s["final_loss"] is not None else "- pretraining: no metrics found",
        f"- reconstruction PNG: {s['recon_png']}", f"- checkpoint: {s['checkpoint']}",
        f"- linear probe top-1 {s['linear_probe']['top1']:.3f} (top-5 {s['linear_probe']['top5']:.3f}); "
        f"kNN top-1 {s['knn']['top1']:.3f} (top-5 {s['knn']['top5']:.3f}); chance {chance:.3f}",
        f"- eval report: {s['eval_report']}",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = from_dict(DemoConfig, apply_overrides(to_dict(DemoConfig()), argv), where="demo")
    except ValueError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
