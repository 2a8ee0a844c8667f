"""``vmae subset``: select a subset of a curated shard set and write its manifest (keys only, no copies).

    vmae subset --curation s3://b/set/curation.parquet --config configs/curate/subsets/clean.yaml \
        --output s3://b/set/subsets/clean.parquet
    vmae subset --curation set/curation.parquet --rule take=100 order=random seed=1 --output set/r100.parquet

``--rule`` takes ``field=value`` pairs of :class:`pipeline.curation.subset.SubsetRule`; with ``--config`` they
override the YAML's fields.
"""

from __future__ import annotations

import argparse

from jobs.config import load_config
from pipeline.curation.subset import SubsetRule, make_subset

CONFIG_DIR = "configs/curate/subsets"  # where this command's --config YAMLs live (jobs.cli.config_registry)
CONFIG_CLASS = SubsetRule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--curation", required=True, help="curation.parquet URL written by `vmae curate`")
    parser.add_argument("--output", required=True, help="subset manifest URL (.parquet)")
    parser.add_argument("--config", default=None, help="rule YAML (e.g. configs/curate/subsets/clean.yaml)")
    parser.add_argument(
        "--rule", nargs="+", default=[], metavar="FIELD=VALUE", help="rule fields, e.g. take=100"
    )


def run(args: argparse.Namespace) -> int:
    if args.config is None and not args.rule:
        raise ValueError("give the subset rule with --config RULE.yaml and/or --rule field=value ...")
    if not args.output.endswith(".parquet"):
        raise ValueError(f"--output must name a .parquet file, got {args.output!r}")
    rule = load_config(SubsetRule, args.config, args.rule)
    subset = make_subset(args.curation, rule, args.output)
    print(f"wrote {args.output}: {len(subset.keys)} samples, inputs sha256 {subset.inputs_hash[:16]}")
    return 0
