"""Lineage: every checkpoint and export records what it was trained from (shard manifest hash, subset hash and
rule, resolved config, code version), in every format, and `vmae eval` / the study report print it."""

from __future__ import annotations

import hashlib
import json

import pytest

from jobs.train.lineage import build_lineage, code_version, describe, flat
from model import VideoMAE, get_config, load_checkpoint, save_checkpoint
from model.checkpoint import read_lineage
from pipeline.ingest import manifest as mf
from tests.pipeline.shardset_helpers import make_shard_set

LINEAGE = {"code": "0.1+gabc", "shards": {"manifest": "s3://b/m.json", "sha256": "ab" * 32},
           "subset": {"url": "s3://b/s.parquet", "sha256": "cd" * 32, "rule": {"dedup": True}},
           "config": {"seed": 3}}  # fmt: skip


@pytest.mark.parametrize("fmt", ["vmae", "hf", "official"])
def test_every_format_keeps_the_lineage(tmp_path, fmt):
    model = VideoMAE(get_config("tiny"))
    url = str(tmp_path / ("m.pth" if fmt == "official" else "m"))
    save_checkpoint(model, url, format=fmt, lineage=LINEAGE)
    assert read_lineage(url) == LINEAGE
    _, meta = load_checkpoint(url, cfg=model.cfg)  # a .pth carries no architecture
    assert meta["lineage"] == LINEAGE and "vmae_lineage" not in meta["extra"]
    bare = str(tmp_path / ("b.pth" if fmt == "official" else "b"))
    save_checkpoint(model, bare, format=fmt)
    assert read_lineage(bare) is None and load_checkpoint(bare, cfg=model.cfg)[1]["lineage"] is None


def test_hf_reads_a_config_with_our_lineage(tmp_path):
    transformers = pytest.importorskip("transformers")
    save_checkpoint(VideoMAE(get_config("tiny")), str(tmp_path / "hf"), format="hf", lineage=LINEAGE)
    hf = transformers.VideoMAEForPreTraining.from_pretrained(str(tmp_path / "hf"))
    assert hf.config.vmae_lineage == LINEAGE  # an unknown config key is kept, not an error


def test_build_lineage_hashes_the_manifests_it_trained_from(tmp_path):
    from jobs.config import load_config
    from jobs.train.config import PretrainConfig

    shards = str(tmp_path / "shards")
    make_shard_set(shards, 6, 2, frames=12, width=48, height=32)
    keys = list(mf.read_manifest(shards).shards[0].keys)
    sub = str(tmp_path / "sub.parquet")
    mf.write_subset(sub, keys, source_manifest=f"{shards}/manifest.json", rule={"take": 3}, inputs_hash="x")
    cfg = load_config(PretrainConfig, "configs/pretrain/debug.yaml",
                      [f"loader.manifest={shards}", f"loader.subset={sub}"])  # fmt: skip
    lin = build_lineage(cfg)
    with open(f"{shards}/manifest.json", "rb") as f:
        assert lin["shards"] == {
            "manifest": f"{shards}/manifest.json",
            "sha256": hashlib.sha256(f.read()).hexdigest(),
        }
    with open(sub, "rb") as f:
        assert lin["subset"]["sha256"] == hashlib.sha256(f.read()).hexdigest() and lin["subset"]["rule"] == {
            "take": 3
        }
    assert lin["config"]["loader"]["subset"] == sub and lin["code"] == code_version()
    json.dumps(lin)  # JSON-able, as every format stores it
    text = "\n".join(describe(lin))
    assert lin["shards"]["sha256"][:16] in text and "take" in text
    assert flat(lin)["pretrain_subset_sha256"] == lin["subset"]["sha256"]
    chained = {
        "code": "c2",
        "pretrained": {"url": "u", "lineage": {k: v for k, v in lin.items() if k != "config"}},
    }
    assert (
        flat(chained)["pretrain_shards_sha256"] == lin["shards"]["sha256"]
        and flat(chained)["lineage_code"] == "c2"
    )
    assert "pretrained from: u" in "\n".join(describe(chained)) and describe(None)[0].startswith(
        "lineage: none"
    )


@pytest.mark.timeout(300)
def test_runs_record_lineage_through_finetune_and_eval(tmp_path, capsys):
    """A pretraining run's checkpoints and export carry its lineage; a finetune from it records the encoder's
    lineage as its ``pretrained``; `vmae eval` prints and writes it."""
    from jobs.cli import main
    from jobs.config import load_config
    from jobs.train.config import FinetuneConfig, PretrainConfig
    from jobs.train.finetune import FinetuneTask
    from jobs.train.pretrain import PretrainTask
    from jobs.train.trainer import run_local

    shards = str(tmp_path / "shards")
    make_shard_set(shards, 8, 2, frames=12, width=48, height=32)
    digest = hashlib.sha256(open(f"{shards}/manifest.json", "rb").read()).hexdigest()
    run = str(tmp_path / "runs" / "p")
    pcfg = load_config(PretrainConfig, "configs/pretrain/debug.yaml", [
        f"loader.manifest={shards}", f"storage_path={tmp_path / 'runs'}", "name=p", "schedule.total_steps=2",
        "checkpoint.every_steps=2", "scaling.num_workers=1", "metrics.image_every=0"])  # fmt: skip
    run_local(PretrainTask(pcfg), run_url=run, log_dir=f"{run}/logs", export_url=f"{run}/final", device="cpu")
    for where in (f"{run}/final", f"{run}/step_00000002"):
        assert (
            read_lineage(where)["shards"]["sha256"] == digest and read_lineage(where)["config"]["name"] == "p"
        )
    frun = str(tmp_path / "runs" / "f")
    fcfg = load_config(FinetuneConfig, "configs/finetune/debug.yaml", [
        f"loader.manifest={shards}", f"storage_path={tmp_path / 'runs'}", "name=f", "schedule.total_steps=1",
        "schedule.warmup_steps=0", "scaling.num_workers=1", f"pretrained={run}", "num_classes=8"])  # fmt: skip
    run_local(
        FinetuneTask(fcfg), run_url=frun, log_dir=f"{frun}/logs", export_url=f"{frun}/final", device="cpu"
    )
    lin = read_lineage(f"{frun}/final")
    assert lin["pretrained"]["url"] == run and lin["pretrained"]["lineage"]["shards"]["sha256"] == digest
    assert "config" not in lin["pretrained"]["lineage"]  # the chain stays short
    out = str(tmp_path / "eval.json")
    assert main(["eval", "--config", "configs/eval/debug.yaml", f"checkpoint={frun}", f"output={out}",
                 f"test.manifest={shards}", "train=null", "actors=0"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "pretrained from:" in printed and digest[:16] in printed
    with open(out) as f:
        assert json.load(f)["lineage"] == lin
