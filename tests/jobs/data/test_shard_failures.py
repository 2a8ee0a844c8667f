"""What a hostile week of use found in the shard job, each as a test that failed before the fix: a full disk is
not a verdict on a video, an object-store outage never yields a committed shard set, a blocking input
(a FIFO) or a hanging decode never stalls the job, and a missing output bucket is never created.

Faults are injected into the Ray tasks by wrapping ``pipeline.ingest.shards.prepare_sample`` with a closure (pickled
by value into the workers), which fails the way the real environment does and otherwise runs the real code. A
closure that patches a module global calls the worker module's own ``prepare_sample``: the driver's original,
captured by the closure, travels as a by-value copy whose globals the patch does not reach."""

from __future__ import annotations

import errno
import json
import os

import pytest

import jobs.data.shard as job
from jobs.cli import main as cli_main
from jobs.config import load_config
from jobs.data.shard import JobFailed, ShardJobConfig, shard
from pipeline import storage
from pipeline.ingest import manifest as mf
from tests.videos import video_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEBUG = os.path.join(ROOT, "configs", "shard", "debug.yaml")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _inputs(root, n: int = 6) -> str:
    for i in range(n):
        p = root / f"c{i % 2}" / f"v{i}.mp4"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(video_bytes("ok", width=64, height=48, frames=12, seed=i))
    return str(root)


def _cfg(*overrides: str) -> ShardJobConfig:
    return load_config(ShardJobConfig, DEBUG, ["ray.max_in_flight=2", *overrides])


def test_full_disk_is_not_a_verdict_on_the_video(ray_cluster, tmp_path, monkeypatch):
    """ENOSPC inside FFmpeg surfaces as a decode error; the job must stop, commit nothing, cache no reject,
    and a rerun once space is back must shard the video normally."""
    src, out = _inputs(tmp_path / "raw"), str(tmp_path / "out")
    real = job.sh.prepare_sample

    def full_disk(item, work_url, cfg, st=None):
        import pipeline.ingest.shards as sh
        from pipeline.ingest.transcode import TranscodeError

        if not item.url.endswith("v3.mp4"):
            return real(item, work_url, cfg, st)

        def no_space(*a, **k):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:
                raise TranscodeError(f"decoding h264 failed: {e}") from e

        saved, sh.transcode_file = sh.transcode_file, no_space
        try:  # the worker module's own prepare_sample, which reads the patched global (``real`` is a copy)
            return sh.prepare_sample(item, work_url, cfg, st)
        finally:
            sh.transcode_file = saved

    monkeypatch.setattr(job.sh, "prepare_sample", full_disk)
    with pytest.raises(
        JobFailed, match="No space left on device.*environment failure.*rerun the same command"
    ):
        shard(src, out, _cfg())
    assert not os.path.exists(os.path.join(out, mf.MANIFEST_NAME))
    records = [json.load(open(os.path.join(out, "_work", f))) for f in os.listdir(os.path.join(out, "_work"))
               if f.endswith(".json")]  # fmt: skip
    assert not any(r["source"].endswith("v3.mp4") for r in records), "nothing is cached for that video"
    monkeypatch.setattr(job.sh, "prepare_sample", real)  # space is back
    stats = shard(src, out, _cfg())
    assert stats["videos_ok"] == 6 and stats["rejected"] == 0


def test_object_store_outage_commits_nothing_and_stops_early(ray_cluster, tmp_path, monkeypatch):
    """Every read fails with a connection error: the job stops after ray.max_transient_failures inputs, writes
    no manifest, and the CLI exits non-zero with one line saying how to resume."""
    src, out = _inputs(tmp_path / "raw", n=10), str(tmp_path / "out")
    seen = tmp_path / "seen"
    seen.mkdir()

    def outage(item, work_url, cfg, st=None):
        import pipeline.ingest.shards as sh

        (seen / item.key).touch()

        def down(*a, **k):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

        saved, sh._fetch = sh._fetch, down
        try:  # the worker module's own prepare_sample, which reads the patched global
            return sh.prepare_sample(item, work_url, cfg, st)
        finally:
            sh._fetch = saved

    monkeypatch.setattr(job.sh, "prepare_sample", outage)
    rc = cli_main(["shard", "--input", src, "--output", out, "--config", DEBUG, "ray.max_in_flight=1",
                   "ray.max_transient_failures=3", "storage.retries=0"])  # fmt: skip
    assert rc == 1
    assert not os.path.exists(os.path.join(out, mf.MANIFEST_NAME))
    assert len(os.listdir(seen)) < 10, "stopped early instead of trying every video"
    with pytest.raises(JobFailed, match="may be transient.*nothing was committed|stopped early"):
        shard(src, out, _cfg("ray.max_transient_failures=100", "storage.retries=0"))
    assert not os.path.exists(os.path.join(out, mf.MANIFEST_NAME))


def test_fifo_is_skipped_at_listing_and_a_hang_times_out(ray_cluster, tmp_path, monkeypatch):
    """A FIFO named x.mp4 would block its reader forever: listed as a reject, never opened. A video whose
    processing hangs is cancelled after ray.task_timeout_s and recorded; the rest is committed."""
    src = _inputs(tmp_path / "raw", n=4)
    os.mkfifo(os.path.join(src, "c0", "x.mp4"))
    out = str(tmp_path / "out")
    real = job.sh.prepare_sample

    def hang(item, work_url, cfg, st=None):
        if item.url.endswith("v2.mp4"):
            import time

            time.sleep(600)
        return real(item, work_url, cfg, st)

    monkeypatch.setattr(job.sh, "prepare_sample", hang)
    stats = shard(src, out, _cfg("ray.task_timeout_s=8"))
    assert stats["videos_ok"] == 3
    rejects = {
        r["source"].rsplit("/", 1)[-1]: r
        for r in mf.read_table(os.path.join(out, mf.REJECTS_NAME)).to_pylist()
    }
    assert rejects["x.mp4"]["stage"] == "list" and "not a regular file" in rejects["x.mp4"]["error"]
    assert rejects["v2.mp4"]["stage"] == "timeout" and "task_timeout_s=8" in rejects["v2.mp4"]["error"]
    assert os.path.exists(os.path.join(out, mf.MANIFEST_NAME))


@pytest.mark.s3
def test_missing_output_bucket_is_never_created(ray_cluster, tmp_path, s3_bucket):
    import boto3

    src = _inputs(tmp_path / "raw", n=2)
    name = "vmae-typo-bucket-never-created"
    rc = cli_main(["shard", "--input", src, "--output", f"s3://{name}/shards", "--config", DEBUG])
    assert rc == 2
    names = {
        b["Name"]
        for b in boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).list_buckets()["Buckets"]
    }
    assert name not in names and s3_bucket.removeprefix("s3://") in names
    with pytest.raises(ValueError, match="does not exist; create it first"):
        storage.check_bucket(f"s3://{name}/x")
