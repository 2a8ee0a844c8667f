"""``vmae shard``: raw videos -> transcoded WebDataset shards + index.parquet + rejects.parquet + manifest.json.

    vmae shard --input s3://raw/ucf101 --output s3://shards/ucf101 [--config configs/shard/default.yaml]
               [key.path=value ...] [--address ray://head:10001] [--overwrite]

Flow: list sources (sorted by key) -> Ray tasks ``prepare_sample`` (probe + transcode into ``_work/``,
cached; at most ``ray.max_in_flight`` in flight so memory stays flat) -> deterministic shard plan -> Ray
tasks ``write_shard`` (atomic) -> index, rejects -> manifest (the commit). A rerun after a crash redoes only
what is missing and ends with the same bytes; a rerun over a committed output with the same config and
inputs is a no-op. The job never dies because of one input: bad inputs become rows of rejects.parquet.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import hashlib
import json
import os
import re
import sys
import time
from typing import Any

import pyarrow as pa
import ray
from tqdm import tqdm

from jobs.config import load_config, save_config, to_dict
from jobs.ray_utils import RayConfig, bounded_map, default_in_flight, init_ray
from pipeline import storage
from pipeline.ingest import manifest as mf
from pipeline.ingest import shards as sh
from pipeline.ingest.sources import Listing, SourceConfig, list_sources
from pipeline.ingest.transcode import TranscodeConfig, identity

_NUMBER = re.compile(r"(?<![=\w.])[0-9]+(?:[.][0-9]+)?")  # counts in reject reasons; not config values
REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("stage", pa.string()), ("error", pa.string())])


class JobFailed(RuntimeError):
    """The job stopped without committing (the environment failed, or inputs failed for transient reasons);
    the message says why and how to resume. Finished work is cached in ``_work/``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardJobConfig:
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    transcode: TranscodeConfig = dataclasses.field(default_factory=TranscodeConfig)
    shards: sh.ShardConfig = dataclasses.field(default_factory=sh.ShardConfig)
    storage: storage.StorageConfig = dataclasses.field(default_factory=storage.StorageConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    keep_work: bool = False  # keep _work/ (transcoded clips) after the commit


CONFIG_DIR = "configs/shard"  # where this command's --config YAMLs live (jobs.cli.config_registry)
CONFIG_CLASS = ShardJobConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", required=True, help="folder/prefix URL of raw videos (local, file://, s3://)"
    )
    parser.add_argument("--output", required=True, help="folder/prefix URL for shards, index and manifest")
    parser.add_argument(
        "--config", default=None, help="YAML config (default: built-in = configs/shard/default.yaml)"
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a shard set built from other inputs/config"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key.path=value")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(ShardJobConfig, args.config, args.overrides)
        shard(args.input, args.output, cfg, address=args.address, overwrite=args.overwrite)
    except ValueError as e:
        print(f"vmae shard: error: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"vmae shard: failed: {e}", file=sys.stderr)
        return 1
    return 0


def resolved_storage(cfg: storage.StorageConfig) -> storage.StorageConfig:
    """Fill endpoint/credentials from the environment so Ray workers get them explicitly."""
    env = os.environ.get
    return dataclasses.replace(
        cfg, endpoint_url=cfg.endpoint_url or env("AWS_ENDPOINT_URL"), key=cfg.key or env("AWS_ACCESS_KEY_ID"),
        secret=cfg.secret or env("AWS_SECRET_ACCESS_KEY"), region=cfg.region or env("AWS_DEFAULT_REGION"),
    )  # fmt: skip


def fingerprint(cfg: ShardJobConfig, listing: Listing) -> str:
    """What the output depends on: config (less how it is run) and every input's path/version/label."""
    conf = {k: v for k, v in to_dict(cfg).items() if k not in ("ray", "storage", "keep_work")}
    conf["transcode"] = identity(cfg.transcode)  # split=fixed: the fingerprint of before scene splitting
    items = [(i.url, i.size, i.version, i.label, i.label_name, i.domain) for i in listing.items]
    blob = json.dumps([conf, items, list(listing.missing), list(listing.classes)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def shard(
    input_url: str,
    output_url: str,
    cfg: ShardJobConfig,
    *,
    address: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the shard job; returns the stats written into the manifest (plus ``noop`` when nothing ran)."""
    t0 = time.time()
    output_url = output_url.rstrip("/")
    st = resolved_storage(cfg.storage)
    storage.check_bucket(output_url, st)
    listing = list_sources(input_url, cfg.source, st, exclude=output_url)
    if not listing.items:
        raise ValueError(
            f"--input {input_url!r} holds no files with extensions {list(cfg.source.extensions)}"
        )
    fp = fingerprint(cfg, listing)
    manifest_url = storage.join(output_url, mf.MANIFEST_NAME)
    if storage.exists(manifest_url, st):
        old = mf.read_manifest(manifest_url, st)
        if old.stats.get("fingerprint") == fp:
            print(f"vmae shard: {output_url} is complete for these inputs and config: nothing to do")
            return {**old.stats, "noop": True}
        if old.stats.get("fingerprint") != fp and not overwrite:
            raise ValueError(f"--output {output_url!r} holds a shard set built from other inputs or config; "
                             "pass --overwrite to replace it, or choose another --output")  # fmt: skip
        fs, path = storage.get_fs(manifest_url, st)
        storage.retry(lambda: fs.rm(path), cfg=st)
    save_config(cfg, output_url, storage_cfg=st)
    work_url = storage.join(output_url, sh.WORK_DIR)
    started = init_ray(address, new_local=True, num_cpus=cfg.ray.num_cpus, include_dashboard=False)
    try:
        cap = default_in_flight(cfg.ray)
        records = _prepare_all(listing, work_url, cfg, st, cap)
        samples = _samples(listing, records, work_url, cfg)
        written = _write_all(sh.plan_shards(samples, cfg.shards), output_url, work_url, cfg, st, cap)
    finally:
        if started:
            ray.shutdown()
    rejects = sorted(
        [(r["source"], r["stage"], r["error"]) for r in records.values() if r["status"] != "ok"]
        + [(p, "list", "named in source.label_list but not found under --input") for p in listing.missing]
        + [(url, "list", why) for url, why in listing.skipped]
    )
    index = _index_rows(written, samples)
    mf.write_table_atomic(
        storage.join(output_url, mf.INDEX_NAME), pa.Table.from_pylist(index, mf.INDEX_SCHEMA), st
    )
    rej = pa.Table.from_pylist(
        [dict(zip(REJECTS_SCHEMA.names, r, strict=True)) for r in rejects], REJECTS_SCHEMA
    )
    mf.write_table_atomic(storage.join(output_url, mf.REJECTS_NAME), rej, st)
    reasons = collections.Counter(f"{s}: {_NUMBER.sub('N', e)}" for _, s, e in rejects)
    stats = {
        "input": input_url, "fingerprint": fp, "classes": list(listing.classes),
        "videos_in": len(listing.items), "videos_ok": sum(r["status"] == "ok" for r in records.values()),
        "videos_cached": sum(bool(r.get("cached")) for r in records.values()), "clips_out": len(index),
        "shards_out": len(written), "shards_reused": sum(w[2] for w in written), "rejected": len(rejects),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "bytes_in": sum(i.size for i in listing.items), "bytes_out": sum(w[0].size for w in written),
        "wall_s": round(time.time() - t0, 3),
    }  # fmt: skip
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    manifest = mf.Manifest(shards=tuple(w[0] for w in written), num_samples=len(index),
                           config=storage.redact(to_dict(cfg)), code_version=mf.code_version(), created=created,
                           stats=stats)  # fmt: skip
    mf.write_manifest(manifest_url, manifest, st)
    _cleanup(output_url, work_url, cfg, st, keep_work=cfg.keep_work,
             keep={w[0].name for w in written} if overwrite else None)  # fmt: skip
    _summary(stats)
    return stats


def _prepare_all(
    listing: Listing, work_url: str, cfg: ShardJobConfig, st: storage.StorageConfig, cap: int
) -> dict[str, dict]:
    """key -> prepare_sample record for every listed source. Raises :class:`JobFailed` on an environment
    failure, or when inputs failed to read (at once past ``ray.max_transient_failures``, else at the end):
    a run with such failures never commits."""
    task = ray.remote(sh.prepare_sample).options(num_cpus=cfg.ray.task_cpus, max_retries=1)
    records: dict[str, dict] = {}
    rejected = collections.Counter()
    bar = tqdm(total=len(listing.items), desc="transcode", unit="video", smoothing=0.1)

    transient: list[str] = []

    def done(args: tuple, result: Any) -> None:
        item = args[0]
        cause = getattr(result, "cause", None)  # a RayTaskError carries the task's own exception
        if isinstance(cause, storage.EnvironmentFailure) or isinstance(result, storage.EnvironmentFailure):
            raise JobFailed(f"{' '.join(str(cause or result).split())[:300]} — an environment failure, not a "
                            "verdict on the video: fix it (disk space, permissions, the store) and rerun the same "
                            "command; finished videos are cached in _work/ and nothing was committed")  # fmt: skip
        if isinstance(
            result, TimeoutError
        ):  # a hang (a FIFO, a pathological file): recorded, retried next run
            result = {"key": item.key, "source": item.url, "status": "rejected", "stage": "timeout",
                      "error": str(result), "cached": False}  # fmt: skip
        elif isinstance(
            result, Exception
        ):  # the worker died twice on it (Ray retried once) or a bug: recorded
            err = " ".join(str(result).split())[-300:]
            result = {"key": item.key, "source": item.url, "status": "rejected", "stage": "worker",
                      "error": f"{type(result).__name__}: {err}", "cached": False}  # fmt: skip
        records[item.key] = result
        rejected[result["status"] != "ok"] += 1
        if result.get("retryable"):
            transient.append(f"{item.url}: {result['error']}")
            if len(transient) >= cfg.ray.max_transient_failures:
                raise JobFailed(f"{len(transient)} inputs failed for reasons that may be transient (first: "
                                f"{transient[0][:200]}); stopped early and committed nothing. Rerun the same "
                                "command when the store is reachable: finished videos are cached in _work/")  # fmt: skip
        bar.set_postfix(rejected=rejected[True], refresh=False)

    try:
        bounded_map(task, ((item, work_url, cfg.transcode, st) for item in listing.items), cap, bar, done,
                     timeout_s=cfg.ray.task_timeout_s)  # fmt: skip
    finally:
        bar.close()
    if transient:
        raise JobFailed(f"{len(transient)} input(s) failed for reasons that may be transient (first: "
                        f"{transient[0][:200]}); nothing was committed. Rerun the same command to retry them: "
                        "finished videos are cached in _work/")  # fmt: skip
    return records


def _samples(
    listing: Listing, records: dict[str, dict], work_url: str, cfg: ShardJobConfig
) -> list[sh.ShardSample]:
    """Accepted clips in write order (``shards.order``), each with the metadata that becomes its
    ``{key}.json``."""
    tc = cfg.transcode
    params = {"codec": "h264", "pix_fmt": "yuv420p", "short_side": tc.short_side, "fps": tc.fps, "gop": tc.gop,
              "crf": tc.crf, "preset": tc.preset, "max_clip_s": tc.max_clip_s,
              **{k: v for k, v in identity(tc).items() if k.startswith(("split", "scene_"))}}  # fmt: skip
    out = []
    for item in listing.items:
        rec = records[item.key]
        if rec["status"] != "ok":
            continue
        for clip in rec["clips"]:
            meta = {"key": clip["key"], "source": item.url, "source_key": item.key,
                    "source_sha256": rec["source_sha256"], "label": item.label, "label_name": item.label_name,
                    "domain": item.domain, "probe": rec["probe"], "transcode": params,
                    "clip": {k: v for k, v in clip.items() if k != "key"}}  # fmt: skip
            url = storage.join(work_url, f"{clip['key']}.mp4")
            out.append(
                sh.ShardSample(
                    key=clip["key"], mp4_url=url, mp4_size=clip["size"], meta=meta, label=item.label
                )
            )
    return sorted(out, key=lambda s: cfg.shards.sort_key(s.key))


def _write_all(
    plan: list[list[sh.ShardSample]],
    output_url: str,
    work_url: str,
    cfg: ShardJobConfig,
    st: storage.StorageConfig,
    cap: int,
):
    """Write every planned shard that is not already complete; returns (ShardInfo, spans, reused) per shard.

    A shard counts as complete when its sidecar ``_work/shards/{name}.json`` (written after the shard)
    records the same plan digest and the shard exists."""
    results: list[Any] = [None] * len(plan)
    todo = []
    for i, samples in enumerate(plan):
        name, digest = sh.shard_name(cfg.shards, i), sh.plan_digest(samples, cfg.shards)
        side_url = storage.join(work_url, "shards", f"{name}.json")
        try:
            side = json.loads(storage.read_bytes(side_url, st))
        except (FileNotFoundError, json.JSONDecodeError):
            side = {}
        if side.get("digest") == digest and storage.exists(storage.join(output_url, name), st):
            info = mf.ShardInfo(**{**side["info"], "keys": tuple(side["info"]["keys"])})
            results[i] = (info, {k: tuple(v) for k, v in side["spans"].items()}, True)
        else:
            todo.append((i, samples, name, digest, side_url))
    task = ray.remote(sh.write_shard).options(num_cpus=cfg.ray.task_cpus, max_retries=2)
    bar = tqdm(total=len(todo), desc="shards", unit="shard")
    by_url = {storage.join(output_url, t[2]): t for t in todo}

    def done(args: tuple, result: Any) -> None:
        if isinstance(result, Exception):  # the output store failed: no partial shard exists, rerun resumes
            raise RuntimeError(f"writing shard {args[1]} failed: {result}") from result
        i, _, _, digest, side_url = by_url[args[1]]
        info, spans = result
        side = {"digest": digest, "info": dataclasses.asdict(info), "spans": spans}
        storage.write_bytes_atomic(side_url, json.dumps(side, sort_keys=True).encode(), st)
        results[i] = (info, spans, False)

    jobs = ((samples, storage.join(output_url, name), cfg.shards, st) for _, samples, name, _, _ in todo)
    bounded_map(task, jobs, cap, bar, done)
    bar.close()
    return results


def _index_rows(written: list, samples: list[sh.ShardSample]) -> list[dict]:
    by_key = {s.key: s for s in samples}
    rows = []
    for info, spans, _ in written:
        for key in info.keys:
            m = by_key[key].meta
            c = m["clip"]
            rows.append({
                "key": key, "shard": info.name, "offset": spans[key][0], "size": spans[key][1],
                "duration": c["duration"], "frames": c["frames"], "fps": c["fps"], "width": c["width"],
                "height": c["height"], "label": m["label"], "domain": m["domain"], "source": m["source"],
                "source_sha256": m["source_sha256"], "label_name": m["label_name"], "clip_index": c["index"],
                "clip_start": c["start"],
            })  # fmt: skip
    return rows


def _cleanup(
    output_url: str,
    work_url: str,
    cfg: ShardJobConfig,
    st: storage.StorageConfig,
    *,
    keep_work: bool,
    keep: set | None,
) -> None:
    """After the commit: drop _work/ (unless kept for a retry), scratch files and, after --overwrite,
    shards of the replaced set that the new manifest does not name."""
    fs, out_path = storage.get_fs(output_url, st)
    if not keep_work and storage.exists(work_url, st):
        storage.retry(lambda: fs.rm(storage.get_fs(work_url, st)[1], recursive=True), cfg=st)
    if storage.protocol(output_url) == "file" and os.path.isdir(os.path.join(out_path, ".tmp")):
        fs.rm(os.path.join(out_path, ".tmp"), recursive=True)
    if keep is not None:
        for path in fs.glob(f"{out_path}/{cfg.shards.prefix}-*.tar"):
            if path.rsplit("/", 1)[-1] not in keep:
                fs.rm(path)


def _summary(stats: dict) -> None:
    rate = stats["videos_in"] / max(stats["wall_s"], 1e-9)
    print(
        f"vmae shard: {stats['videos_in']} videos in -> {stats['videos_ok']} ok ({stats['clips_out']} clips, "
        f"{stats['videos_cached']} from cache), {stats['rejected']} rejected; {stats['shards_out']} shards out "
        f"({stats['shards_reused']} reused); {stats['bytes_in'] / 1e6:.2f} MB in, {stats['bytes_out'] / 1e6:.2f} MB "
        f"out; {stats['wall_s']:.1f} s ({rate:.2f} videos/s)"
    )
    for reason, n in stats["rejected_by_reason"].items():
        print(f"  rejected x{n}: {reason}")
