import glob
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from jobs.cli import main
from jobs.config import load_config
from jobs.data.curate import CurateConfig, add_dup_groups, curation_url, run_curation, summarize
from jobs.ray_utils import RayConfig
from pipeline.curation.quality import CURATION_SCHEMA, QualityConfig
from pipeline.curation.synth import DEFECTS, DefectFractions, SynthConfig, synthesize
from pipeline.ingest import manifest
from pipeline.ingest.shards import ShardConfig, ShardSample, write_shard
from pipeline.loader.decode import AUTO_ORDER

SYNTH = SynthConfig(
    seed=3, domains=("textures", "shapes", "gradients"), classes=("right", "up", "rotate_cw", "zoom_out"),
    videos_per_class=2, sizes=((64, 64), (96, 64)), frames=(16,), fps=(15.0,), workers=1,
    defects=DefectFractions(**{d: 1 / 24 for d in DEFECTS}),
)  # fmt: skip


def _key(path: str) -> str:
    return path.removesuffix(".mp4").replace("/", "_")


def build_shard_set(synth_dir: str, clips: pd.DataFrame, out: str, *, per_shard: int = 7) -> str:
    """Pack synthesized ``clips`` into a shard set (shards, index.parquet, manifest.json last) as the shard
    job does, without transcoding, plus one undecodable sample. Returns the manifest URL."""
    samples = []
    for r in clips.to_dict("records"):
        url = f"{synth_dir}/{r['path']}"
        meta = {k: r[k] for k in ("fps", "frames", "width", "height", "label", "domain")} | {
            "source": r["path"]
        }
        size = os.path.getsize(url)
        samples.append(
            ShardSample(key=_key(r["path"]), mp4_url=url, mp4_size=size, meta=meta, label=r["label"])
        )
    with open(f"{out}-garbage.mp4", "wb") as f:
        f.write(b"\x00not a video" * 50)
    meta = {"domain": "shapes"}
    samples.append(
        ShardSample(key="zz_garbage", mp4_url=f"{out}-garbage.mp4", mp4_size=600, meta=meta, label=0)
    )
    infos, index = [], []
    for i in range(0, len(samples), per_shard):
        chunk = samples[i : i + per_shard]
        info, spans = write_shard(chunk, f"{out}/shard-{i // per_shard:06d}.tar", ShardConfig())
        infos.append(info)
        for s in chunk:
            row = {c: None for c in manifest.INDEX_COLUMNS}
            offset, size = spans[s.key]
            row.update(
                key=s.key, shard=info.name, offset=offset, size=size, label=s.label, domain=s.meta["domain"]
            )
            index.append(row)
    manifest.write_table_atomic(
        f"{out}/{manifest.INDEX_NAME}", pa.Table.from_pylist(index, manifest.INDEX_SCHEMA)
    )
    m = manifest.Manifest(
        shards=tuple(infos), num_samples=len(samples), config={}, code_version="test", created="now"
    )
    manifest.write_manifest(f"{out}/{manifest.MANIFEST_NAME}", m)
    return f"{out}/{manifest.MANIFEST_NAME}"


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    synth = synthesize(SYNTH, str(root / "raw")).to_pandas()
    return synth, build_shard_set(str(root / "raw"), synth, str(root / "shards")), root


@pytest.mark.slow
def test_curate_job_end_to_end(shard_set, tmp_path, capsys):
    synth, manifest_url, _ = shard_set
    out = str(tmp_path / "cur")
    assert (
        main(["curate", "--shards", manifest_url, "--output", out, "--config", "configs/curate/debug.yaml"])
        == 0
    )
    assert '"num_samples": 25' in capsys.readouterr().out
    table = manifest.read_table(curation_url(out))
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert (
        meta["source_manifest"] == manifest_url and json.loads(meta["config"])["quality"]["num_frames"] == 6
    )
    df = table.to_pandas()
    m = manifest.read_manifest(manifest_url)
    assert df.key.tolist() == [k for s in m.shards for k in s.keys]  # every sample, in shard order

    bad = df.set_index("key").loc["zz_garbage"]
    assert "undecodable" in bad.error and bad.quality_score == 0
    df = df[df.key != "zz_garbage"].set_index("key")
    truth = synth.assign(key=synth.path.map(_key)).set_index("key").loc[df.index]
    assert (df.error == "").all() and df.decoder.isin(AUTO_ORDER).all()  # never the whole-file fallback
    assert (df.label == truth.label).all() and (df.domain == truth.domain).all()
    assert (df.width == truth.width).all() and (df.height == truth.height).all() and (df.frames == 16).all()
    assert np.allclose(df.duration, 16 / 15)
    clean = truth.defect == ""
    assert df.is_static[truth.defect == "static"].all() and not df.is_static[clean].any()
    assert df.has_black[truth.defect == "black"].all() and not df.has_black[clean].any()
    assert df.is_dark[truth.defect == "dark"].all() and not df.is_dark[clean].any()
    assert df.has_cut[truth.defect == "cut"].all() and not df.has_cut[clean].any()
    for key in truth.index[truth.duplicate_of != ""]:
        assert df.dup_group[key] == df.dup_group[_key(truth.duplicate_of[key])]
    copies = truth.index[truth.duplicate_of != ""].tolist() + [_key(p) for p in truth.duplicate_of if p]
    assert (df.drop(index=copies).dup_group_size == 1).all()  # no false merges
    summary = json.loads(meta["summary"])
    assert summary["errors"] == 1 and summary["static"] >= 1 and summary["removable_duplicates"] == 2
    assert summary["with_cuts"] == int(df.has_cut.sum()) >= 1
    assert summary["missing_keys"] == 0 and set(summary["per_domain"]) == set(SYNTH.domains)

    sub_url = str(tmp_path / "clean.parquet")
    rule = ["--config", "configs/curate/subsets/clean.yaml"]
    assert main(["subset", "--curation", curation_url(out), "--output", sub_url, *rule]) == 0
    sub = manifest.read_subset(sub_url)
    chosen = truth.loc[list(sub.keys)]
    assert not set(chosen.defect) & {"static", "dark", "black"} and "zz_garbage" not in sub.keys
    assert chosen.groupby(df.dup_group[list(sub.keys)]).size().max() == 1
    assert sub.source_manifest == manifest_url


