import math

import numpy as np
import pytest
import torch

from model import (
    CONFIGS,
    VideoMAE,
    VideoMAEClassifier,
    get_config,
    patchify,
    unpatchify,
)
from model.layers import sinusoid_table
from pipeline.loader.masking import random_mask, tube_mask
from pipeline.loader.transforms import IMAGENET_MEAN, IMAGENET_STD


def _video(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)


def _mask(cfg, batch=2, seed=0):
    return tube_mask(batch, *cfg.grid, cfg.mask_ratio, torch.Generator().manual_seed(seed))


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return VideoMAE(cfg)


def test_shapes_real_tiny():
    cfg = get_config("tiny")
    model = _model(cfg)
    x, mask = _video(cfg), _mask(cfg)
    loss, pred = model(x, mask)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (2, cfg.num_masked, cfg.patch_dim) == (2, 24, 384)
    assert model.forward_features(x).shape == (2, cfg.encoder_width)


@pytest.mark.slow
def test_shapes_real_vit_s():
    """Full-size ViT-S pretraining forward on CPU (16x224x224, 1408 of 1568 tokens masked)."""
    cfg = get_config("vit_s")
    model = _model(cfg)
    x, mask = _video(cfg, 1), _mask(cfg, 1)
    with torch.no_grad():
        loss, pred = model(x, mask)
    assert torch.isfinite(loss) and pred.shape == (1, 1408, 1536)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_builds_and_runs_fwd_bwd(name):
    """Registry test: big configs on the meta device (shapes only), tiny for real with gradients."""
    cfg = get_config(name)
    device = "cpu" if name == "tiny" else "meta"
    with torch.device(device):
        model = VideoMAE(cfg)
        clf = VideoMAEClassifier(cfg, 7)
        x = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    loss, pred = model(x, _mask(cfg))
    loss.backward()
    assert pred.shape == (2, cfg.num_masked, cfg.patch_dim)
    assert clf(x).shape == (2, 7)
    if device == "cpu":
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_patchify_roundtrip_and_official_layout():
    cfg = get_config("tiny", in_chans=3)
    x = _video(cfg)
    p = patchify(x, patch_size=8, tubelet_size=2)
    assert p.shape == (2, cfg.num_patches, cfg.patch_dim)
    assert torch.equal(unpatchify(p, grid=cfg.grid, patch_size=8, tubelet_size=2), x)
    # token (t=1, h=2, w=3), pixel (p0=1, p1=4, p2=5, c=2) -> video[:, 2, 2*1+1, 8*2+4, 8*3+5]
    t, h, w = cfg.grid
    token = (1 * h + 2) * w + 3
    pix = ((1 * 8 + 4) * 8 + 5) * 3 + 2
    assert torch.equal(p[:, token, pix], x[:, 2, 3, 20, 29])


def _slow_target(video, cfg, norm_pix, eps=1e-6):
    """Reference: loop over tubelets; unnormalise, per-channel mean/unbiased std in float64, (p0 p1 p2 c)."""
    mean = np.array(IMAGENET_MEAN)[:, None, None, None]
    std = np.array(IMAGENET_STD)[:, None, None, None]
    v = video.double().numpy() * std + mean
    T, H, W = cfg.grid
    ts, ps = cfg.tubelet_size, cfg.patch_size
    out = np.zeros((v.shape[0], T * H * W, cfg.patch_dim))
    for b in range(v.shape[0]):
        for t in range(T):
            for h in range(H):
                for w in range(W):
                    cube = v[b, :, t * ts : (t + 1) * ts, h * ps : (h + 1) * ps, w * ps : (w + 1) * ps]
                    if norm_pix:
                        flat = cube.reshape(cube.shape[0], -1)
                        mu = flat.mean(1)[:, None, None, None]
                        sd = flat.std(1, ddof=1)[:, None, None, None]
                        cube = (cube - mu) / (sd + eps)
                    out[b, (t * H + h) * W + w] = cube.transpose(1, 2, 3, 0).reshape(-1)
    return out


