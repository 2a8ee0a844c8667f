"""Independent reference for the official VideoMAE / VideoMAE V2 computations, written as plain functions over a
state dict with the official key names (never through this project's modules or key maps).

It restates, from reading MCG-NJU/VideoMAE ``modeling_finetune.py``/``modeling_pretrain.py`` and OpenGVLab/VideoMAEv2
``models/`` + ``engine_for_pretraining.py``: explicit softmax attention with a zero key bias, boolean-mask indexing
``x[~mask].reshape(B, -1, C)``, the numpy sinusoid table, and VideoMAE V2's dual-masking loss (mean over the
decoder-kept tokens the encoder did not see).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def sinusoid(n: int, d: int) -> torch.Tensor:
    table = np.array([[pos / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for pos in range(n)])
    table[:, 0::2], table[:, 1::2] = np.sin(table[:, 0::2]), np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float32)[None]


def _ln(x, sd, name, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _block(x, sd, p, heads):
    h = _ln(x, sd, p + "norm1")
    B, N, _ = h.shape
    bias = None
    if p + "attn.q_bias" in sd:
        bias = torch.cat(
            [sd[p + "attn.q_bias"], torch.zeros_like(sd[p + "attn.v_bias"]), sd[p + "attn.v_bias"]]
        )
    qkv = F.linear(h, sd[p + "attn.qkv.weight"], bias).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, -1)
    x = x + F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    h = F.gelu(F.linear(_ln(x, sd, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
    return x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])


def _depth(sd, prefix):
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


def _embed(sd, prefix, video):
    w = sd[prefix + "patch_embed.proj.weight"]
    x = F.conv3d(video, w, sd[prefix + "patch_embed.proj.bias"], stride=tuple(w.shape[2:]))
    x = x.flatten(2).transpose(1, 2)
    return x + sinusoid(x.shape[1], x.shape[2])


def finetune_logits(sd, video, heads):
    """``VisionTransformer.forward``: mean pooling + fc_norm when the file has ``fc_norm``, else norm + token 0."""
    x = _embed(sd, "", video)
    for i in range(_depth(sd, "blocks.")):
        x = _block(x, sd, f"blocks.{i}.", heads)
    x = _ln(x.mean(1), sd, "fc_norm") if "fc_norm.weight" in sd else _ln(x, sd, "norm")[:, 0]
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def pretrain_pred(sd, video, mask, heads, decoder_heads, decode_mask=None):
    """``PretrainVisionTransformer.forward(x, mask, decode_mask)`` of VideoMAE V2 (V1 is ``decode_mask=None``)."""
    x = _embed(sd, "encoder.", video)
    B, _, C = x.shape
    x = x[~mask].reshape(B, -1, C)
    for i in range(_depth(sd, "encoder.blocks.")):
        x = _block(x, sd, f"encoder.blocks.{i}.", heads)
    if "encoder.norm.weight" in sd:
        x = _ln(x, sd, "encoder.norm")
    x = F.linear(x, sd["encoder_to_decoder.weight"])
    E = x.shape[-1]
    pos = sinusoid(mask.shape[1], E).expand(B, -1, -1)
    decode_vis = mask if decode_mask is None else ~decode_mask
    pos_vis, pos_dec = pos[~mask].reshape(B, -1, E), pos[decode_vis].reshape(B, -1, E)
    x = torch.cat([x + pos_vis, sd["mask_token"] + pos_dec], dim=1)
    for i in range(_depth(sd, "decoder.blocks.")):
        x = _block(x, sd, f"decoder.blocks.{i}.", decoder_heads)
    x = _ln(x[:, -pos_dec.shape[1] :], sd, "decoder.norm")
    return F.linear(x, sd["decoder.head.weight"], sd["decoder.head.bias"])


def pretrain_loss(video, mask, pred, patch, tubelet, decode_mask=None):
    """``engine_for_pretraining.train_one_epoch``'s normalised-pixel loss; without ``decode_mask`` the official
    data pipeline passes ``decode_mask = ~mask``."""
    decode_mask = ~mask if decode_mask is None else decode_mask
    unnorm = (
        video * torch.tensor(STD)[None, :, None, None, None] + torch.tensor(MEAN)[None, :, None, None, None]
    )
    sq = rearrange(
        unnorm, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=tubelet, p1=patch, p2=patch
    )
    norm = (sq - sq.mean(dim=-2, keepdim=True)) / (sq.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    patches = rearrange(norm, "b n p c -> b n (p c)")
    B, _, P = patches.shape
    labels = patches[~decode_mask].reshape(B, -1, P)
    loss = ((pred - labels) ** 2).mean(dim=-1)
    weight = mask[~decode_mask].reshape(B, -1)
    return (loss * weight).sum() / weight.sum()
