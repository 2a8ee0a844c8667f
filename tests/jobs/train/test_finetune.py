"""Finetuning recipe pieces against independent computations, and an end-to-end debug run on a local 2-CPU Ray
cluster (tiny model, 32 px, 4 frames) that must beat chance clearly on held-out videos after a stop + resume."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from timm.data import Mixup

from jobs.config import load_config
from jobs.train import checkpointing as ckpt
from jobs.train.config import AugmentSection, FinetuneConfig
from jobs.train.finetune import (
    FinetuneTask,
    build_finetune_optimizer,
    check_labels,
    init_classifier,
    make_criterion,
    mix_clips,
)
from jobs.train.optim import OptimConfig, SampleCosineSchedule
from model import VideoMAE, VideoMAEClassifier, get_config, save_checkpoint
from model.checkpoint import official_state_dict
from tests.pipeline import shardset_helpers

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
DEBUG = os.path.join(ROOT, "configs", "finetune", "debug.yaml")
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [140, 140, 140]], np.float32)


def _cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, DEBUG, ["loader.manifest=unused/manifest.json", *overrides])


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "configs", "finetune"))))
def test_every_finetune_yaml_loads(name):
    cfg = load_config(FinetuneConfig, os.path.join(ROOT, "configs", "finetune", name))
    spec = FinetuneTask(cfg).clip_spec()  # whole clips of the model's geometry
    model = cfg.model.build()
    assert (spec.mask_type, spec.num_masked) == ("none", 0) and cfg.num_classes >= 2
    assert (spec.num_frames, spec.input_size) == (model.num_frames, model.img_size)


def test_config_rejects_bad_input():
    with pytest.raises(
        ValueError, match=r"override 'loader.mask_type=tube': loader has no key 'mask_type'"
    ):  # no masks when finetuning
        _cfg("loader.mask_type=tube")
    with pytest.raises(ValueError, match="batch_size must be even"):
        _cfg("loader.batch_size=3", "loader.num_sample=1")
    with pytest.raises(
        ValueError, match=r"override 'loader.num_frames=8': loader has no key 'num_frames'"
    ):  # the model's, once
        _cfg("loader.num_frames=8")
    with pytest.raises(ValueError, match="layer_decay"):
        _cfg("layer_decay=0")
    with pytest.raises(ValueError, match="'ddp' for finetuning"):
        _cfg("parallel.strategy=fsdp")


@pytest.mark.parametrize("depth", [2, 12])
def test_layer_decay_groups_follow_the_official_numbering(depth):
    """timm's groups over the classifier's group_matcher against BEiT/VideoMAE's numbering, written out:
    embedding 0, block i -> i + 1, fc_norm/head -> depth + 1; lr_scale = decay ** (depth + 1 - layer)."""
    cfg = get_config("tiny", encoder_depth=depth)
    model = VideoMAEClassifier(cfg, 4)
    decay = 0.5
    opt = build_finetune_optimizer(
        model, OptimConfig(no_weight_decay=("*q_bias",)), layer_decay=decay, lr=1.0
    )
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        layer = (
            0 if "patch_embed" in name else (int(name.split(".")[2]) + 1 if ".blocks." in name else depth + 1)
        )
        assert g["lr_scale"] == pytest.approx(decay ** (depth + 1 - layer)), name
        assert g["weight_decay"] == (0.0 if p.ndim == 1 or name.endswith("q_bias") else 0.05), name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    SampleCosineSchedule(opt, peak_lr=2.0, warmup_samples=0, total_samples=10).step(0)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx(
        sorted({2.0 * decay**k for k in range(depth + 2)})
    )


def test_cutmix_cuts_the_same_box_from_every_frame_and_channel():
    torch.manual_seed(0)
    video = torch.arange(4, dtype=torch.float32)[:, None, None, None, None].expand(4, 3, 4, 16, 16).clone()
    labels = torch.tensor([0, 1, 2, 3])
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=4)
    mixed, target = mix_clips(mixup, video, labels)
    assert mixed.shape == video.shape
    for b in range(4):
        from_partner = mixed[b] == float(3 - b)  # batch mode pairs b with B-1-b (flip)
        box = from_partner[0, 0]
        assert (from_partner == box).all(), "the box must be identical in every channel and frame"
        lam = 1.0 - box.float().mean().item()  # area kept from the sample itself
        assert target[b, b] == pytest.approx(lam, abs=1e-6) and target[b, 3 - b] == pytest.approx(
            1 - lam, abs=1e-6
        )
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=4)
    mixed, target = mix_clips(mixup, video, labels)
    lam = target[0, 0].item()
    assert torch.allclose(mixed[0], lam * video[0] + (1 - lam) * video[3])


def test_criterion_matches_the_recipe():
    """Per-clip losses whose mean is timm's (the official script's) loss for each recipe."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    smooth = make_criterion(AugmentSection(mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.1))
    soft = torch.full((6, 4), 0.1 / 4).scatter_(1, labels[:, None], 0.9 + 0.1 / 4)
    assert smooth(logits, labels).shape == (6,)
    assert torch.allclose(smooth(logits, labels), -(soft * logits.log_softmax(1)).sum(1), atol=1e-5)
    assert smooth(logits, labels).mean().item() == pytest.approx(
        LabelSmoothingCrossEntropy(0.1)(logits, labels).item(), rel=1e-5
    )
    plain = make_criterion(AugmentSection(mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.0))
    assert torch.allclose(plain(logits, labels), -logits.log_softmax(1)[torch.arange(6), labels], atol=1e-5)
    mixed = make_criterion(
        AugmentSection(mixup_alpha=0.8, label_smoothing=0.1)
    )  # smoothing is in the targets
    assert mixed(logits, soft).mean().item() == pytest.approx(
        SoftTargetCrossEntropy()(logits, soft).item(), rel=1e-5
    )