@pytest.mark.parametrize("norm_pix,eps", [(True, 1e-6), (False, 1e-6), (True, 0.01)])
def test_loss_matches_slow_reference(norm_pix, eps):
    cfg = get_config("tiny", norm_pix_loss=norm_pix, norm_pix_eps=eps)
    model = _model(cfg)
    x = _video(cfg) * 0.5
    mask = _mask(cfg)
    loss, pred = model(x, mask)
    target = _slow_target(x, cfg, norm_pix, eps)
    assert np.allclose(model.target(x).numpy(), target, atol=2e-5)
    expected = np.mean(
        [(pred[b].detach().double().numpy() - target[b][mask[b].numpy()]) ** 2 for b in range(x.shape[0])]
    )
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_encoder_sees_only_visible_tokens():
    """Changing masked pixels changes the target, never the prediction; changing visible pixels does."""
    cfg = get_config("tiny")
    model = _model(cfg).eval()
    x, mask = _video(cfg), _mask(cfg)
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    _, pred = model(x, mask)
    assert seen == [cfg.num_patches - cfg.num_masked]
    pixel_mask = unpatchify(
        mask[:, :, None].expand(-1, -1, cfg.patch_dim).float(), grid=cfg.grid, patch_size=8, tubelet_size=2
    )
    noise = torch.randn_like(x)
    _, pred_masked_changed = model(x + noise * pixel_mask, mask)
    _, pred_visible_changed = model(x + noise * (1 - pixel_mask), mask)
    assert torch.allclose(pred, pred_masked_changed, atol=1e-6)
    assert not torch.allclose(pred, pred_visible_changed, atol=1e-3)


