import dataclasses

import pytest

from jobs.config import load_config
from model import CONFIGS, VideoMAEConfig, get_config

PAPER = {  # name: (width, depth, heads, decoder width, decoder heads), official pretrain_videomae_*_patch16_224
    "vit_s": (384, 12, 6, 192, 3),
    "vit_b": (768, 12, 12, 384, 6),
    "vit_l": (1024, 24, 16, 512, 8),
    "vit_h": (1280, 32, 16, 640, 8),
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


def test_vit_g_is_videomae_v2_giant():
    cfg = get_config("vit_g")
    assert (cfg.patch_size, cfg.encoder_width, cfg.encoder_depth, cfg.encoder_heads) == (14, 1408, 40, 16)
    assert (cfg.encoder_mlp_hidden, cfg.decoder_width, cfg.decoder_heads, cfg.decoder_mlp_hidden) == (
        6144,
        512,
        8,
        2234,
    )
    assert cfg.grid == (8, 16, 16) and cfg.patch_dim == 1176
    v2 = get_config("vit_g", decoder_mask_type="run_cell", decoder_mask_ratio=0.5)
    assert v2.num_decoded == 1024


def test_registry_and_overrides():
    assert set(CONFIGS) == {"tiny", "vit_s", "vit_b", "vit_l", "vit_h", "vit_g"}
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
        ("mask_ratio", 1.0, r"mask_ratio must be a number in \(0, 1\)"),
        ("mask_ratio", 0.01, "masks no token"),
        ("drop_path_rate", -0.1, "drop_path_rate"),
        ("patch_size", 0, "patch_size must be a positive int"),
        ("mask_type", "block", "mask_type must be one of"),
        ("mlp_ratio", 0.0, "mlp_ratio"),
        ("use_mean_pooling", 1, "use_mean_pooling must be a bool"),
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


def test_clip_spec_is_derived_from_the_model_config():
    """The loader's clip geometry and mask come from the model config (their one home)."""
    cfg = get_config("tiny", num_frames=8, mask_ratio=0.9, mask_type="random")
    spec = cfg.clip_spec()
    assert (spec.num_frames, spec.input_size, spec.patch_size, spec.tubelet_size) == (8, 32, 8, 2)
    assert (spec.mask_type, spec.mask_ratio) == ("random", 0.9)
    assert spec.token_grid == cfg.grid and spec.num_tokens == cfg.num_patches
    assert spec.num_masked == cfg.num_masked == round(0.9 * 4 * 4 * 4)
    whole = cfg.clip_spec(masking=False)
    assert (whole.mask_type, whole.mask_ratio, whole.num_masked) == ("none", 0.0, 0)
