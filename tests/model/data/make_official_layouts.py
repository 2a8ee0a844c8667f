"""Writes ``official_layouts.json``: the state-dict keys and shapes of the official checkpoints users download,
one entry per family, for the loader tests (``tests/model/test_official_layouts.py``).

Run from the repository root: ``.venv/bin/python tests/model/data/make_official_layouts.py``.

Why a generator and not real files: the official ``.pth`` files are 0.1-4 GB and behind download forms; their
layout is fixed by the model classes that wrote them. The layouts below were transcribed by reading those classes
(names of the submodules and parameters they register, and the sizes their registered constructors pass), not by
running or copying them, and not from this project's model code:

- MCG-NJU/VideoMAE ``modeling_pretrain.py``: ``PretrainVisionTransformer`` = ``encoder`` (``patch_embed.proj``
  Conv3d, ``blocks.N``, ``norm``; the sinusoid ``pos_embed`` is a plain tensor, not saved; ``head`` is Identity),
  ``decoder`` (``blocks.N``, ``norm``, ``head`` Linear to ``decoder_num_classes``), ``encoder_to_decoder`` (no
  bias), ``mask_token [1, 1, E]``. Sizes from ``pretrain_videomae_{small,base,large,huge}_patch16_224`` and
  ``run_mae_pretraining.py``'s ``--decoder_depth`` (4).
- MCG-NJU/VideoMAE ``modeling_finetune.py``: ``VisionTransformer`` = ``patch_embed.proj``, ``blocks.N``, then
  ``fc_norm`` with ``use_mean_pooling`` (``norm`` is Identity) or ``norm`` with ``--use_cls``; ``head``.
  ``Block`` = ``norm1``, ``attn`` (``qkv`` Linear without bias, ``q_bias``, ``v_bias``, ``proj``), ``norm2``,
  ``mlp`` (``fc1``, ``fc2``; hidden ``int(dim * mlp_ratio)``); no ``gamma_1/2`` with the default
  ``init_values=0``.
- OpenGVLab/VideoMAEv2 ``models/modeling_pretrain.py`` / ``modeling_finetune.py``: the same layout;
  ``pretrain_videomae_giant_patch14_224`` (patch 14, 1408 wide, depth 40, 16 heads, mlp_ratio 48/11, decoder 512 /
  8 heads, ``decoder_num_classes`` 1176, ``--decoder_depth 4`` in ``scripts/pretrain/vit_g_hybrid_pt.sh``),
  ``vit_giant_patch14_224`` and the distilled ``vit_small/base_patch16_224`` students of ``docs/MODEL_ZOO.md``
  (K710: 710 classes).
"""

from __future__ import annotations

import json
import pathlib

OUT = pathlib.Path(__file__).with_name("official_layouts.json")
VIT = {  # name: (width, depth, heads, mlp_ratio as (num, den), patch)
    "s": (384, 12, 6, (4, 1), 16),
    "b": (768, 12, 12, (4, 1), 16),
    "l": (1024, 24, 16, (4, 1), 16),
    "h": (1280, 32, 16, (4, 1), 16),
    "g": (1408, 40, 16, (48, 11), 14),
}
DECODER = {"s": (192, 3), "b": (384, 6), "l": (512, 8), "h": (640, 8), "g": (512, 8)}  # official pretrain_*


def hidden(width: int, ratio: tuple[int, int]) -> int:
    return int(width * (ratio[0] / ratio[1]))


def block(prefix: str, d: int, h: int) -> dict[str, list[int]]:
    return {
        f"{prefix}norm1.weight": [d],
        f"{prefix}norm1.bias": [d],
        f"{prefix}attn.q_bias": [d],
        f"{prefix}attn.v_bias": [d],
        f"{prefix}attn.qkv.weight": [3 * d, d],
        f"{prefix}attn.proj.weight": [d, d],
        f"{prefix}attn.proj.bias": [d],
        f"{prefix}norm2.weight": [d],
        f"{prefix}norm2.bias": [d],
        f"{prefix}mlp.fc1.weight": [h, d],
        f"{prefix}mlp.fc1.bias": [h],
        f"{prefix}mlp.fc2.weight": [d, h],
        f"{prefix}mlp.fc2.bias": [d],
    }


