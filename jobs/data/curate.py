"""``vmae curate``: per-sample quality and domain metrics over a shard set -> ``curation.parquet`` (Ray job).

One Ray task per shard (``pipeline.curation.quality.curate_shard``: stream the tar, decode a few frames per video,
compute metrics), at most ``ray.max_in_flight`` in flight so a large shard set does not flood the object
store (Ray start-up and the bounded map are the shard job's). The driver then groups near-duplicates
across all shards (pHash + union-find) and writes one table, atomically, with the source manifest, the
resolved config and a summary in its schema metadata. Shards are only read: curation never rewrites them
(subsets select keys with ``vmae subset``).

    vmae curate --shards s3://bucket/set/manifest.json --output s3://bucket/set/curation.parquet [--report]
    vmae curate --output s3://bucket/set/curation.parquet --report-only

``--report`` then writes the curation report (:mod:`jobs.data.curate_report`: histograms, cluster strips, worst
clips by metric) beside the table; ``--report-only`` writes it from the tables already there (curation and,
if ``vmae embed`` wrote one beside it, embeddings) without curating again.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from jobs.config import load_config, save_config, to_dict
from jobs.data.curate_report import write_report
from jobs.ray_utils import RayConfig, bounded_map, default_in_flight, init_ray
from pipeline import storage
from pipeline.curation.quality import CURATION_SCHEMA, QualityConfig, curate_shard, duplicate_groups
from pipeline.ingest import manifest

CURATION_NAME = "curation.parquet"
FORMAT = "vmae-curation/1"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CurateConfig:
    quality: QualityConfig = dataclasses.field(default_factory=QualityConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)  # same knobs as the shard job's


def curation_url(output: str) -> str:
    """``output`` itself when it names a ``.parquet`` file, else ``output/curation.parquet``."""
    return output if output.endswith(".parquet") else storage.join(output, CURATION_NAME)


def add_dup_groups(table: pa.Table, max_distance: int) -> pa.Table:
    """Append ``dup_group`` (row index of the group's first sample) and ``dup_group_size`` columns."""
    hashes_per_row = table.column("phash").to_pylist()
    k = max((len(h) for h in hashes_per_row), default=0)
    hashes = np.zeros((len(hashes_per_row), max(k, 1)), np.uint64)
    valid = np.zeros(hashes.shape, bool)
    for i, row in enumerate(hashes_per_row):
        for j, h in enumerate(row):
            if h is not None:
                hashes[i, j], valid[i, j] = np.int64(h).view(np.uint64), True
    groups = duplicate_groups(hashes, valid, max_distance)
    sizes = np.bincount(groups, minlength=len(groups))[groups]
    return table.append_column("dup_group", pa.array(groups, pa.int64())).append_column(
        "dup_group_size", pa.array(sizes, pa.int64())
    )


def summarize(table: pa.Table) -> dict:
    """Counts a person checks after a curation run: flags, duplicates, decode errors, per-domain quality."""
    df = table.to_pandas()
    ok = df[df["error"] == ""]
    return {
        "num_samples": len(df),
        "errors": int((df["error"] != "").sum()),
        "static": int(ok["is_static"].sum()),
        "dark": int(ok["is_dark"].sum()),
        "with_black_frames": int(ok["has_black"].sum()),
        "with_cuts": int(ok["has_cut"].fillna(False).astype(bool).sum()),
        "dup_groups": int((df.groupby("dup_group").size() > 1).sum()),
        "removable_duplicates": int(len(df) - df["dup_group"].nunique()),
        "decoders": dict(collections.Counter(ok["decoder"])),
        "per_domain": {
            str(d): {"samples": int(len(g)), "mean_quality": round(float(g["quality_score"].mean()), 4)}
            for d, g in ok.groupby("domain")
        },
    }


def run_curation(manifest_url: str, output: str, cfg: CurateConfig, *, address: str | None = None) -> dict:
    """Curate the shard set at ``manifest_url`` into ``curation_url(output)``; returns the summary."""
    m = manifest.read_manifest(manifest_url)
    out_url = curation_url(output)
    storage.check_bucket(out_url)
    urls = [m.shard_url(s) for s in m.shards]
    results: dict[str, pa.Table] = {}

    def done(args: tuple, result: pa.Table | BaseException) -> None:
        # a shard that cannot be opened fails the job (one line) rather than silently losing its samples
        if isinstance(result, BaseException):
            cause = getattr(result, "cause", None) or result
            raise OSError(f"curating {args[0]} failed: {' '.join(str(cause).split())[:300]}") from result
        results[args[0]] = result

    started = init_ray(address, new_local=True, num_cpus=cfg.ray.num_cpus, include_dashboard=False)
    try:
        task = ray.remote(num_cpus=cfg.ray.task_cpus)(curate_shard)
        cap = default_in_flight(cfg.ray)
        with tqdm(total=len(urls), desc="curate", unit="shard", disable=None) as bar:
            args = [(m.shard_url(s), cfg.quality, None, tuple(s.keys)) for s in m.shards]
            bounded_map(task, args, cap, bar, done)
    finally:
        if started:
            ray.shutdown()
    tables = [results[u] for u in urls]
    table = pa.concat_tables(tables) if tables else CURATION_SCHEMA.empty_table()
    table = add_dup_groups(table, cfg.quality.hash_distance)
    summary = summarize(table)
    expected = {k for s in m.shards for k in s.keys}
    summary["missing_keys"] = len(expected - set(table.column("key").to_pylist())) if expected else 0
    meta = {
        "format": FORMAT,
        "source_manifest": m.url,
        "config": json.dumps(to_dict(cfg), sort_keys=True),
        "code_version": manifest.code_version(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "summary": json.dumps(summary, sort_keys=True),
    }
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
    manifest.write_table_atomic(out_url, table)
    save_config(cfg, out_url.rsplit("/", 1)[0] if "/" in out_url else ".", "curate_config.yaml")
    return summary


CONFIG_DIR = "configs/curate"  # where this command's --config YAMLs live (jobs.cli.config_registry)
CONFIG_CLASS = CurateConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", default=None, help="shard-set manifest.json URL (or its folder)")
    parser.add_argument("--output", required=True, help="curation.parquet URL, or a folder to hold it")
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/curate/default.yaml)")
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)"
    )
    parser.add_argument("--report", action="store_true", help="then write report/report.md beside the table")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only write the report, from the tables already at --output",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=c, e.g. quality.num_frames=12")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(CurateConfig, args.config, args.overrides)
    if not args.report_only:
        if not args.shards:
            raise ValueError("--shards is required (unless --report-only)")
        summary = run_curation(args.shards, args.output, cfg, address=args.address)
        print(json.dumps(summary, indent=1))
        print(f"wrote {curation_url(args.output)}")
    if args.report or args.report_only:
        if not storage.exists(curation_url(args.output)):
            raise ValueError(
                f"no curation table at {curation_url(args.output)!r}; run `vmae curate --shards ...` first"
            )
        print(f"wrote {write_report(curation_url(args.output))}")
    return 0
