"""No secret is written anywhere in clear: a planted key and secret (in the environment and in every job's
``storage`` section) must appear in no file a shard -> pretrain (Ray Train) -> eval run writes, locally, on the
(moto) S3 store, or in the Ray session's logs."""

from __future__ import annotations

import os
import secrets

import pytest

from tests.videos import video_bytes

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.timeout(900)]


def _files_with(root: str, needle: bytes) -> list[str]:
    hits = []
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            try:
                with open(p, "rb") as f:
                    if needle in f.read():
                        hits.append(p)
            except OSError:  # sockets, vanished temp files
                continue
    return hits


def test_planted_credentials_reach_no_file(s3_bucket, tmp_path, monkeypatch):
    import ray
    import s3fs

    from jobs.cli import main
    from jobs.config import load_config
    from jobs.train.config import PretrainConfig
    from jobs.train.launch import local_log_dir

    key, secret = f"AKIAPLANT{secrets.token_hex(4).upper()}", f"planted-{secrets.token_hex(12)}"
    # moto accepts any credentials: the planted pair is used for real on every request
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()
    creds = [f"storage.key={key}", f"storage.secret={secret}"]
    raw = tmp_path / "raw"
    for i in range(8):
        p = raw / f"c{i % 2}" / f"v{i}.mp4"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(video_bytes("ok", width=64, height=48, frames=24, seed=i))
    shards = f"{s3_bucket}/shards"
    assert main(["shard", "--input", str(raw), "--output", shards, "--config", "configs/shard/debug.yaml",
                 *creds]) == 0  # fmt: skip
    sessions = {os.path.realpath("/tmp/ray/session_latest")}  # each job started (and stopped) its own Ray
    loader_creds = [f"loader.{c}" for c in creds]
    assert main(["pretrain", "--config", "configs/pretrain/debug.yaml", f"loader.manifest={shards}/manifest.json",
                 f"storage_path={s3_bucket}/runs", "name=p", "schedule.total_steps=2", "checkpoint.every_steps=2",
                 "scaling.num_workers=1", "metrics.image_every=0", *loader_creds]) == 0  # fmt: skip
    if ray.is_initialized():  # the Ray that vmae pretrain started in this process
        sessions.add(ray._private.worker._global_node.get_session_dir_path())
        ray.shutdown()
    assert main(["eval", "--config", "configs/eval/debug.yaml", f"checkpoint={s3_bucket}/runs/p",
                 f"output={s3_bucket}/eval.json", f"test.manifest={shards}", "train=null", "actors=0",
                 *creds]) == 0  # fmt: skip
    needle = secret.encode()
    fs = s3fs.S3FileSystem()
    objects = fs.find(s3_bucket.removeprefix("s3://"))
    assert any(o.endswith("config.yaml") for o in objects) and any(o.endswith("eval.json") for o in objects)
    leaked = [o for o in objects if needle in fs.cat_file(o)]
    pcfg = load_config(
        PretrainConfig, "configs/pretrain/debug.yaml", [f"storage_path={s3_bucket}/runs", "name=p"]
    )
    for local in (str(tmp_path), os.path.dirname(local_log_dir(pcfg)), *sorted(sessions)):
        leaked += _files_with(local, needle)
    assert not leaked, f"the planted secret is written in clear in {leaked[:5]}"