def test_sinusoid_table_equals_official_formula():
    n, d = 10, 12
    ref = np.array([[pos / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for pos in range(n)])
    ref[:, 0::2], ref[:, 1::2] = np.sin(ref[:, 0::2]), np.cos(ref[:, 1::2])
    assert torch.equal(sinusoid_table(n, d), torch.tensor(ref, dtype=torch.float32)[None])


def test_reconstruct_oracle_and_visible_stats():
    cfg = get_config("tiny")
    model = _model(cfg)
    x, mask = _video(cfg) * 0.3, _mask(cfg)
    target = model.target(x)
    sel = mask[:, :, None].expand(-1, -1, cfg.patch_dim)
    perfect = target[sel].view(2, -1, cfg.patch_dim)
    unnorm = model._unnormalize(x)
    rec = model.reconstruct(x, perfect, mask, oracle_stats=True)
    assert torch.allclose(rec, unnorm, atol=1e-4)
    rec_vis = model.reconstruct(x, perfect, mask)
    vis_pixels = unpatchify(
        (~mask)[:, :, None].expand(-1, -1, cfg.patch_dim).float(), grid=cfg.grid, patch_size=8, tubelet_size=2
    ).bool()
    assert torch.equal(rec_vis[vis_pixels], unnorm[vis_pixels])
    # masked token 0 of sample 0, channel 0: pred * mean(visible stds) + mean(visible means)
    cubes = model.patchify(unnorm).view(2, cfg.num_patches, -1, 3)
    vis = cubes[0][~mask[0]][..., 0]
    mu, sd = vis.mean(1).mean(), (vis.std(1) + 1e-6).mean()
    tok = int(mask[0].nonzero()[0])
    got = model.patchify(rec_vis)[0, tok].view(-1, 3)[:, 0]
    assert torch.allclose(got, perfect[0, 0].view(-1, 3)[:, 0] * sd + mu, atol=1e-5)


def test_bad_inputs_raise_value_error():
    cfg = get_config("tiny")
    model = _model(cfg)
    x, mask = _video(cfg), _mask(cfg)
    with pytest.raises(ValueError, match=r"video must be \[B, C, T, H, W\] = \[B, 3, 4, 32, 32\]"):
        model(x[:, :, :2], mask)
    with pytest.raises(ValueError, match="float tensor"):
        model((x * 50).to(torch.uint8), mask)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        model(x, mask.float())
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        model(x, mask[:, :-1])
    uneven = mask.clone()
    uneven[0, ~mask[0]] = True
    with pytest.raises(ValueError, match="same number of tokens in every sample"):
        model(x, uneven)
    with pytest.raises(ValueError, match="between 1 and L-1"):
        model(x, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="cfg must be a VideoMAEConfig"):
        VideoMAE({"img_size": 32})
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        VideoMAEClassifier(cfg, 0)
    with pytest.raises(ValueError, match=r"head_drop must be in \[0, 1\)"):
        VideoMAEClassifier(cfg, 3, head_drop=1.0)


def test_random_mask_trains_too():
    cfg = get_config("tiny", mask_type="random")
    mask = random_mask(2, *cfg.grid, cfg.mask_ratio, torch.Generator().manual_seed(0))
    loss, pred = _model(cfg)(_video(cfg), mask)
    assert pred.shape == (2, cfg.num_masked, cfg.patch_dim) and torch.isfinite(loss)


def test_classifier_takes_pretrained_encoder():
    cfg = get_config("tiny", drop_path_rate=0.1)
    pre = _model(cfg, seed=1)
    clf = VideoMAEClassifier(cfg, 5, head_drop=0.5)
    ignored = clf.from_pretrained_encoder(pre.state_dict())
    assert "encoder.norm.weight" in ignored and "mask_token" in ignored and "decoder.head.weight" in ignored
    for k, v in clf.state_dict().items():
        if k.startswith("encoder."):
            assert torch.equal(v, pre.state_dict()[k]), k
    x = _video(cfg)
    clf.eval(), pre.eval()
    pre_tokens = pre.encoder.blocks[-1]
    feats = []
    pre_tokens.register_forward_hook(lambda m, i, o: feats.append(o))
    pre.encoder(x)
    expected = torch.nn.functional.layer_norm(
        feats[0].mean(1), (cfg.encoder_width,), clf.fc_norm.weight, clf.fc_norm.bias, 1e-6
    )
    assert torch.allclose(clf.forward_features(x), expected, atol=1e-5)
    assert clf(x).shape == (2, 5)
    with pytest.raises(ValueError, match="lacks encoder key"):
        clf.from_pretrained_encoder({"mask_token": torch.zeros(1)})
    other = VideoMAE(get_config("tiny", encoder_width=32, encoder_heads=2))
    with pytest.raises(ValueError, match="shapes do not match"):
        clf.from_pretrained_encoder(other.state_dict())


def test_pooling_and_final_norm_variants():
    """``use_mean_pooling=False``: final encoder norm, then the first token (official ``--use_cls``, no CLS
    token); ``encoder_norm=False``: a pretraining encoder without final norm (HF ``use_mean_pooling=True``)."""
    cfg = get_config("tiny", use_mean_pooling=False)
    pre, clf = _model(cfg, seed=2).eval(), VideoMAEClassifier(cfg, 3).eval()
    assert clf.fc_norm is None and "encoder.norm.weight" in clf.state_dict()
    ignored = clf.from_pretrained_encoder(pre.state_dict())
    assert "encoder.norm.weight" not in ignored
    x = _video(cfg)
    with torch.no_grad():
        assert torch.allclose(clf.forward_features(x), pre.encoder(x)[:, 0])
        assert clf(x).shape == (2, 3)
    bare = _model(get_config("tiny", encoder_norm=False))
    assert not any(k.startswith("encoder.norm") for k in bare.state_dict())
    loss, _ = bare(x, _mask(cfg))
    assert torch.isfinite(loss)


def test_drop_path_matches_timm_and_keeps_eval_identity():
    """Our buffer-rate DropPath is stochastic depth as timm's DropPath has it: whole samples are dropped with
    probability ``rate`` and the kept ones scaled by ``1 / (1 - rate)`` (checked per row and against timm's
    drop fraction on the same input); in eval mode, and at rate 0, it is the identity."""
    from timm.layers import DropPath as TimmDropPath

    from model.layers import DropPath

    x = torch.randn(20000, 3, 4) + 5.0  # no exact zeros in x
    torch.manual_seed(3)
    a = DropPath(0.3).train()(x)
    b = TimmDropPath(0.3).train()(x)
    for out in (a, b):
        dropped = (out == 0).all(dim=(1, 2))
        assert abs(dropped.float().mean().item() - 0.3) < 0.015
        assert torch.allclose(out[~dropped], x[~dropped] / 0.7, rtol=1e-6)
    ours = DropPath(0.3)
    assert torch.equal(ours.eval()(x), x) and torch.equal(DropPath(0.0).train()(x), x)
    with pytest.raises(ValueError, match="drop path rate"):
        DropPath(1.0)


def test_time_pooled_classifier_keeps_the_order_of_slices(tmp_path):
    """classifier_pool="time": per temporal slice a mean over space, fc_norm per slice, slices concatenated in
    time order (checked against a loop over slices); it loads back from our format and refuses layouts that
    have no such head."""
    from model import load_checkpoint, save_checkpoint

    cfg = get_config("tiny", classifier_pool="time")
    torch.manual_seed(0)
    clf = VideoMAEClassifier(cfg, 3).eval()
    x = _video(cfg)
    t_slices, side = cfg.grid[0], cfg.grid[1] * cfg.grid[2]
    with torch.no_grad():
        tokens = clf.encoder(x)
        want = torch.cat(
            [clf.fc_norm(tokens[:, i * side : (i + 1) * side].mean(1)) for i in range(t_slices)], 1
        )
        assert torch.allclose(clf.forward_features(x), want, atol=1e-6)
        assert clf(x).shape == (2, 3) and clf.head.in_features == t_slices * cfg.encoder_width
    save_checkpoint(clf, str(tmp_path / "c"))
    back, _ = load_checkpoint(str(tmp_path / "c"))
    with torch.no_grad():
        assert torch.equal(back.eval()(x), clf(x))
    with pytest.raises(ValueError, match="no hf layout"):
        save_checkpoint(clf, str(tmp_path / "h"), format="hf")
    with pytest.raises(ValueError, match="classifier_pool"):
        get_config("tiny", classifier_pool="max")
