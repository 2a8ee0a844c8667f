"""``make demo`` / ``python -m jobs.demo [key=value ...]``: the whole system on one machine, and what it learns.

A labelled synthetic video set (3 domains x 4 motion classes, rendered at 32 px; ``demo_out/cache/data/raw-*``,
a local folder standing in for a bucket) -> ``vmae shard`` -> ``vmae curate`` -> a ``clean`` pretraining
subset and a labelled split (8 clips per domain x class to finetune on, 50 to test on, never pretrained on)
-> VideoMAE pretraining (Ray Train, ``configs/pretrain/cpu.yaml``) -> finetuning of the pretrained encoder
*and* of the same encoder from scratch with one recipe (``configs/finetune/cpu.yaml``) -> evaluation of both on
the same held-out clips (finetuned accuracy, linear probe and kNN on frozen features) -> ``demo_out/summary.md``
(printed too), with chance, the reconstruction PNG and a plot.

It runs as a one-seed study (``jobs.study.study``: the same stages the ``vmae`` commands run, on one local Ray
instance, pretraining and the scratch finetune side by side on the two cores), and every stage is skipped
when its output is already there for the same config, so a rerun is quick and an interrupted demo continues
where it stopped. Settings are the embedded :class:`DemoConfig`; override any field with ``key=value``
(e.g. ``videos_per_group=60 out=/tmp/demo``). Differences at one seed are not findings: ``vmae study`` with
``configs/study/*.yaml`` runs three seeds and says what is beyond the noise.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

from jobs.config import apply_overrides, from_dict, to_dict
from jobs.study.data import DataConfig, JobRef, TargetSpec
from jobs.study.study import FindingSpec, GridConfig, ReportConfig, RunnerSection, StudyConfig, run_study
from pipeline import storage
from pipeline.curation.subset import SubsetRule
from pipeline.curation.synth import DefectFractions, SynthConfig

CLEAN = SubsetRule(name="clean", exclude_flags=("static", "dark", "black"), dedup=True)
METRICS = ("finetune.top1", "linear_probe.top1", "knn.top1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """The embedded default: 120 clips per domain x class (1440 clips of 32 x 32 px, 16 frames, ~4 % defects),
    of which 8 + 50 per group are the labelled split; the CPU-study recipes; one seed."""

    out: str = "demo_out"
    videos_per_group: int = 120
    synth: SynthConfig = dataclasses.field(
        default_factory=lambda: SynthConfig(
            domains=("shapes", "textures", "gradients"), classes=("left", "up", "rotate_cw", "zoom_in"),
            videos_per_class=1, sizes=((32, 32),), frames=(16,), fps=(15.0,), crf=12, workers=2,
            defects=DefectFractions(blur=0.0, static=0.02, duplicate=0.01, near_duplicate=0.0, black=0.01, dark=0.0),
        )
    )  # fmt: skip
    shard: JobRef = JobRef(
        config="configs/shard/debug.yaml",
        overrides=(
            "transcode.short_side=32",
            "transcode.fps=15",
            "transcode.crf=12",
            "shards.max_samples=128",
        ),
    )
    curate: JobRef = JobRef(config="configs/curate/debug.yaml")
    train_per_group: int = 8
    test_per_group: int = 50
    pretrain: JobRef = JobRef(config="configs/pretrain/cpu.yaml")
    finetune: JobRef = JobRef(config="configs/finetune/cpu.yaml")
    eval: JobRef = JobRef(config="configs/eval/cpu.yaml")
    seed: int = 0
    num_cpus: int = 2

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("out must name the demo's output folder")
        if self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {self.num_cpus}")
        if self.videos_per_group < self.train_per_group + self.test_per_group + 4:
            raise ValueError(
                f"videos_per_group={self.videos_per_group} leaves no clips to pretrain on after "
                f"{self.train_per_group} + {self.test_per_group} labelled ones per group"
            )

    def study(self) -> StudyConfig:
        """The demo as a one-seed study of two cells: pretrained (on the clean subset) and scratch."""
        target = TargetSpec(name="labelled", rule=CLEAN, train_per_group=self.train_per_group,
                            test_per_group=self.test_per_group, stratify=("domain", "label"))  # fmt: skip
        data = DataConfig(
            synth=dataclasses.replace(self.synth, videos_per_class=self.videos_per_group),
            shard=self.shard, curate=self.curate, subsets=(CLEAN,), targets=(target,),
        )  # fmt: skip
        out = self.out.rstrip("/")
        return StudyConfig(
            name="demo", output=storage.join(out, "study"), cache=storage.join(out, "cache"), data=data,
            grid=GridConfig(cells=({"init": "pretrained", "subset": "clean"}, {"init": "scratch"})),
            seeds=(self.seed,), pretrain=self.pretrain, finetune=self.finetune, eval=self.eval,
            report=ReportConfig(metrics=METRICS, findings=(
                FindingSpec(name="pretraining beats scratch", better={"init": "pretrained"}, worse={"init": "scratch"}),
            )),
            runner=RunnerSection(parallel=2, pretrain="train"), num_cpus=self.num_cpus,
        )  # fmt: skip


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run (or finish) every stage; returns the summary's numbers and paths (also in ``out/summary.md``)."""
    t0 = time.time()
    out = run_study(cfg.study())
    by_init = {r["params"]["init"]: r for r in out["results"]}
    pre, scr = by_init["pretrained"], by_init["scratch"]
    summary = {
        "wall_s": round(time.time() - t0, 1), "ran": out["ran"], "subset_size": pre["subset"]["size"],
        "labelled_train": pre["target"]["train_size"], "test": pre["target"]["test_size"],
        "chance": pre["target"]["chance"], "pretrain_steps": pre["pretrain"]["steps"],
        "first_loss": pre["pretrain"].get("first_loss"), "final_loss": pre["pretrain"].get("final_loss"),
        "first_loss_step": pre["pretrain"].get("first_loss_step"), "tail_loss": pre["pretrain"].get("tail_loss"),
        "pretrain_wall_s": pre["pretrain"]["wall_s"], "pretrain_overhead_s": pre["pretrain"].get("overhead_s"),
        "recon_png": pre["pretrain"].get("recon_png"), "plot": out["files"].get("summary"),
        "report": out["files"]["results.md"], "checkpoint": pre["checkpoint"],
        "pretrained": {m: pre["metrics"].get(m) for m in METRICS},
        "scratch": {m: scr["metrics"].get(m) for m in METRICS},
    }  # fmt: skip
    text = summary_markdown(summary)
    storage.write_bytes_atomic(storage.join(cfg.out, "summary.md"), text.encode())
    print("\n" + text)
    return summary