def trunk(prefix: str, size: str) -> dict[str, list[int]]:
    d, depth, _, ratio, p = VIT[size]
    keys = {f"{prefix}patch_embed.proj.weight": [d, 3, 2, p, p], f"{prefix}patch_embed.proj.bias": [d]}
    for i in range(depth):
        keys |= block(f"{prefix}blocks.{i}.", d, hidden(d, ratio))
    return keys


def pretrain(size: str, source: str, wrapper: str) -> dict:
    d, depth, heads, ratio, p = VIT[size]
    e, e_heads = DECODER[size]
    out = 2 * p * p * 3
    keys = trunk("encoder.", size) | {"encoder.norm.weight": [d], "encoder.norm.bias": [d]}
    for i in range(4):
        keys |= block(f"decoder.blocks.{i}.", e, hidden(e, ratio))
    keys |= {
        "decoder.norm.weight": [e],
        "decoder.norm.bias": [e],
        "decoder.head.weight": [out, e],
        "decoder.head.bias": [out],
        "encoder_to_decoder.weight": [e, d],
        "mask_token": [1, 1, e],
    }
    expect = dict(
        encoder_width=d, encoder_depth=depth, encoder_heads=heads, patch_size=p, tubelet_size=2, in_chans=3,
        encoder_mlp_hidden=hidden(d, ratio), qkv_bias=True, encoder_norm=True, decoder_width=e,
        decoder_depth=4, decoder_heads=e_heads, decoder_mlp_hidden=hidden(e, ratio),
    )  # fmt: skip
    return {"source": source, "wrapper": wrapper, "kind": "pretrain", "expect": expect, "keys": keys}


def finetune(size: str, classes: int, source: str, wrapper: str, mean_pooling: bool = True) -> dict:
    d, depth, heads, ratio, p = VIT[size]
    norm = "fc_norm" if mean_pooling else "norm"
    keys = trunk("", size) | {f"{norm}.weight": [d], f"{norm}.bias": [d]}
    keys |= {"head.weight": [classes, d], "head.bias": [classes]}
    expect = dict(
        encoder_width=d, encoder_depth=depth, encoder_heads=heads, patch_size=p, tubelet_size=2, in_chans=3,
        encoder_mlp_hidden=hidden(d, ratio), qkv_bias=True, use_mean_pooling=mean_pooling, num_classes=classes,
    )  # fmt: skip
    return {"source": source, "wrapper": wrapper, "kind": "classifier", "expect": expect, "keys": keys}


def families() -> dict[str, dict]:
    v1_pt = "MCG-NJU/VideoMAE modeling_pretrain.py pretrain_videomae_{}_patch16_224"
    v1_ft = "MCG-NJU/VideoMAE modeling_finetune.py vit_{}_patch16_224"
    names = {"s": "small", "b": "base", "l": "large", "h": "huge"}
    out = {}
    for size, name in names.items():
        out[f"videomae_pretrain_vit_{size}"] = pretrain(size, v1_pt.format(name), "model")
        out[f"videomae_finetune_vit_{size}"] = finetune(size, 400, v1_ft.format(name) + " (K400)", "module")
    out["videomae_finetune_vit_b_use_cls"] = finetune(
        "b", 174, v1_ft.format("base") + " --use_cls (SSv2)", "model", mean_pooling=False
    )
    v2 = "OpenGVLab/VideoMAEv2 models/"
    out["videomaev2_pretrain_vit_g14"] = pretrain(
        "g", v2 + "modeling_pretrain.py pretrain_videomae_giant_patch14_224", "model"
    )
    out["videomaev2_finetune_vit_g14"] = finetune(
        "g", 710, v2 + "modeling_finetune.py vit_giant_patch14_224 (K710)", "module"
    )
    for size, name in (("s", "small"), ("b", "base")):
        out[f"videomaev2_distill_vit_{size}"] = finetune(
            size,
            710,
            v2 + f"modeling_finetune.py vit_{name}_patch16_224 (vit_{size}_k710_dl_from_giant)",
            "module",
        )
    return out


if __name__ == "__main__":
    data = {"generated_by": "tests/model/data/make_official_layouts.py", "families": families()}
    OUT.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(data['families'])} families)")
