"""The architecture of a foreign checkpoint: from weight shapes (official ``.pth`` files carry no config) and
to/from a Hugging Face ``config.json``.

Weights fix the widths, depths, MLP hidden sizes, patch and tubelet (the tubelet Conv3d kernel), the prediction
size, whether attention has q/v biases and which final norm there is. They do not fix the head counts: those follow
the family's convention — the official sizes (``model.config.CONFIGS``: ViT-H uses 16 heads of 80, ViT-g 16 of
88, the ViT-S decoder 3 of 64 ...) and otherwise 64 per head — unless ``cfg`` says otherwise. Nor the clip size
(positions are fixed sinusoids): the file's training ``args`` when it has them, else the paper's 16x224x224.

Keys here are ours (``model.keymaps`` maps foreign names first).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from model.config import CONFIGS, VideoMAEConfig
from model.keymaps import CLASSIFIER, PRETRAIN

HEAD_DIM = 64  # ViT convention for widths outside the official sizes
_ARGS_FIELDS = {  # official run_mae_pretraining / run_class_finetuning argument -> our config field
    "num_frames": "num_frames",
    "input_size": "img_size",
    "mask_ratio": "mask_ratio",
    "mask_type": "mask_type",
    "decoder_mask_type": "decoder_mask_type",
    "decoder_mask_ratio": "decoder_mask_ratio",
    "normlize_target": "norm_pix_loss",
}


def _official_heads() -> dict[int, int]:
    table: dict[int, int] = {}
    for name, make in CONFIGS.items():
        if name == "tiny":  # our debug size, not a published family
            continue
        cfg = make()
        table[cfg.encoder_width] = cfg.encoder_heads
        table[cfg.decoder_width] = cfg.decoder_heads
    return table


def convention_heads(width: int) -> int | None:
    """Heads of a ``width``-wide official ViT, else ``width / 64``; ``None`` when neither applies."""
    heads = _official_heads().get(width)
    if heads is None and width % HEAD_DIM == 0:
        heads = width // HEAD_DIM
    return heads


def mlp_ratio_for(pairs: list[tuple[int, int]]) -> float | None:
    """One ``mlp_ratio`` with ``int(width * ratio) == hidden`` for every ``(width, hidden)`` pair (the official
    ``int(dim * mlp_ratio)``), e.g. 4.0, or 48/11 for ViT-g (6144 of 1408, 2234 of 512); ``None`` if none does."""
    lo = max(hidden / width for width, hidden in pairs)
    hi = min((hidden + 1) / width for width, hidden in pairs)
    for ratio in [hidden / width for width, hidden in pairs] + [lo, (lo + hi) / 2]:
        if all(int(width * ratio) == hidden for width, hidden in pairs):
            return ratio
    return None


def _depth(state: dict[str, torch.Tensor], prefix: str, problems: list[str]) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if found and found != set(range(len(found))):
        problems.append(f"{prefix}N: block indices {sorted(found)} are not 0..{len(found) - 1}")
    return len(found)


def _shape(state: dict[str, torch.Tensor], key: str, problems: list[str]) -> tuple[int, ...] | None:
    if key not in state:
        problems.append(f"no {key}")
        return None
    return tuple(state[key].shape)


def _heads(width: int, field: str, problems: list[str]) -> int:
    heads = convention_heads(width)
    if heads is None:
        problems.append(f"{field}: width {width} is neither an official size nor a multiple of {HEAD_DIM}")
    return heads or 1


def _stack(
    state: dict[str, torch.Tensor], prefix: str, side: str, problems: list[str]
) -> tuple[int, int, bool | None]:
    """Depth, MLP hidden and q/v-bias presence of block stack ``prefix`` (checked the same in every block)."""
    depth = _depth(state, prefix, problems)
    if depth == 0:
        problems.append(f"no {side} blocks ({prefix}0...)")
        return 0, 0, None
    hidden = {
        state[f"{prefix}{i}.mlp.fc1.weight"].shape[0]
        for i in range(depth)
        if f"{prefix}{i}.mlp.fc1.weight" in state
    }
    biases = {
        f"{prefix}{i}.attn.q_bias" in state and f"{prefix}{i}.attn.v_bias" in state for i in range(depth)
    }
    if len(hidden) != 1:
        problems.append(f"{side} blocks have MLP hidden sizes {sorted(hidden)}; one is supported")
    if len(biases) != 1:
        problems.append(f"{side} blocks differ in having attn.q_bias/v_bias")
    return depth, min(hidden, default=0), next(iter(biases)) if len(biases) == 1 else None


def clip_from_args(args: dict[str, Any]) -> dict[str, Any]:
    """Config fields an official checkpoint's saved ``args`` fix (clip size, masking, target); others ignored."""
    out = {ours: args[theirs] for theirs, ours in _ARGS_FIELDS.items() if args.get(theirs) is not None}
    if not out.get("decoder_mask_ratio"):  # VideoMAE V2 keeps type "run_cell" with ratio 0 for "none"
        out.pop("decoder_mask_ratio", None)
        out.pop("decoder_mask_type", None)
    return out


