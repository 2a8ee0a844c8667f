import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from jobs.cli import main
from model import VideoMAE, VideoMAEClassifier, get_config
from model.flops import (
    block_flops,
    classifier_forward_flops,
    classifier_param_count,
    param_counts,
    pretrain_forward_flops,
    pretrain_train_flops,
)
from pipeline.loader.decoder_masking import decoder_masks
from pipeline.loader.masking import tube_mask


def _count(fn) -> int:
    """FLOPs torch itself counts (2 per multiply-add); the math SDPA backend makes attention matmuls visible."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


RUN_CELL = {"decoder_mask_type": "run_cell", "decoder_mask_ratio": 0.5}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"mask_ratio": 0.5, "encoder_depth": 3},
        {"mask_type": "random"},
        {"mask_type": "motion"},  # the tube count (its masks come from the loader; a tube mask has its shape)
        RUN_CELL,
        {**RUN_CELL, "decoder_mask_ratio": 0.75},
    ],
)
def test_analytic_flops_match_torch_flop_counter(overrides):
    cfg = get_config("tiny", **overrides)
    model = VideoMAE(cfg)
    batch = 3
    x = torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    g = torch.Generator().manual_seed(0)
    mask = tube_mask(batch, *cfg.grid, cfg.mask_ratio, g)
    if cfg.mask_type == "random":
        mask = torch.zeros_like(mask)
        mask[:, : cfg.num_masked] = True
    dmask = decoder_masks(cfg.grid, cfg.decoder_mask_type, cfg.decoder_mask_ratio, [g] * batch)
    assert _count(lambda: model(x, mask, dmask)) == batch * pretrain_forward_flops(cfg)

    def step():
        loss, _ = model(x, mask, dmask)
        loss.backward()

    assert _count(step) == batch * pretrain_train_flops(cfg)
    clf = VideoMAEClassifier(cfg, 11)
    assert _count(lambda: clf(x)) == batch * classifier_forward_flops(cfg, 11)


def test_paper_numbers():
    """ViT-B 16x224: the paper's 180 G (fvcore multiply-adds) for finetuning; ~87 M encoder params."""
    cfg = get_config("vit_b")
    assert classifier_forward_flops(cfg, 400) / 2 / 1e9 == pytest.approx(180.3, abs=0.1)
    p = param_counts(cfg)
    assert p["encoder"] == pytest.approx(86.2e6, rel=1e-3) and p["total"] == p["encoder"] + p["decoder"]
    assert pretrain_forward_flops(cfg, 0.9) < pretrain_forward_flops(cfg, 0.5)
    with pytest.raises(ValueError, match=r"mask_ratio must be a number in \(0, 1\)"):
        pretrain_forward_flops(cfg, 1.5)


def test_param_counts_match_formula():
    """Independent count written out from the architecture (LNs, fused qkv + q/v bias, proj, MLP, heads)."""
    cfg = get_config("tiny")
    d, e, p = cfg.encoder_width, cfg.decoder_width, cfg.patch_dim

    def block(w):
        h = int(w * cfg.mlp_ratio)
        return 2 * 2 * w + 3 * w * w + 2 * w + w * w + w + w * h + h + h * w + w

    enc = d * p + d + cfg.encoder_depth * block(d) + 2 * d
    dec = d * e + e + cfg.decoder_depth * block(e) + 2 * e + e * p + p
    assert param_counts(cfg) == {"encoder": enc, "decoder": dec, "total": enc + dec}
    real = VideoMAE(cfg)
    assert sum(t.numel() for t in real.parameters()) == enc + dec
    assert classifier_param_count(cfg, 10) == enc - 2 * d + 2 * d + d * 10 + 10


def test_model_info_cli(capsys):
    assert main(["model-info", "--model", "vit_b", "--mask-ratio", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "1408 masked" in out and "encoder 86.23 M" in out and "GFLOPs/clip" in out
    assert main(["model-info", "--model", "tiny", "--set", "num_frames=8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = get_config("tiny", num_frames=8)
    assert info["tokens"]["total"] == 64 and info["params"]["total"] == param_counts(cfg)["total"]
    assert info["gflops_per_clip"]["pretrain_fwd_bwd"] == pytest.approx(pretrain_train_flops(cfg) / 1e9)
    assert main(["model-info", "--model", "tiny", "--set", "bogus=1"]) == 2
    assert "unknown key(s) ['bogus']" in capsys.readouterr().err


def test_decoder_masking_saving_in_model_info(capsys):
    """VideoMAE V2's running cell at 0.5 halves the decoder's mask tokens; model-info shows the saving."""
    cfg = get_config("vit_b", **RUN_CELL)
    full = get_config("vit_b")
    assert cfg.num_decoded == 784 and pretrain_train_flops(cfg) < pretrain_train_flops(full)
    saved = pretrain_forward_flops(full) - pretrain_forward_flops(cfg)
    dec_full = 4 * block_flops(1568, 384, 1536) + 2 * 1408 * 384 * 1536
    dec_kept = 4 * block_flops(160 + 784, 384, 1536) + 2 * 784 * 384 * 1536
    assert saved == dec_full - dec_kept
    argv = [
        "model-info",
        "--model",
        "vit_b",
        "--set",
        "decoder_mask_type=run_cell",
        "--set",
        "decoder_mask_ratio=0.5",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "decoder mask  run_cell 0.5: decoder reconstructs 784 tokens instead of 1408" in out
    assert f"vs {pretrain_train_flops(full) / 1e9:.2f} GFLOPs" in out
    assert main(["model-info", "--model", "vit_b"]) == 0 and "decoder mask" not in capsys.readouterr().out
