"""``vmae eval``: multi-view aggregation against a by-hand computation (model run per view, softmax averaged in
a Python loop), the probe/kNN report through the Ray actor path and the CLI, and every eval YAML loading."""

from __future__ import annotations

import json
import os

import pytest
import torch

from jobs.cli import main
from jobs.config import load_config
from jobs.eval.eval import EvalConfig, KnnSection, evaluate
from jobs.eval.features import FeaturesSection, SplitSection, extract_features, pool_features
from jobs.eval.metrics import ProbeConfig, knn_predict, linear_probe, topk_accuracy
from jobs.train.checkpointing import load_any_checkpoint
from model import VideoMAE, VideoMAEClassifier, get_config, save_checkpoint
from model.videomae import time_pool
from pipeline import storage
from pipeline.ingest.encode import decode_all
from pipeline.loader.views import ViewSpec, clip_frame_indices, views_from_frames
from tests.pipeline.shardset_helpers import make_shard_set

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
EVAL_DIR = os.path.join(ROOT, "configs", "eval")


@pytest.mark.parametrize("name", sorted(os.listdir(EVAL_DIR)))
def test_every_eval_yaml_loads(name):
    cfg = load_config(EvalConfig, os.path.join(EVAL_DIR, name))
    assert cfg.view_sets and cfg.test.manifest