def infer_config(
    state: dict[str, torch.Tensor], kind: str, *, where: str = "state", args: dict[str, Any] | None = None
) -> VideoMAEConfig:
    """Architecture of ``state`` (our key names, ``kind`` ``pretrain``/``classifier``) from its shapes; clip and
    masking from ``args`` (an official file's saved arguments) or the paper's. One ``ValueError`` naming every
    ambiguity and ``where``."""
    problems: list[str] = []
    fields: dict[str, Any] = {}
    proj = _shape(state, "encoder.patch_embed.proj.weight", problems)
    if proj is not None and (len(proj) != 5 or proj[3] != proj[4]):
        problems.append(f"encoder.patch_embed.proj.weight {list(proj)} is not a square-patch Conv3d kernel")
    elif proj is not None:
        width, in_chans, tubelet, patch, _ = proj
        depth, hidden, qkv_bias = _stack(state, "encoder.blocks.", "encoder", problems)
        fields.update(
            patch_size=patch,
            tubelet_size=tubelet,
            in_chans=in_chans,
            encoder_width=width,
            encoder_depth=depth,
            encoder_heads=_heads(width, "encoder_heads", problems),
            qkv_bias=bool(qkv_bias),
            img_size=224 if 224 % patch == 0 else patch * max(1, round(224 / patch)),
        )
        pairs = [(width, hidden)]
        if kind == PRETRAIN:
            fields["encoder_norm"] = "encoder.norm.weight" in state
            dec = _shape(state, "encoder_to_decoder.weight", problems)
            head = _shape(state, "decoder.head.weight", problems)
            if dec is not None:
                dec_depth, dec_hidden, dec_bias = _stack(state, "decoder.blocks.", "decoder", problems)
                fields.update(
                    decoder_width=dec[0],
                    decoder_depth=dec_depth,
                    decoder_heads=_heads(dec[0], "decoder_heads", problems),
                )
                pairs.append((dec[0], dec_hidden))
                if dec_bias is not None and qkv_bias is not None and dec_bias != qkv_bias:
                    problems.append("encoder and decoder differ in having q/v biases (one qkv_bias)")
            patch_dim = tubelet * patch * patch * in_chans
            if head is not None and head[0] != patch_dim:
                problems.append(
                    f"decoder.head predicts {head[0]} values per token, the patch embedding's "
                    f"{tubelet}x{patch}x{patch}x{in_chans} tubelet has {patch_dim}"
                )
        else:
            fc_norm, final_norm = "fc_norm.weight" in state, "encoder.norm.weight" in state
            if fc_norm == final_norm:
                problems.append(
                    "classifier pooling: both fc_norm and a final norm"
                    if fc_norm
                    else "classifier pooling: neither fc_norm (mean pooling) nor a final norm (first token)"
                )
            fields["use_mean_pooling"] = fc_norm
        if all(h > 0 for _, h in pairs):
            ratio = mlp_ratio_for(pairs)
            if ratio is None:
                problems.append(f"MLP hidden sizes {pairs} (width, hidden) fit no single mlp_ratio")
            fields["mlp_ratio"] = ratio or 4.0
    if not problems:
        try:
            return VideoMAEConfig(**{**fields, **clip_from_args(args or {})})
        except (TypeError, ValueError) as e:
            problems.append(f"{e} (with the file's args {clip_from_args(args or {})})")
    raise ValueError(f"{where}: cannot determine the model architecture: {'; '.join(problems)}; pass cfg=")


