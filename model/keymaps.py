"""State-dict key mappings between our modules, the official MCG-NJU VideoMAE ``.pth`` files and Hugging Face
``VideoMAEForPreTraining`` / ``VideoMAEForVideoClassification``. Written once, used by load and save.

Our names are the official pretraining names (MCG-NJU VideoMAE and OpenGVLab VideoMAE V2 share one layout), so
the official pretrain mapping is the identity; official finetune files drop the ``encoder.`` prefix (their final
``norm`` of the ``--use_cls`` variant is our ``encoder.norm``). Hugging Face splits the fused ``qkv`` weight
``[3D, D]`` into ``query/key/value`` ``[D, D]`` each; the key has no bias, ``q_bias``/``v_bias`` are written under
the Hub's names (``attention.attention.q_bias``), which transformers 4.x loads as parameters and 5.x renames on
load to ``query.bias``/``value.bias``; both spellings are read here, so the biases survive either way.
"""

from __future__ import annotations

import re

import torch

PRETRAIN = "pretrain"
CLASSIFIER = "classifier"

# our block-internal suffix -> HF layer suffix (qkv handled separately)
_BLOCK_TO_HF = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_HF_TO_BLOCK = {v: k for k, v in _BLOCK_TO_HF.items()}
_TOP_TO_HF = {
    PRETRAIN: {
        "encoder.patch_embed.proj": "videomae.embeddings.patch_embeddings.projection",
        "encoder.norm": "videomae.layernorm",
        "encoder_to_decoder": "encoder_to_decoder",
        "mask_token": "mask_token",
        "decoder.norm": "decoder.norm",
        "decoder.head": "decoder.head",
    },
    CLASSIFIER: {
        "encoder.patch_embed.proj": "videomae.embeddings.patch_embeddings.projection",
        "encoder.norm": "videomae.layernorm",  # use_mean_pooling=false: final norm, first token
        "fc_norm": "fc_norm",
        "head": "classifier",
    },
}
_BLOCK_PREFIX_TO_HF = {
    "encoder.blocks.": "videomae.encoder.layer.",
    "decoder.blocks.": "decoder.decoder_layers.",
}


def detect_kind(keys: list[str] | set[str]) -> str:
    """``pretrain`` or ``classifier`` from any of our / official / HF key sets; ``ValueError`` if neither."""
    keys = set(keys)
    if any(k.startswith(("decoder.", "encoder_to_decoder")) for k in keys):
        return PRETRAIN
    if any(k in keys for k in ("head.weight", "classifier.weight")):
        return CLASSIFIER
    raise ValueError(
        f"cannot tell a VideoMAE pretraining from a classifier state; keys start {sorted(keys)[:6]}"
    )


# ---- official -----------------------------------------------------------------------------------------------
def to_official(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Our state dict -> official key names (``encoder.`` dropped for the finetune layout)."""
    if kind == PRETRAIN:
        return dict(state)
    return {k.removeprefix("encoder."): v for k, v in state.items()}


def from_official(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Official key names -> ours. Finetune keys other than ``fc_norm``/``head`` gain the ``encoder.`` prefix."""
    if kind == PRETRAIN:
        return dict(state)
    return {(k if k.split(".")[0] in ("fc_norm", "head") else f"encoder.{k}"): v for k, v in state.items()}


# ---- Hugging Face -------------------------------------------------------------------------------------------
def to_hf(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names; fused ``qkv`` split into query/key/value (unknown keys raise)."""
    top = _TOP_TO_HF[kind]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name, _, leaf = key.rpartition(".")
        m = re.match(r"^((?:encoder|decoder)\.blocks\.)(\d+)\.(.+)$", key)
        if m:
            prefix = _BLOCK_PREFIX_TO_HF[m.group(1)] + m.group(2) + "."
            inner = m.group(3)
            if inner == "attn.qkv.weight":
                q, k, v = value.chunk(3, dim=0)
                for part, w in (("query", q), ("key", k), ("value", v)):
                    out[f"{prefix}attention.attention.{part}.weight"] = w
            elif inner in ("attn.q_bias", "attn.v_bias"):
                out[prefix + "attention.attention." + inner.split(".")[1]] = value
            else:
                sub, _, leaf = inner.rpartition(".")
                if sub not in _BLOCK_TO_HF:
                    raise ValueError(f"no Hugging Face name for parameter {key!r}")
                out[f"{prefix}{_BLOCK_TO_HF[sub]}.{leaf}"] = value
        elif key in top:
            out[top[key]] = value
        elif name in top:
            out[f"{top[name]}.{leaf}"] = value
        else:
            raise ValueError(f"no Hugging Face name for parameter {key!r}")
    return out


def from_hf(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """HF names -> ours; query/key/value fused back into ``qkv`` (a non-zero key bias cannot be represented and
    raises). Keys without a counterpart are kept unchanged so the caller can report them as unexpected."""
    top = {v: k for k, v in _TOP_TO_HF[kind].items()}
    hf_prefix = {v: k for k, v in _BLOCK_PREFIX_TO_HF.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"^(videomae\.encoder\.layer\.|decoder\.decoder_layers\.)(\d+)\.(.+)$", key)
        name, _, leaf = key.rpartition(".")
        if m:
            prefix = hf_prefix[m.group(1)] + m.group(2) + "."
            inner = m.group(3)
            a = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", inner)
            if a and a.group(2) == "weight":
                qkv.setdefault(prefix, {})[a.group(1)] = value
            elif a and a.group(1) == "key":
                if bool(value.any()):
                    raise ValueError(f"{key}: a non-zero key bias has no place in the official qkv layout")
            elif a or inner in ("attention.attention.q_bias", "attention.attention.v_bias"):
                which = "q_bias" if ("q_bias" in inner or "query" in inner) else "v_bias"
                out[f"{prefix}attn.{which}"] = value
            else:
                sub, _, leaf = inner.rpartition(".")
                out[f"{prefix}{_HF_TO_BLOCK[sub]}.{leaf}" if sub in _HF_TO_BLOCK else key] = value
        elif key in top:
            out[top[key]] = value
        elif name in top:
            out[f"{top[name]}.{leaf}"] = value
        else:
            out[key] = value
    for prefix, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"{prefix}: attention has {sorted(parts)} weights, needs query, key and value")
        out[f"{prefix}attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out
