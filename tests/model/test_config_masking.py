import dataclasses

import pytest
import torch

from jobs.config import load_config
from model import CONFIGS, VideoMAEConfig, get_config, random_mask, tube_mask

PAPER = {  # name: (width, depth, heads, decoder width, decoder heads)
    "vit_s": (384, 12, 6, 384, 6),
    "vit_b": (768, 12, 12, 384, 6),
    "vit_l": (1024, 24, 16, 512, 8),
    "vit_h": (1280, 32, 16, 512, 8),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_sizes(name):
    cfg = get_config(name)
    got = (cfg.encoder_width, cfg.encoder_depth, cfg.encoder_heads, cfg.decoder_width, cfg.decoder_heads)
    assert got == PAPER[name]
    assert (cfg.patch_size, cfg.tubelet_size, cfg.num_frames, cfg.img_size, cfg.decoder_depth) == (
        16,
        2,
        16,
        224,
        4,
    )
    assert (cfg.mask_ratio, cfg.norm_pix_loss, cfg.in_chans, cfg.mlp_ratio, cfg.qkv_bias) == (
        0.9,
        True,
        3,
        4.0,
        True,
    )
    assert cfg.grid == (8, 14, 14) and cfg.num_patches == 1568 and cfg.patch_dim == 2 * 16 * 16 * 3
    assert cfg.num_masked == 8 * round(0.9 * 196)


def test_registry_and_overrides():
    assert set(CONFIGS) == {"tiny", "vit_s", "vit_b", "vit_l", "vit_h"}
    cfg = get_config("vit_b", drop_path_rate=0.1, mask_ratio=0.75)
    assert cfg.drop_path_rate == 0.1 and cfg.mask_ratio == 0.75 and cfg.encoder_width == 768
    tiny = get_config("tiny")
    assert tiny.grid == (2, 4, 4) and tiny.num_patches == 32
    with pytest.raises(ValueError, match="unknown model config 'vit_x'"):
        get_config("vit_x")
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['widht'\]"):
        get_config("tiny", widht=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mask_ratio = 0.5


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("img_size", 30, "divisible by patch_size"),
        ("num_frames", 5, "divisible by tubelet_size"),
        ("encoder_heads", 3, "encoder_width .* divisible by encoder_heads"),
        ("mask_ratio", 1.0, r"mask_ratio must be in \(0, 1\)"),
        ("mask_ratio", 0.01, "masks no token"),
        ("drop_path_rate", -0.1, "drop_path_rate"),
        ("patch_size", 0, "patch_size must be a positive int"),
        ("mask_type", "block", "mask_type must be one of"),
        ("mlp_ratio", 0.0, "mlp_ratio"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny", **{field: value})


def test_yaml_loading_through_job_loader(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("encoder_width: 96\nencoder_heads: 4\nmask_ratio: 0.5\n")
    cfg = load_config(VideoMAEConfig, str(path), ["decoder_depth=2"])
    assert (cfg.encoder_width, cfg.mask_ratio, cfg.decoder_depth) == (96, 0.5, 2)


def test_tube_mask_is_constant_over_time_with_exact_ratio():
    t, h, w, ratio = 4, 7, 7, 0.9
    mask = tube_mask(8, t, h, w, ratio, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (8, t * h * w)
    grid = mask.view(8, t, h * w)
    assert torch.equal(grid, grid[:, :1].expand_as(grid))
    assert (grid[:, 0].sum(1) == round(ratio * h * w)).all()
    assert (mask.sum(1) == t * round(ratio * h * w)).all()
    assert not torch.equal(grid[0, 0], grid[1, 0])  # samples differ


def test_random_masks_exact_counts_and_differ_over_time():
    t, h, w, ratio = 4, 6, 6, 0.75
    gen = torch.Generator().manual_seed(1)
    token = random_mask(4, t, h, w, ratio, gen)
    assert (token.sum(1) == round(ratio * t * h * w)).all()
    frame = random_mask(4, t, h, w, ratio, gen, per_frame=True).view(4, t, h * w)
    assert (frame.sum(-1) == round(ratio * h * w)).all()
    for m in (token.view(4, t, h * w), frame):
        assert any(not torch.equal(m[b, 0], m[b, i]) for b in range(4) for i in range(1, t))


def test_masks_are_uniform_over_positions():
    """Each spatial position is masked with probability ~ratio (draws are not biased to a corner)."""
    mask = tube_mask(4000, 1, 4, 4, 0.5, torch.Generator().manual_seed(2))
    freq = mask.float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.5), atol=0.04)


@pytest.mark.parametrize("fn", [tube_mask, random_mask])
def test_generator_makes_masks_deterministic(fn):
    a = fn(3, 2, 4, 4, 0.75, torch.Generator().manual_seed(7))
    b = fn(3, 2, 4, 4, 0.75, torch.Generator().manual_seed(7))
    c = fn(3, 2, 4, 4, 0.75, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "args,message",
    [
        ((0, 2, 4, 4, 0.5), "batch must be a positive int"),
        ((2, 2, 4.0, 4, 0.5), "h must be a positive int"),
        ((2, 2, 4, 4, 1.0), r"ratio must be in \[0, 1\)"),
        ((2, 2, 4, 4, -0.1), r"ratio must be in \[0, 1\)"),
    ],
)
def test_mask_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        tube_mask(*args, torch.Generator())
    with pytest.raises(ValueError, match=message):
        random_mask(*args, torch.Generator())


def test_mask_needs_generator():
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        tube_mask(2, 2, 4, 4, 0.5, 123)
