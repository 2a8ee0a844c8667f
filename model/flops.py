"""Analytic FLOPs per clip and parameter counts, for MFU and ``vmae model-info``.

Convention: 2 FLOPs per multiply-add, counting only matmuls and convolutions (patch embedding, qkv, attention
scores and values, projections, MLPs, encoder-to-decoder, prediction head); norms, softmax, GELU and the loss
are left out (< 1% for ViTs), as in fvcore counts. The paper's "180 GFLOPs" for ViT-B 16x224 is fvcore's
multiply-add count: it equals ``encoder_flops(vit_b, 1568) / 2``.

Pretraining forward = patch embedding on all ``L`` tokens + encoder on the ``N`` visible tokens + decoder on the
``N`` visible tokens and ``K`` mask tokens + head on the ``K``. ``K = M`` (every masked token, so the decoder sees
all ``L``) unless VideoMAE V2 decoder masking keeps fewer (``cfg.decoder_mask_type``). Forward+backward is
3x forward (backward computes the gradient w.r.t. both inputs and weights of each matmul: 2x forward) minus the
patch embedding's input gradient, which nothing needs (the video does not require grad).
"""

from __future__ import annotations

import torch

from model.config import VideoMAEConfig
from model.videomae import VideoMAE, VideoMAEClassifier
from pipeline.loader.decoder_masking import num_decoder_kept
from pipeline.loader.masking import check_mask_ratio, num_masked


def block_flops(num_tokens: int, width: int, mlp_hidden: int) -> int:
    """One transformer block on ``num_tokens`` tokens: qkv (3 D^2), scores + weighted values (2 N D),
    output projection (D^2), MLP (2 D H) — each a multiply-add per token."""
    n, d = num_tokens, width
    macs = n * (3 * d * d + d * d + 2 * d * mlp_hidden) + 2 * n * n * d
    return 2 * macs


def patch_embed_flops(cfg: VideoMAEConfig) -> int:
    """Tubelet Conv3d over all ``L`` tokens (it runs before masking)."""
    return 2 * cfg.num_patches * cfg.patch_dim * cfg.encoder_width


def encoder_flops(cfg: VideoMAEConfig, num_tokens: int) -> int:
    """Patch embedding + ``encoder_depth`` blocks on ``num_tokens`` tokens."""
    blocks = cfg.encoder_depth * block_flops(num_tokens, cfg.encoder_width, cfg.encoder_mlp_hidden)
    return patch_embed_flops(cfg) + blocks


def _num_masked(cfg: VideoMAEConfig, mask_ratio: float | None) -> int:
    if mask_ratio is None:
        return cfg.num_masked
    return num_masked(*cfg.grid, check_mask_ratio(mask_ratio), cfg.mask_type)


def pretrain_forward_flops(cfg: VideoMAEConfig, mask_ratio: float | None = None) -> int:
    """Forward FLOPs of one pretraining clip (``mask_ratio`` defaults to ``cfg.mask_ratio``), with the decoder
    masking of ``cfg``."""
    masked = _num_masked(cfg, mask_ratio)
    visible = cfg.num_patches - masked
    kept = num_decoder_kept(*cfg.grid, cfg.decoder_mask_ratio, cfg.decoder_mask_type)
    decoded = masked if kept is None else kept
    enc = encoder_flops(cfg, visible)
    to_dec = 2 * visible * cfg.encoder_width * cfg.decoder_width
    dec = cfg.decoder_depth * block_flops(visible + decoded, cfg.decoder_width, cfg.decoder_mlp_hidden)
    head = 2 * decoded * cfg.decoder_width * cfg.patch_dim
    return enc + to_dec + dec + head


def pretrain_train_flops(cfg: VideoMAEConfig, mask_ratio: float | None = None) -> int:
    """Forward + backward FLOPs of one pretraining clip: 3x forward less the patch-embedding input gradient."""
    return 3 * pretrain_forward_flops(cfg, mask_ratio) - patch_embed_flops(cfg)


def classifier_forward_flops(cfg: VideoMAEConfig, num_classes: int) -> int:
    """Forward FLOPs of one finetuning/eval clip: encoder on all tokens + linear head."""
    return encoder_flops(cfg, cfg.num_patches) + 2 * cfg.encoder_width * num_classes


def param_counts(cfg: VideoMAEConfig) -> dict[str, int]:
    """Parameters of the pretraining model by part (built on the meta device: no memory, exact counts).
    ``encoder`` = ``encoder.*``; ``decoder`` = everything else (encoder_to_decoder, mask_token, decoder.*)."""
    with torch.device("meta"):
        model = VideoMAE(cfg)
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
    total = sum(p.numel() for p in model.parameters())
    return {"encoder": enc, "decoder": total - enc, "total": total}


def classifier_param_count(cfg: VideoMAEConfig, num_classes: int) -> int:
    with torch.device("meta"):
        model = VideoMAEClassifier(cfg, num_classes)
    return sum(p.numel() for p in model.parameters())
