"""``vmae curate``: per-sample quality and domain metrics over a shard set -> ``curation.parquet`` (Ray job).

One Ray task per shard (``pipeline.quality.curate_shard``: stream the tar, decode a few frames per video,
compute metrics), at most ``max_in_flight`` submitted at once so a large shard set does not flood the object
store. The driver then groups near-duplicates across all shards (pHash + union-find) and writes one table,
atomically, with the source manifest, the resolved config and a summary in its schema metadata. Shards are
only read: curation never rewrites them (subsets select keys with ``vmae subset``).

    vmae curate --shards s3://bucket/set/manifest.json --output s3://bucket/set/curation.parquet
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from jobs.config import load_config, save_config, to_dict
from pipeline import manifest, storage
from pipeline.quality import CURATION_SCHEMA, QualityConfig, curate_shard, duplicate_groups

CURATION_NAME = "curation.parquet"
FORMAT = "vmae-curation/1"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CurateConfig:
    quality: QualityConfig = dataclasses.field(default_factory=QualityConfig)
    max_in_flight: int = 8  # shard tasks submitted and not yet finished
    task_cpus: float = 1.0  # CPUs Ray reserves per shard task (decoding is single-threaded)
    num_cpus: int | None = None  # size of a local Ray cluster started by the job (None: all cores)

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.task_cpus <= 0:
            raise ValueError(f"task_cpus must be > 0, got {self.task_cpus}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1 or null, got {self.num_cpus}")


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
        "dup_groups": int((df.groupby("dup_group").size() > 1).sum()),
        "removable_duplicates": int(len(df) - df["dup_group"].nunique()),
        "decoders": dict(collections.Counter(ok["decoder"])),
        "per_domain": {
            str(d): {"samples": int(len(g)), "mean_quality": round(float(g["quality_score"].mean()), 4)}
            for d, g in ok.groupby("domain")
        },
    }


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address`` (or $RAY_ADDRESS), else start a small local cluster. True if we started Ray."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    return True


def run_curation(manifest_url: str, output: str, cfg: CurateConfig, *, address: str | None = None) -> dict:
    """Curate the shard set at ``manifest_url`` into ``curation_url(output)``; returns the summary."""
    import ray

    m = manifest.read_manifest(manifest_url)
    out_url = curation_url(output)
    started = _init_ray(address, cfg.num_cpus)
    try:
        task = ray.remote(num_cpus=cfg.task_cpus, max_retries=2)(curate_shard)
        pending: dict = {}
        results: dict[int, pa.Table] = {}
        todo = list(enumerate(m.shards))
        with tqdm(total=len(todo), desc="curate", unit="shard", disable=None) as bar:
            while todo or pending:
                while todo and len(pending) < cfg.max_in_flight:
                    i, shard = todo.pop(0)
                    pending[task.remote(m.shard_url(shard), cfg.quality)] = i
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    results[pending.pop(ref)] = ray.get(ref)
                    bar.update()
    finally:
        if started:
            ray.shutdown()
    tables = [results[i] for i in range(len(m.shards))]
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="shard-set manifest.json URL (or its folder)")
    parser.add_argument("--output", required=True, help="curation.parquet URL, or a folder to hold it")
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/curate/default.yaml)")
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=c, e.g. quality.num_frames=12")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(CurateConfig, args.config, args.overrides)
    summary = run_curation(args.shards, args.output, cfg, address=args.address)
    print(json.dumps(summary, indent=1))
    print(f"wrote {curation_url(args.output)}")
    return 0