def test_config_rejects_bad_input():
    with pytest.raises(ValueError, match="clips, crops"):
        EvalConfig(checkpoint="c", output="o", test=SplitSection(manifest="m"), view_sets=((2, 0),))
    with pytest.raises(ValueError, match="override 'views=3': EvalConfig has no key 'views'"):
        load_config(EvalConfig, os.path.join(EVAL_DIR, "debug.yaml"), ["views=3"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_shards")
    kw = dict(frames=20, width=64, height=48, pattern="moving", num_classes=5)
    make_shard_set(str(root / "test"), 10, 2, **kw)
    make_shard_set(str(root / "train"), 15, 3, prefix="train", **kw)
    return str(root / "train" / "manifest.json"), str(root / "test" / "manifest.json")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(3)
    model = VideoMAEClassifier(get_config("tiny"), 5).eval()
    with torch.no_grad():
        model.head.weight.mul_(3000.0)  # default head init is ~0: make predictions differ between videos
    url = str(tmp_path_factory.mktemp("clf") / "final")
    save_checkpoint(model, url)
    return model, url


def _by_hand(model: VideoMAEClassifier, manifest: str, clips: int, crops: int) -> dict[str, torch.Tensor]:
    """Mean softmax over views per video, computed view by view from the decoded shard videos."""
    import webdataset as wds

    spec = ViewSpec(num_frames=4, sampling_rate=2, input_size=32, clips=clips, crops=crops)
    root = manifest.rsplit("/", 1)[0]
    out = {}
    for shard in sorted(f for f in os.listdir(root) if f.endswith(".tar")):
        for sample in wds.WebDataset(os.path.join(root, shard), shardshuffle=False):
            frames = decode_all(sample["mp4"])
            views = views_from_frames(frames, clip_frame_indices(len(frames), spec), spec)
            probs = []
            for v in range(clips * crops):
                with torch.no_grad():
                    probs.append(model(views[v : v + 1])[0].softmax(0))
            out[sample["__key__"]] = (sum(probs) / len(probs), int(sample["cls"]))
    return out


def test_multiview_accuracy_matches_per_view_softmax_by_hand(shards, classifier, tmp_path):
    model, url = classifier
    _, test = shards
    cfg = EvalConfig(
        checkpoint=url,
        output=str(tmp_path / "report.json"),
        test=SplitSection(manifest=test),
        view_sets=((2, 3), (5, 3)),
        sampling_rate=2,
        batch_size=7,  # batches cut across videos
        actors=0,
    )
    report = evaluate(cfg)
    assert json.loads(open(tmp_path / "report.json").read()) == json.loads(json.dumps(report))
    assert report["samples"]["test"] == {"videos": 10, "labelled": 10, "skipped": 0}
    for clips, crops in ((2, 3), (5, 3)):
        hand = _by_hand(model, test, clips, crops)
        keys = sorted(hand)
        probs = torch.stack([hand[k][0] for k in keys])
        labels = torch.tensor([hand[k][1] for k in keys])
        assert len({int(p.argmax()) for p in probs}) > 1, "the test needs predictions that differ"
        top1 = sum(int(probs[i].argmax()) == labels[i] for i in range(len(keys))) / len(keys)
        top5 = sum(labels[i] in probs[i].topk(5).indices for i in range(len(keys))) / len(keys)
        got = report["multiview"][f"{clips}x{crops}"]
        assert got["top1"] == pytest.approx(top1) and got["top5"] == pytest.approx(top5)
        assert got["views"] == clips * crops and got["videos"] == 10
        feats, flabels, fkeys = extract_features(
            model,
            test,
            None,
            ViewSpec(num_frames=4, sampling_rate=2, input_size=32, clips=clips, crops=crops),
            actors=0,
        )
        assert (
            fkeys == keys and flabels.tolist() == labels.tolist() and feats.shape == (10, clips * crops, 64)
        )
        pipeline_probs = model.head(feats).softmax(-1).mean(1)
        assert torch.allclose(pipeline_probs, probs, atol=1e-5)
    assert "knn" not in report and "linear_probe" not in report  # no train split given


def _time_pool_by_loop(x_BLD: torch.Tensor, t: int) -> torch.Tensor:
    """Per temporal slice: mean of its tokens, standardised by hand (biased variance, eps 1e-6)."""
    s = x_BLD.shape[1] // t
    out = []
    for i in range(t):
        m = x_BLD[:, i * s : (i + 1) * s].mean(1)
        mu, var = m.mean(-1, keepdim=True), m.var(-1, unbiased=False, keepdim=True)
        out.append((m - mu) / torch.sqrt(var + 1e-6))
    return torch.cat(out, dim=-1)


def test_time_pool_matches_a_loop_over_temporal_slices():
    torch.manual_seed(0)
    x = torch.randn(3, 4 * 6, 5) * 3 + 1
    got = time_pool(x, 4)
    assert got.shape == (3, 4 * 5)
    assert torch.allclose(got, _time_pool_by_loop(x, 4), atol=1e-5)
    # time order is kept: swapping two slices swaps the feature blocks; the all-token mean cannot tell
    swapped = torch.cat([x[:, 6:12], x[:, :6], x[:, 12:]], dim=1)
    assert torch.allclose(time_pool(swapped, 4)[:, :5], got[:, 5:10], atol=1e-6)
    assert not torch.allclose(time_pool(swapped, 4), got)
    with pytest.raises(ValueError, match="divisible by 5"):
        time_pool(x, 5)
    with pytest.raises(ValueError, match="features.pool"):
        FeaturesSection(pool="max")
    with pytest.raises(ValueError, match="pool must be one of"):
        pool_features(VideoMAE(get_config("tiny")), torch.zeros(1, 3, 4, 32, 32), "max")


def test_time_pooled_probe_features_match_the_encoder_tokens_by_hand(shards, classifier, tmp_path):
    model, url = classifier
    train, test = shards
    cfg = EvalConfig(
        checkpoint=url,
        output=str(tmp_path / "report.json"),
        train=SplitSection(manifest=train),
        test=SplitSection(manifest=test),
        view_sets=((2, 3),),
        feature_views=(2, 3),  # the probe views equal a classifier view set: must not reuse its mean features
        sampling_rate=2,
        actors=0,
        knn=KnnSection(k=3),
        features=FeaturesSection(pool="time"),
    )
    report = evaluate(cfg)
    t_slices, d = model.cfg.grid[0], model.cfg.encoder_width
    assert report["feature_dim"] == t_slices * d and report["knn"]["pool"] == "time"
    hand = _by_hand(model, test, 2, 3)  # the classifier head still sees mean features
    top1 = sum(int(p.argmax()) == y for p, y in hand.values()) / len(hand)
    assert report["multiview"]["2x3"]["top1"] == pytest.approx(top1)

    spec = ViewSpec(num_frames=4, sampling_rate=2, input_size=32, clips=2, crops=3)
    feats, labels, keys = extract_features(model, train, None, spec, actors=0, pool="time")
    assert feats.shape == (15, 6, t_slices * d)
    import webdataset as wds

    root = train.rsplit("/", 1)[0]
    by_key = {}
    for shard in sorted(f for f in os.listdir(root) if f.endswith(".tar")):
        for sample in wds.WebDataset(os.path.join(root, shard), shardshuffle=False):
            frames = decode_all(sample["mp4"])
            views = views_from_frames(frames, clip_frame_indices(len(frames), spec), spec)
            with torch.no_grad():
                by_key[sample["__key__"]] = _time_pool_by_loop(model.forward_tokens(views), t_slices)
    assert keys == sorted(by_key)
    assert torch.allclose(feats, torch.stack([by_key[k] for k in keys]), atol=1e-4)

    te_f, te_y, _ = extract_features(model, test, None, spec, actors=0, pool="time")
    knn = knn_predict(feats.mean(1), labels, te_f.mean(1), num_classes=5, k=3, temperature=0.07)
    assert report["knn"]["top1"] == pytest.approx(topk_accuracy(knn, te_y)["top1"])


@pytest.mark.slow
@pytest.mark.s3
def test_cli_probe_and_knn_report_on_s3_via_ray_actors(shards, ray_cluster, s3_bucket, tmp_path):
    train, test = shards
    torch.manual_seed(0)
    pretrained = VideoMAE(get_config("tiny"))
    ckpt_url = f"{s3_bucket}/pretrained"
    save_checkpoint(pretrained, ckpt_url)
    out = f"{s3_bucket}/eval/report.json"
    rc = main(
        ["eval", "--config", os.path.join(EVAL_DIR, "debug.yaml"), f"checkpoint={ckpt_url}", f"output={out}",
         f"train.manifest={train}", f"test.manifest={test}", "probe.epochs=50"]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(storage.read_bytes(out))
    assert report["checkpoint"] == ckpt_url and report["checkpoint_meta"]["kind"] == "pretrain"
    assert report["multiview"] == {}  # a pretrained encoder has no classifier head
    assert report["samples"] == {
        "train": {"videos": 15, "labelled": 15, "skipped": 0},
        "test": {"videos": 10, "labelled": 10, "skipped": 0},
    }
    assert report["num_classes"] == 5 and report["feature_dim"] == 64
    for name in ("knn", "linear_probe"):
        assert 0.0 <= report[name]["top1"] <= report[name]["top5"] <= 1.0
    assert report["config"]["actors"] == 2 and report["knn"]["k"] == 5
    # independent: in-process features of the same checkpoint, kNN and probe computed here
    spec = ViewSpec(num_frames=4, sampling_rate=2, input_size=32)
    local = load_any_checkpoint(ckpt_url)[0]
    xtr, ytr, _ = extract_features(local, train, None, spec, actors=0)
    xte, yte, _ = extract_features(local, test, None, spec, actors=0)
    knn = knn_predict(xtr.mean(1), ytr, xte.mean(1), num_classes=5, k=5, temperature=0.07)
    probe = linear_probe(xtr.mean(1), ytr, xte.mean(1), num_classes=5, cfg=ProbeConfig(epochs=50, lr=0.01))
    assert report["knn"]["top1"] == pytest.approx(topk_accuracy(knn, yte)["top1"])
    assert report["linear_probe"]["top1"] == pytest.approx(topk_accuracy(probe, yte)["top1"])
    assert report["linear_probe"]["top5"] == pytest.approx(topk_accuracy(probe, yte)["top5"])


def test_unusable_samples_are_counted_not_fatal(tmp_path, classifier):
    model, url = classifier
    make_shard_set(str(tmp_path / "bad"), 6, 2, frames=12, bad={1: "garbage", 4: "absent"}, num_classes=5)
    feats, labels, keys = extract_features(
        model,
        str(tmp_path / "bad" / "manifest.json"),
        None,
        ViewSpec(num_frames=4, sampling_rate=2, input_size=32),
        actors=0,
    )
    assert keys == ["vid00000", "vid00002", "vid00003", "vid00005"] and feats.shape == (4, 1, 64)
    with pytest.raises(ValueError, match="does not exist"):
        load_any_checkpoint(str(tmp_path / "missing"))
