"""``vmae synth``: write a labelled synthetic multi-domain video set (UCF101-like folders) to a folder/bucket.

    vmae synth --output data/synth --config configs/synth/default.yaml seed=3 videos_per_class=8

The set is then sharded like any other: ``vmae shard --input data/synth --output data/synth_shards``.
"""

from __future__ import annotations

import argparse
import json

from jobs.config import load_config, save_config
from pipeline.curation.synth import SUMMARY_NAME, SynthConfig, synthesize

CONFIG_DIR = "configs/synth"  # where this command's --config YAMLs live (jobs.cli.config_registry)
CONFIG_CLASS = SynthConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="folder or bucket prefix to write the videos into")
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/synth/default.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=c, e.g. defects.blur=0.1")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(SynthConfig, args.config, args.overrides)
    save_config(cfg, args.output, "synth_config.yaml")
    table = synthesize(cfg, args.output)
    counts = table.group_by("defect").aggregate([("path", "count")]).to_pylist()
    print(
        json.dumps(
            {"videos": table.num_rows, "defects": {r["defect"] or "clean": r["path_count"] for r in counts}}
        )
    )
    print(f"wrote {table.num_rows} videos, labels.csv and {SUMMARY_NAME} under {args.output}")
    return 0