def test_labels_are_checked_on_real_samples_only():
    label, valid = torch.tensor([0, 1, -1, 3, 2]), torch.tensor([True, True, False, True, True])
    check_labels(label, valid, num_classes=4, keys=list("abcde"))  # the -1 is a stand-in's
    with pytest.raises(ValueError, match="'d' has label 3"):
        check_labels(label, valid, num_classes=3, keys=list("abcde"))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("mixing", [False, True])
def test_stand_ins_keep_the_batch_shape_and_weigh_nothing(mixing):
    """A micro-batch with stand-ins trains on the loader's full [B] (one shape for a compiled model) and its
    loss is that of the real clips alone: the mean CE over valid rows (no mixup), and with mixup a gradient
    equal to a batch where the stand-ins' loss is dropped by hand."""
    over = [] if mixing else ["augment.mixup_alpha=0", "augment.cutmix_alpha=0", "augment.label_smoothing=0"]
    task = FinetuneTask(_cfg(*over))
    torch.manual_seed(0)
    model = task.build_model(resuming=True)
    with (
        torch.no_grad()
    ):  # logits far from uniform: a wrong target (or weight) moves the loss well past rel 1e-5
        model.head.weight.normal_(0.0, 1.0)
    b = task.cfg.loader.batch_size
    video = torch.randn(b, 3, task.model_cfg.num_frames, task.model_cfg.img_size, task.model_cfg.img_size)
    valid = torch.ones(b, dtype=torch.bool)
    valid[1] = False
    label = torch.arange(b) % task.cfg.num_classes
    batch = {"video": video, "label": label, "valid": valid, "key": [f"k{i}" for i in range(b)]}
    shapes = []
    handle = model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    torch.manual_seed(5)
    loss, stats = task.forward(model.train(), batch, torch.device("cpu"))
    handle.remove()
    assert shapes == [tuple(video.shape)] and stats["seen"] == b - 1
    if not mixing:
        model.eval()  # drop path / head dropout off for an exact comparison
        torch.manual_seed(5)
        loss, _ = task.forward(model, batch, torch.device("cpu"))
        ref = torch.nn.functional.cross_entropy(model(video[valid]), label[valid])
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    else:
        model.eval()
        _seed_all(5)  # timm's Mixup draws lambda and the box with numpy / random, not torch
        loss, _ = task.forward(model, batch, torch.device("cpu"))
        _seed_all(5)
        mixed, target = mix_clips(task.mixup, video.clone(), label)
        per = -(target * model(mixed).log_softmax(1)).sum(1)
        assert loss.item() == pytest.approx(per[valid].mean().item(), rel=1e-5)
    every = {**batch, "valid": torch.zeros(b, dtype=torch.bool), "label": torch.full((b,), -1)}
    loss, stats = task.forward(model, every, torch.device("cpu"))  # all stand-ins: zero loss, still a graph
    assert loss.item() == 0.0 and loss.requires_grad and stats["seen"] == 0


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(1)
    model = VideoMAE(get_config("tiny"))
    root = tmp_path_factory.mktemp("pretrained")
    save_checkpoint(model, str(root / "vmae"))
    torch.save({"model": official_state_dict(model)}, root / "official.pth")
    # a pretraining run stopped at step 4: <run>/step_00000004 holds the train state, no final export yet
    step = root / "run" / "step_00000004"
    opt = torch.optim.AdamW(model.parameters())
    state = {"model": model, "optimizer": opt, "schedule": SampleCosineSchedule(opt, peak_lr=1.0,
             warmup_samples=0, total_samples=8), "scaler": torch.amp.GradScaler("cpu", enabled=False),
             "progress": ckpt.TrainProgress(step=4), "loader": _NoLoader(), "rng": ckpt.RNGState()}  # fmt: skip
    ckpt.save_train_state(str(step), state, rank=0)
    return model, root


