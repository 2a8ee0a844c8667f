"""Random erasing of the finetuning recipe (``augment.reprob/remode/recount``, ``jobs.train.finetune.erase_clips``)
against timm's ``RandomErasing`` with the same seeds and against the official VideoMAE loader's cube erasing,
re-stated here from its ``random_erasing.py`` (``cube=True``: per clip one probability draw and one box, filled
in every frame from ``T // recount`` on, each frame with its own fill); its place in ``FinetuneTask.forward``;
the config and the ViT-B recipe's official values."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
from timm.data.random_erasing import RandomErasing

from jobs.config import load_config
from jobs.train.config import AugmentSection, FinetuneConfig
from jobs.train.finetune import FinetuneTask, erase_clips
from pipeline.loader.transforms import model_input

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
DEBUG = os.path.join(ROOT, "configs", "finetune", "debug.yaml")


def official_cube_boxes(
    b: int, h: int, w: int, reprob: float, recount: int
) -> list[list[tuple[int, int, int, int]]]:
    """Per clip, the boxes ``(top, left, height, width)`` the official ``_erase_cube`` draws from Python's
    ``random`` (seeded by the caller), clip after clip."""
    out = []
    for _ in range(b):
        boxes = []
        if random.random() <= reprob:
            count = 1 if recount == 1 else random.randint(1, recount)
            for _ in range(count):
                for _ in range(100):
                    area = random.uniform(0.02, 1 / 3) * h * w / count
                    aspect = math.exp(random.uniform(math.log(0.3), math.log(1 / 0.3)))
                    bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                    if bw < w and bh < h:
                        boxes.append((random.randint(0, h - bh), random.randint(0, w - bw), bh, bw))
                        break
        out.append(boxes)
    return out


def _video(b=6, t=4, s=24, seed=0) -> torch.Tensor:
    return torch.randn(b, 3, t, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
@pytest.mark.parametrize("recount", [1, 2])
def test_matches_timm_with_the_same_seeds(mode, recount):
    video = _video()
    aug = AugmentSection(reprob=0.7, remode=mode, recount=recount)
    random.seed(3)
    torch.manual_seed(3)
    ours = erase_clips(video, aug)
    random.seed(3)
    torch.manual_seed(3)
    ref = video.clone()
    t0 = 4 // recount if recount > 1 else 0
    folded = ref[:, :, t0:].reshape(6, 3 * (4 - t0), 24, 24)
    RandomErasing(0.7, mode=mode, max_count=recount, device="cpu")(folded)
    ref[:, :, t0:] = folded.view(6, 3, 4 - t0, 24, 24)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, video)  # 6 clips at 0.7: P(none erased) = 7e-4 (the seed is fixed)


@pytest.mark.parametrize("recount", [1, 2, 3])
def test_boxes_are_the_official_cubes(recount):
    b, t, s = 16, 6, 32
    video = _video(b, t, s, seed=1)
    random.seed(11)
    torch.manual_seed(11)
    ours = erase_clips(video, AugmentSection(reprob=0.5, remode="pixel", recount=recount))
    assert torch.equal(video, _video(b, t, s, seed=1)), "the input is left as it was"
    random.seed(11)
    boxes = official_cube_boxes(b, s, s, 0.5, recount)
    t0 = t // recount if recount > 1 else 0
    erased = 0
    for i in range(b):
        want = torch.zeros(s, s, dtype=torch.bool)
        for top, left, bh, bw in boxes[i]:
            want[top : top + bh, left : left + bw] = True
        changed = ours[i] != video[i]  # [C, T, H, W]
        assert not changed[:, :t0].any(), i  # the official skips the first T // recount frames
        # one box, in every frame and channel
        assert torch.equal(changed[:, t0:], want.expand_as(changed[:, t0:])), i
        if want.any():
            erased += 1
            fill = ours[i][:, t0:, want]  # [C, T', n]
            assert not torch.equal(fill[:, 0], fill[:, -1]), "each frame draws its own noise"
    assert 3 <= erased <= 13  # of 16 at reprob 0.5


def test_fill_modes_are_in_normalised_space():
    video = _video(1, 3, 64)
    for mode in ("pixel", "rand", "const"):
        random.seed(0)
        torch.manual_seed(0)
        ours = erase_clips(video, AugmentSection(reprob=1.0, remode=mode))
        box = (ours != video)[0, 0, 0]
        fill = ours[0][:, :, box]  # [C, T, n]
        if mode == "pixel":
            assert box.sum() >= 60 and abs(float(fill.mean())) < 0.2 and abs(float(fill.std()) - 1) < 0.2
        elif mode == "rand":  # one N(0, 1) colour per channel of each frame
            assert torch.equal(fill, fill[:, :, :1].expand_as(fill)) and fill[:, :, 0].unique().numel() == 9
        else:
            assert torch.equal(fill, torch.zeros_like(fill))


def test_reprob_zero_is_the_clip_itself_and_draws_nothing():
    video = _video()
    state = random.getstate(), torch.get_rng_state()
    assert erase_clips(video, AugmentSection()) is video
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])


def test_forward_erases_after_normalising_and_before_mixup():
    cfg = load_config(FinetuneConfig, DEBUG, ["loader.manifest=unused/manifest.json", "augment.reprob=1.0",
                                              "augment.mixup_alpha=0", "augment.cutmix_alpha=0"])  # fmt: skip
    task = FinetuneTask(cfg)
    model = task.build_model(resuming=True).eval()
    b, m = cfg.loader.batch_size, task.model_cfg
    gen = torch.Generator().manual_seed(0)
    video = torch.randint(
        0, 256, (b, 3, m.num_frames, m.img_size, m.img_size), dtype=torch.uint8, generator=gen
    )
    batch = {"video": video, "label": torch.arange(b) % 4, "valid": torch.ones(b, dtype=torch.bool),
             "key": [f"k{i}" for i in range(b)]}  # fmt: skip
    seen = []
    handle = model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    random.seed(4)
    torch.manual_seed(4)
    task.forward(model, batch, torch.device("cpu"))
    handle.remove()
    random.seed(4)
    torch.manual_seed(4)
    want = erase_clips(model_input(video, "cpu"), cfg.augment)
    assert torch.equal(seen[0], want) and not torch.equal(want, model_input(video, "cpu"))


@pytest.mark.parametrize(
    "override,match",
    [
        ("augment.reprob=1.5", "reprob"),
        ("augment.reprob=-0.1", "reprob"),
        ("augment.remode=noise", "remode"),
        ("augment.recount=0", "recount"),
    ],  # fmt: skip
)
def test_config_rejects_bad_erasing(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(FinetuneConfig, DEBUG, ["loader.manifest=unused/manifest.json", override])


def test_vit_b_recipe_has_the_official_augmentation():
    """run_class_finetuning.py defaults: --aa rand-m7-n4-mstd0.5-inc1, --reprob 0.25, --remode pixel, --recount 1;
    the other finetuning configs leave both off."""
    configs = os.path.join(ROOT, "configs", "finetune")
    for name in sorted(os.listdir(configs)):
        cfg = load_config(FinetuneConfig, os.path.join(configs, name))
        got = (cfg.loader.rand_augment, cfg.augment.reprob, cfg.augment.remode, cfg.augment.recount)
        official = ("rand-m7-n4-mstd0.5-inc1", 0.25, "pixel", 1)
        assert got == (official if name == "vit_b.yaml" else (None, 0.0, "pixel", 1)), name
