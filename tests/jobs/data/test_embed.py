"""``vmae embed``: per-clip losses against one-clip forward passes, embeddings against a direct forward pass,
provenance in the metadata, resume (only missing shards are embedded), and the Ray actor pool."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from jobs.cli import main
from jobs.data.embed import (
    EmbedConfig,
    EmbedProbe,
    LearnabilitySection,
    clip_losses,
    embeddings_url,
    fixed_mask,
    run_embed,
)
from jobs.eval.features import pool_features
from model import VideoMAE, get_config, save_checkpoint
from pipeline.curation.synth import DefectFractions, SynthConfig, synthesize
from pipeline.ingest import manifest
from pipeline.loader.decode import iter_shard
from pipeline.loader.views import ViewSpec, video_views
from tests.jobs.data.test_curate import build_shard_set

SYNTH = SynthConfig(
    seed=5, domains=("textures", "shapes"), classes=("right", "up"), videos_per_class=3, sizes=((64, 64),),
    frames=(16,), fps=(15.0,), workers=1, defects=DefectFractions(static=0.125, duplicate=0.125, blur=0.0,
    near_duplicate=0.0, black=0.0, dark=0.0),
)  # fmt: skip
LOCAL = EmbedConfig(actors=0, batch_size=4)


def _model(seed: int = 0) -> VideoMAE:
    torch.manual_seed(seed)
    return VideoMAE(get_config("tiny")).eval()


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    synth = synthesize(SYNTH, str(root / "raw")).to_pandas()
    manifest_url = build_shard_set(str(root / "raw"), synth, str(root / "shards"), per_shard=5)
    ckpt = save_checkpoint(_model(), str(root / "ckpt"))
    return manifest_url, ckpt, root


def test_clip_losses_match_one_clip_forward_passes():
    model = _model()
    video = torch.randn(3, 3, 4, 32, 32)
    video[2] = 0.5  # a flat clip: every normalised tubelet is ~0, so the mean predictor scores ~0
    mask = fixed_mask(model, LearnabilitySection(mask_seed=3))
    assert mask.sum() == model.cfg.clip_spec().num_masked
    assert torch.equal(mask, fixed_mask(model, LearnabilitySection(mask_seed=3)))  # fixed by the seed
    with torch.no_grad():
        loss, base = clip_losses(model, video, mask)
        one = [model(video[i : i + 1], mask[None])[0] for i in range(3)]
        target = model.target(video)[:, mask]
    assert torch.allclose(loss, torch.stack(one), rtol=1e-5, atol=1e-6)
    assert torch.allclose(base[:2], target[:2].pow(2).mean(dim=(1, 2)), atol=1e-5)
    assert base[2] < 0.01  # not exactly 0: float rounding of a flat tubelet, divided by norm_pix_eps
    assert 0.9 < base[0] < 1.0  # per-tubelet normalised noise: variance (K-1)/K of the mean predictor


def test_embed_job_in_process_matches_a_direct_forward_pass_and_resumes(shard_set, tmp_path):
    manifest_url, ckpt, _ = shard_set
    out = str(tmp_path / "cur")
    stats = run_embed(ckpt, manifest_url, out, LOCAL)
    m = manifest.read_manifest(manifest_url)
    table = manifest.read_table(embeddings_url(out))
    df = table.to_pandas().set_index("key")
    assert df.index.tolist() == [k for s in m.shards for k in s.keys]
    assert stats["shards_embedded"] == len(m.shards) and stats["errors"] == 1  # the garbage sample
    assert df.loc["zz_garbage"].error and df.loc["zz_garbage"].cluster == -1
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    with open(m.url, "rb") as f:
        assert meta["manifest_sha256"] == hashlib.sha256(f.read()).hexdigest()
    ckpt_meta = json.loads(meta["checkpoint"])
    assert (ckpt_meta["format"], ckpt_meta["kind"]) == ("vmae", "pretrain") and ckpt_meta["url"].endswith(
        "ckpt"
    )

    # one clip by hand: decode its views, run the model, compare
    model = _model()
    views = ViewSpec(num_frames=4, input_size=32, sampling_rate=4)
    sample = next(iter_shard(m.shard_url(m.shards[0]), want=lambda _: True))
    video = video_views(sample["mp4"], views)
    with torch.no_grad():
        want = pool_features(model, video).mean(dim=0)
        loss, base = clip_losses(model, video, fixed_mask(model, LearnabilitySection()))
    row = df.loc[sample["__key__"]]
    assert np.allclose(row.vector, want.numpy(), atol=1e-5)
    assert row.recon_loss == pytest.approx(float(loss.mean()), rel=1e-5)
    assert row.recon_baseline == pytest.approx(float(base.mean()), rel=1e-5)

    again = run_embed(ckpt, manifest_url, out, LOCAL)
    assert again["shards_embedded"] == 0 and again["shards_reused"] == len(m.shards)
    parts = sorted((tmp_path / "cur" / "_embed_parts").rglob("*.parquet"))
    assert len(parts) == len(m.shards)
    os.unlink(parts[1])  # a crash lost one shard's part: only that shard is embedded again
    resumed = run_embed(ckpt, manifest_url, out, LOCAL)
    assert resumed["shards_embedded"] == 1
    after = manifest.read_table(embeddings_url(out)).to_pandas().set_index("key")
    assert after.drop(columns="vector").equals(df.drop(columns="vector"))
    ok = df.error == ""
    assert np.allclose(np.stack(after.vector[ok]), np.stack(df.vector[ok]))


def test_another_checkpoint_or_mask_does_not_reuse_parts(shard_set, tmp_path):
    manifest_url, _, root = shard_set
    other = save_checkpoint(_model(seed=1), str(tmp_path / "other"))
    out = str(tmp_path / "cur")
    run_embed(other, manifest_url, out, LOCAL)
    cfg = EmbedConfig(actors=0, learnability=LearnabilitySection(mask_seed=1))
    assert run_embed(other, manifest_url, out, cfg)["shards_embedded"] == len(
        manifest.read_manifest(manifest_url).shards
    )


def test_embed_cli_and_bad_input(shard_set, tmp_path, capsys):
    manifest_url, ckpt, _ = shard_set
    out = str(tmp_path / "e.parquet")
    assert main(["embed", "--checkpoint", ckpt, "--shards", manifest_url, "--output", out, "actors=0"]) == 0
    assert os.path.exists(out) and '"clips": 13' in capsys.readouterr().out
    assert main(["embed", "--checkpoint", ckpt, "--shards", manifest_url, "device=tpu"]) == 2
    assert "device must be one of" in capsys.readouterr().err
    with pytest.raises(ValueError, match="learnability.mask_type"):
        LearnabilitySection(mask_type="block")
    with pytest.raises(ValueError, match="learnability.mask_type 'motion' follows each clip's own motion"):
        LearnabilitySection(mask_type="motion")  # one fixed mask cannot follow every clip's motion
    motion = VideoMAE(get_config("tiny", mask_type="motion"))
    with pytest.raises(ValueError, match="the checkpoint's mask_type 'motion' follows"):
        fixed_mask(motion, LearnabilitySection())  # null: the checkpoint's type, refused as well
    assert torch.equal(
        fixed_mask(motion, LearnabilitySection(mask_type="tube")), fixed_mask(_model(), LearnabilitySection())
    )


def test_probe_without_a_mask_is_the_plain_embedding():
    model = _model()
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(
            EmbedProbe(model, "mean", None).forward_features(video), model.forward_features(video)
        )


@pytest.mark.slow
def test_actor_pool_matches_in_process(shard_set, ray_cluster, tmp_path):
    manifest_url, ckpt, _ = shard_set
    local = run_embed(ckpt, manifest_url, str(tmp_path / "a"), LOCAL)
    pooled = run_embed(
        ckpt, manifest_url, str(tmp_path / "b"), EmbedConfig(actors=2, batch_size=4, device="cpu")
    )
    a = manifest.read_table(embeddings_url(str(tmp_path / "a"))).to_pandas()
    b = manifest.read_table(embeddings_url(str(tmp_path / "b"))).to_pandas()
    assert local["clips"] == pooled["clips"] and (a.key == b.key).all()
    ok = a.error == ""
    assert np.allclose(np.stack(a.vector[ok]), np.stack(b.vector[ok]), atol=1e-5)
    assert np.allclose(a.recon_loss[ok], b.recon_loss[ok], rtol=1e-5)