class _NoLoader:
    def state_dict(self):
        return {}


@pytest.mark.parametrize("source", ["vmae", "official.pth", "run", "run/step_00000004"])
def test_init_classifier_copies_the_pretrained_encoder(pretrained, source):
    model, root = pretrained
    clf, info = init_classifier(_cfg(f"pretrained={root / source}"))
    want = model.state_dict()
    for k, v in clf.state_dict().items():
        if k.startswith("encoder."):
            assert torch.equal(v, want[k]), k
    assert "encoder_to_decoder.weight" in info["ignored"] and info["kind"] == "pretrain"


def test_init_classifier_rejects_a_different_architecture(pretrained):
    _, root = pretrained
    with pytest.raises(ValueError, match="does not fit model"):
        init_classifier(_cfg(f"pretrained={root / 'vmae'}", "model.overrides.encoder_width=32"))
    with pytest.raises(ValueError, match="does not exist"):
        init_classifier(_cfg(f"pretrained={root / 'nothing'}"))


def class_frames(i: int, frames: int, width: int, height: int, pattern: str) -> np.ndarray:
    """Video ``i`` of class ``i % 4``: a class colour, per-video brightness, noise and a moving bar."""
    rng = np.random.default_rng(i)
    x = COLOURS[i % 4] * rng.uniform(0.7, 1.2) + rng.normal(0, 25, (frames, height, width, 3))
    for t in range(frames):
        col = (3 * t + 7 * i) % width
        x[t, :, col : col + 6] += 50
    return np.clip(x, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def class_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("class_shards")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shardset_helpers, "video_frames", class_frames)
        shardset_helpers.make_shard_set(
            str(root / "train"), 48, 4, frames=12, width=64, height=48, num_classes=4
        )
        shardset_helpers.make_shard_set(
            str(root / "val"), 20, 2, frames=12, width=64, height=48, num_classes=4, prefix="val"
        )
    return str(root / "train" / "manifest.json"), str(root / "val" / "manifest.json")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_debug_finetune_stops_resumes_and_beats_chance(class_shards, pretrained, tmp_path):
    import ray

    from jobs.eval.eval import EvalConfig, SplitSection, evaluate
    from jobs.train.checkpointing import load_any_checkpoint
    from jobs.train.finetune import fit
    from jobs.train.metrics import read_metrics

    train, val = class_shards
    _, root = pretrained
    args = [f"storage_path={tmp_path}", f"loader.manifest={train}", f"pretrained={root / 'vmae'}"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = fit(load_config(FinetuneConfig, DEBUG, [*args, "stop_at_step=12"]))
        assert first.metrics["step"] == 12
        assert not os.path.exists(tmp_path / "finetune-debug" / "final"), "a stopped run is not final"
        with pytest.raises(ValueError, match="already exists"):
            fit(load_config(FinetuneConfig, DEBUG, args))
        result = fit(load_config(FinetuneConfig, DEBUG, args), resume=True)
    finally:
        ray.shutdown()
    assert result.metrics["step"] == 24 and result.metrics["samples_seen"] == 24 * 8  # 8 videos per step
    recs = read_metrics(str(tmp_path / "finetune-debug" / "logs" / "metrics.jsonl"))
    assert list(recs) == [4, 8, 12, 16, 20, 24]
    assert recs[24]["loss"] < recs[4]["loss"], recs
    assert all(0 <= r["data_wait_frac"] <= 1 and 0 <= r["train_top1"] <= 1 for r in recs.values())
    final = str(tmp_path / "finetune-debug" / "final")
    meta = json.loads(open(os.path.join(final, "vmae.json")).read())
    assert meta["kind"] == "classifier" and meta["num_classes"] == 4
    from_run, run_meta = load_any_checkpoint(str(tmp_path / "finetune-debug"))  # the run: its export
    assert run_meta["url"] == final and isinstance(from_run, VideoMAEClassifier)
    last_step, step_meta = load_any_checkpoint(str(tmp_path / "finetune-debug" / "step_00000024"))
    assert step_meta["url"].endswith("step_00000024")
    for k, v in last_step.state_dict().items():  # the export is the last step's weights
        assert torch.equal(v, from_run.state_dict()[k]), k
    report = evaluate(
        EvalConfig(
            checkpoint=final,
            output=str(tmp_path / "eval.json"),
            test=SplitSection(manifest=val),
            view_sets=((2, 3),),
            sampling_rate=2,
            actors=0,
        )
    )
    assert report["samples"]["test"]["videos"] == 20
    assert report["multiview"]["2x3"]["top1"] >= 0.6, report  # chance is 0.25