def summary_markdown(s: dict[str, Any]) -> str:
    """The demo's summary as Markdown (accuracies as fractions of the held-out clips)."""
    p, z = s["pretrained"], s["scratch"]
    if s["final_loss"] is None:
        loss = "no metrics"
    elif s.get("tail_loss") is None:
        loss = f"loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}"
    else:  # a logged loss is one step's: the last quarter's mean says where the run ended
        loss = (f"loss {s['first_loss']:.3f} at the first log (step {s['first_loss_step']}) -> "
                f"{s['tail_loss']:.3f} (mean of the logs of the last quarter)")  # fmt: skip
    lines = [
        "# vmae demo", "",
        f"**finetune {p['finetune.top1']:.2f} pretrained vs {z['finetune.top1']:.2f} scratch (chance "
        f"{s['chance']:.2f}); linear probe {p['linear_probe.top1']:.2f} vs {z['linear_probe.top1']:.2f}; kNN "
        f"{p['knn.top1']:.2f} vs {z['knn.top1']:.2f}** — on the same {s['test']} held-out clips, after finetuning "
        f"on the same {s['labelled_train']} labelled ones (one seed: `vmae study` runs three and tests the "
        "difference)", "",
        f"- pretraining: {s['pretrain_steps']} steps on {s['subset_size']} curated clips, {loss}, "
        f"{s['pretrain_wall_s']:.0f} s ({s['pretrain_overhead_s']:.0f} s of it Ray Train start-up)",
        f"- reconstruction PNG (original / masked / reconstructions with the visible and the true tubelet statistics): {s['recon_png']}",
        f"- plot: {s['plot']}", f"- report: {s['report']}", f"- pretrained model: {s['checkpoint']}",
        f"- wall time: {s['wall_s']:.0f} s ({s['ran']} cell(s) run; finished stages are skipped on a rerun)",
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