@pytest.mark.slow
def test_missing_shard_fails_the_job(shard_set, ray_cluster, tmp_path):
    _, manifest_url, root = shard_set
    broken = tmp_path / "broken"
    broken.mkdir()
    m = manifest.read_manifest(manifest_url)
    for s in m.shards[1:]:  # shard 0 is missing
        os.link(m.shard_url(s), broken / s.name)
    manifest.write_manifest(str(broken / "manifest.json"), m)
    with pytest.raises(Exception, match="cannot open shard"):
        run_curation(str(broken), str(tmp_path / "out"), CurateConfig(ray=RayConfig(max_in_flight=1)))
    assert not os.path.exists(tmp_path / "out" / "curation.parquet")


@pytest.mark.slow
def test_truncated_shard_samples_are_skipped_and_counted(shard_set, ray_cluster, tmp_path):
    """A tar cut in half: curation keeps what it could read, gives every undelivered sample of the manifest an
    ``unreadable`` error row (so subsets never select it), and finishes; the CLI says nothing went wrong."""
    _, manifest_url, _ = shard_set
    broken = tmp_path / "broken"
    broken.mkdir()
    m = manifest.read_manifest(manifest_url)
    for s in m.shards:
        os.link(m.shard_url(s), broken / s.name)
    victim = m.shards[0]
    data = (broken / victim.name).read_bytes()
    os.unlink(broken / victim.name)
    (broken / victim.name).write_bytes(data[: len(data) // 2])
    manifest.write_manifest(str(broken / "manifest.json"), m)
    out = tmp_path / "out"
    assert main(["curate", "--shards", str(broken), "--output", str(out), "ray.max_in_flight=1"]) == 0
    df = pd.read_parquet(curation_url(str(out)))
    assert set(df["key"]) >= set(victim.keys)  # every sample has a row
    lost = df[df["key"].isin(victim.keys) & df["error"].str.startswith("unreadable")]
    assert 1 <= len(lost) < len(victim.keys) + 1
    meta = json.loads(manifest.read_table(curation_url(str(out))).schema.metadata[b"summary"])
    assert meta["errors"] >= len(lost) and meta["missing_keys"] == 0


def test_add_dup_groups_and_summary():
    rows = [
        {"key": "a", "phash": [1, 2], "domain": "x", "quality_score": 0.5},
        {
            "key": "b",
            "phash": [1, None],
            "domain": "x",
            "quality_score": 0.7,
        },  # within 0 bits of a where valid
        {"key": "c", "phash": [-1, 2**62], "domain": "y", "quality_score": 0.1},
        {"key": "d", "phash": [None, None], "domain": "y", "quality_score": 0.0},  # all black: never grouped
        {"key": "e", "phash": [], "domain": "y", "quality_score": 0.0, "error": "BadSample: x"},
    ]
    base = {"error": "", "is_static": False, "is_dark": False, "has_black": False, "decoder": "decord"}
    table = add_dup_groups(pa.Table.from_pylist([{**base, **r} for r in rows], schema=CURATION_SCHEMA), 0)
    assert table.column("dup_group").to_pylist() == [0, 0, 2, 3, 4]
    assert table.column("dup_group_size").to_pylist() == [2, 2, 1, 1, 1]
    s = summarize(table)
    assert s["errors"] == 1 and s["dup_groups"] == 1 and s["removable_duplicates"] == 1
    assert s["per_domain"]["x"] == {"samples": 2, "mean_quality": 0.6}


def test_curation_url():
    assert curation_url("s3://b/set/cur.parquet") == "s3://b/set/cur.parquet"
    assert curation_url("s3://b/set/") == "s3://b/set/curation.parquet"


@pytest.mark.parametrize("path", sorted(glob.glob("configs/curate/*.yaml")))
def test_curate_yamls_load(path):
    cfg = load_config(CurateConfig, path)
    assert isinstance(cfg.quality, QualityConfig) and isinstance(cfg.ray, RayConfig)


def test_curate_config_validation():
    with pytest.raises(ValueError, match="ray.max_in_flight must be >= 0"):
        load_config(CurateConfig, "configs/curate/default.yaml", ["ray.max_in_flight=-1"])
    with pytest.raises(ValueError, match=r"override 'quality.num_frame=3': quality has no key 'num_frame'"):
        load_config(CurateConfig, None, ["quality.num_frame=3"])


def _curate_in_process(manifest_url: str, out_url: str) -> pa.Table:
    """The curation table as ``run_curation`` writes it, computed without Ray (one shard after another)."""
    from pipeline.curation.quality import curate_shard

    m = manifest.read_manifest(manifest_url)
    cfg = CurateConfig(quality=QualityConfig(num_frames=6))
    tables = [curate_shard(m.shard_url(s), cfg.quality, None, tuple(s.keys)) for s in m.shards]
    table = add_dup_groups(pa.concat_tables(tables), cfg.quality.hash_distance)
    meta = {b"source_manifest": m.url.encode(), b"summary": json.dumps(summarize(table)).encode()}
    manifest.write_table_atomic(out_url, table.replace_schema_metadata(meta))
    return table


def test_report_shows_metrics_clusters_and_worst_clips(shard_set, tmp_path, capsys):
    from PIL import Image

    from jobs.data.embed import EmbedConfig, run_embed
    from model import VideoMAE, get_config, save_checkpoint
    from pipeline.curation.semantic import SemanticConfig

    synth, manifest_url, _ = shard_set
    out = tmp_path / "cur"
    table = _curate_in_process(manifest_url, curation_url(str(out)))
    assert main(["curate", "--output", str(out), "--report-only"]) == 0
    text = (out / "report" / "report.md").read_text()
    assert "## Embedding clusters" not in text  # no embeddings yet: metrics and worst clips only
    for name in ("quality_score", "motion", "sharpness", "black_fraction"):
        assert f"| `{name}` |" in text
    ok = table.to_pandas().query("error == ''")
    assert f"| `sharpness` | variance of Laplacian (levels^2) | {ok.sharpness.min():.4g} |" in text

    torch_model = VideoMAE(get_config("tiny"))
    ckpt = save_checkpoint(torch_model, str(tmp_path / "ckpt"))
    run_embed(ckpt, manifest_url, str(out), EmbedConfig(actors=0, semantic=SemanticConfig(clusters=3)))
    assert main(["curate", "--output", str(out), "--report-only"]) == 0
    assert "report.md" in capsys.readouterr().out
    text = (out / "report" / "report.md").read_text()
    emb = manifest.read_table(str(out / "embeddings.parquet")).to_pandas().query("error == ''")
    for c, n in emb.cluster.value_counts().items():
        assert f"| {c} | {n} |" in text and (out / "report" / f"cluster_{c}.png").exists()
    pngs = sorted((out / "report").glob("*.png"))
    assert {"histograms.png", "worst_quality_score_low.png", "worst_recon_loss_high.png"} <= {
        p.name for p in pngs
    }
    for p in pngs:
        assert Image.open(p).size[0] > 100  # a real picture, not an empty figure
    assert main(["curate", "--output", str(tmp_path / "none"), "--report-only"]) == 2
    assert main(["curate", "--output", str(out)]) == 2  # curating needs --shards


def test_a_shard_cut_at_a_member_boundary_still_accounts_for_every_key(shard_set, tmp_path):
    """A tar cut exactly after one sample's last member reads as a clean, shorter stream (no error from the
    reader): every key the manifest lists that the shard did not deliver still gets an ``unreadable`` row."""
    import tarfile

    from pipeline.curation.quality import curate_shard

    _, manifest_url, _ = shard_set
    m = manifest.read_manifest(manifest_url)
    shard = m.shards[0]
    with tarfile.open(m.shard_url(shard)) as tar:
        members = tar.getmembers()
    first = members[0].name.split(".", 1)[0]
    last_of_first = max((t for t in members if t.name.split(".", 1)[0] == first), key=lambda t: t.offset)
    end = last_of_first.offset_data + -(-last_of_first.size // 512) * 512  # the next header starts here
    cut = tmp_path / shard.name
    cut.write_bytes(open(m.shard_url(shard), "rb").read()[:end])
    df = curate_shard(str(cut), QualityConfig(num_frames=4), keys=tuple(shard.keys)).to_pandas()
    assert sorted(df.key) == sorted(shard.keys)
    ok = df[df.error == ""]
    assert ok.key.tolist() == [first]
    assert (df[df.key != first].error == "unreadable: the shard ended before this sample").all()