# ---- Hugging Face config.json --------------------------------------------------------------------------------
def hf_config(cfg: VideoMAEConfig, kind: str, num_classes: int | None = None) -> dict[str, Any]:
    """``config.json`` for ``VideoMAEForPreTraining`` / ``VideoMAEForVideoClassification``. HF's
    ``use_mean_pooling`` drops the encoder's final norm in both; for pretraining that is our ``encoder_norm``."""
    arch = "VideoMAEForPreTraining" if kind == PRETRAIN else "VideoMAEForVideoClassification"
    out = {
        "architectures": [arch],
        "model_type": "videomae",
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "num_frames": cfg.num_frames,
        "tubelet_size": cfg.tubelet_size,
        "hidden_size": cfg.encoder_width,
        "num_hidden_layers": cfg.encoder_depth,
        "num_attention_heads": cfg.encoder_heads,
        "intermediate_size": cfg.encoder_mlp_hidden,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "qv_bias": cfg.qkv_bias,
        "use_mean_pooling": cfg.use_mean_pooling if kind == CLASSIFIER else not cfg.encoder_norm,
        "decoder_num_attention_heads": cfg.decoder_heads,
        "decoder_hidden_size": cfg.decoder_width,
        "decoder_num_hidden_layers": cfg.decoder_depth,
        "decoder_intermediate_size": cfg.decoder_mlp_hidden,
        "norm_pix_loss": cfg.norm_pix_loss,
        "torch_dtype": "float32",
    }
    if kind == CLASSIFIER:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_classes)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(num_classes)}
    return out


def config_from_hf(hf: dict[str, Any], kind: str, where: str) -> VideoMAEConfig:
    """Our config from a ``config.json`` (transformers' defaults for absent keys: q/v bias, mean pooling)."""
    try:
        width, dec_width = int(hf["hidden_size"]), int(hf["decoder_hidden_size"])
        pairs = [(width, int(hf["intermediate_size"])), (dec_width, int(hf["decoder_intermediate_size"]))]
        mlp_ratio = mlp_ratio_for(pairs)
        if mlp_ratio is None:
            raise ValueError(f"intermediate sizes {pairs} (width, hidden) fit no single mlp_ratio")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (gelu only)")
        mean_pooling = bool(hf.get("use_mean_pooling", True))
        return VideoMAEConfig(
            img_size=int(hf["image_size"]),
            patch_size=int(hf["patch_size"]),
            num_frames=int(hf["num_frames"]),
            tubelet_size=int(hf["tubelet_size"]),
            in_chans=int(hf["num_channels"]),
            encoder_width=width,
            encoder_depth=int(hf["num_hidden_layers"]),
            encoder_heads=int(hf["num_attention_heads"]),
            decoder_width=dec_width,
            decoder_depth=int(hf["decoder_num_hidden_layers"]),
            decoder_heads=int(hf["decoder_num_attention_heads"]),
            mlp_ratio=mlp_ratio,
            qkv_bias=bool(hf.get("qv_bias", hf.get("qkv_bias", True))),
            norm_pix_loss=bool(hf.get("norm_pix_loss", True)),
            use_mean_pooling=mean_pooling if kind == CLASSIFIER else True,
            encoder_norm=not mean_pooling if kind == PRETRAIN else True,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: not a usable VideoMAE config.json: {e}") from e
