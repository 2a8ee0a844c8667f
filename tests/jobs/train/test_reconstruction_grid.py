"""The reconstruction PNG shows both ways a normalised-pixel prediction becomes pixels, each row labelled: the
visible tubelets' statistics (no ground truth) and each tubelet's true statistics (the official visualisation).
With a prediction equal to the normalised target, the true-statistics row is the input itself."""

from __future__ import annotations

import numpy as np
import torch

from jobs.train.metrics import (
    TRUE_STATS,
    VISIBLE_STATS,
    pixel_mask,
    reconstructions,
    save_reconstruction_grid,
)
from jobs.train.pretrain import save_grid
from model import VideoMAE, get_config
from pipeline.loader.masking import tube_mask
from pipeline.loader.transforms import IMAGENET_MEAN, IMAGENET_STD


def _setup():
    cfg = get_config("tiny")  # 4x32x32 clips, tubelet 2, patch 8: grid (2, 4, 4), norm_pix_loss
    torch.manual_seed(0)
    model = VideoMAE(cfg).eval()
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(1, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)  # [0, 1] units
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None, None]
    mask = tube_mask(1, *cfg.grid, cfg.mask_ratio, g)
    return cfg, model, pixels, (pixels - mean) / std, mask


def _normalised_target(pixels: np.ndarray, mask: np.ndarray, cfg) -> np.ndarray:
    """[M, P] by explicit loops: each masked tubelet's pixels (order t, h, w, c), per channel minus the
    tubelet's mean over its pixels, over its (unbiased) std + eps."""
    t_, h_, w_ = cfg.grid
    a, p = cfg.tubelet_size, cfg.patch_size
    rows = []
    for i in np.flatnonzero(mask):
        t, h, w = i // (h_ * w_), (i // w_) % h_, i % w_
        cube = pixels[:, t * a : (t + 1) * a, h * p : (h + 1) * p, w * p : (w + 1) * p]  # [C, a, p, p]
        cube = cube.transpose(1, 2, 3, 0).reshape(-1, 3)  # [a*p*p, C]
        norm = (cube - cube.mean(0)) / (cube.std(0, ddof=1) + cfg.norm_pix_eps)
        rows.append(norm.reshape(-1))
    return np.stack(rows)


def test_true_statistics_row_is_the_input_for_a_perfect_prediction():
    cfg, model, pixels, video, mask = _setup()
    pred = torch.from_numpy(_normalised_target(pixels[0].double().numpy(), mask[0].numpy(), cfg)).float()[
        None
    ]
    rows = reconstructions(model, video, mask, pred)
    assert set(rows) == {VISIBLE_STATS, TRUE_STATS}
    assert torch.allclose(rows[TRUE_STATS], pixels, atol=1e-4)
    # visible-statistics row: visible pixels copied, masked ones differ from the truth (no leak of their stats)
    pmask = pixel_mask(mask[0], grid=cfg.grid, tubelet=cfg.tubelet_size, patch=cfg.patch_size)[None, None]
    pmask = pmask.expand_as(pixels)
    vis = rows[VISIBLE_STATS]
    assert torch.allclose(vis[~pmask], pixels[~pmask], atol=1e-5)
    assert (vis[pmask] - pixels[pmask]).abs().mean() > 1e-2


def test_png_rows_are_labelled(tmp_path, monkeypatch):
    cfg, model, pixels, video, mask = _setup()
    pred = torch.randn(1, int(mask.sum()), cfg.patch_dim)
    recons = {k: r[0] for k, r in reconstructions(model, video, mask, pred).items()}
    pmask = pixel_mask(mask[0], grid=cfg.grid, tubelet=cfg.tubelet_size, patch=cfg.patch_size)
    path = tmp_path / "grid.png"
    drawn = save_reconstruction_grid(str(path), pixels[0], pmask, recons)
    assert drawn == ["original", "masked", VISIBLE_STATS, TRUE_STATS]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the training hook (the PNG a run writes) draws the same rows
    import jobs.train.pretrain as pretrain

    seen = []
    monkeypatch.setattr(
        pretrain, "save_reconstruction_grid", lambda *a: seen.append(save_reconstruction_grid(*a))
    )
    save_grid(str(tmp_path / "hook.png"), model, video, mask, pred)
    assert seen == [drawn] and (tmp_path / "hook.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
