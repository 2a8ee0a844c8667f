"""``vmae model-info``: parameter counts and analytic FLOPs per clip of a model config.

Why: sizing runs (memory, MFU, cost) starts from these numbers; the pretrain job's MFU uses the same
``model.flops`` functions, so what is printed here is what training reports against.

    vmae model-info --model vit_b --mask-ratio 0.9
    vmae model-info --model tiny --set num_frames=8 --json
    vmae model-info --model vit_g --set decoder_mask_type=run_cell --set decoder_mask_ratio=0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from jobs.config import apply_overrides, from_dict
from model.config import CONFIGS, VideoMAEConfig, get_config
from model.flops import (
    classifier_forward_flops,
    classifier_param_count,
    param_counts,
    pretrain_forward_flops,
    pretrain_train_flops,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="vit_b", choices=sorted(CONFIGS), help="model config name")
    parser.add_argument("--mask-ratio", type=float, default=None, help="override the config's mask ratio")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field (repeatable), e.g. --set num_frames=8",
    )
    parser.add_argument("--num-classes", type=int, default=400, help="classes for the finetuning numbers")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def model_info(cfg: VideoMAEConfig, num_classes: int) -> dict:
    """All numbers ``vmae model-info`` prints, as a dict (FLOPs per clip; 2 FLOPs per multiply-add)."""
    params = param_counts(cfg)
    t, h, w = cfg.grid
    full = dataclasses.replace(cfg, decoder_mask_type="none", decoder_mask_ratio=0.0)
    return {
        "config": dataclasses.asdict(cfg),
        "tokens": {
            "grid": [t, h, w],
            "total": cfg.num_patches,
            "masked": cfg.num_masked,
            "decoded": cfg.num_decoded,
        },
        "params": {**params, "classifier": classifier_param_count(cfg, num_classes)},
        "gflops_per_clip": {
            "pretrain_forward": pretrain_forward_flops(cfg) / 1e9,
            "pretrain_fwd_bwd": pretrain_train_flops(cfg) / 1e9,
            "classifier_forward": classifier_forward_flops(cfg, num_classes) / 1e9,
            "pretrain_fwd_bwd_without_decoder_mask": pretrain_train_flops(full) / 1e9,
        },
        "num_classes": num_classes,
    }


def run(args: argparse.Namespace) -> int:
    base = dataclasses.asdict(get_config(args.model))
    overrides = list(args.overrides)
    if args.mask_ratio is not None:
        overrides.append(f"mask_ratio={args.mask_ratio}")
    try:
        cfg = from_dict(VideoMAEConfig, apply_overrides(base, overrides), where=f"model {args.model}")
        if args.num_classes <= 0:
            raise ValueError(f"--num-classes must be positive, got {args.num_classes}")
    except ValueError as e:
        print(f"vmae model-info: error: {e}", file=sys.stderr)
        return 2
    info = model_info(cfg, args.num_classes)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p, g, tok = info["params"], info["gflops_per_clip"], info["tokens"]
    c, f, s = cfg.num_frames, cfg.img_size, cfg.patch_size
    print(
        f"model {args.model}: {c}x{f}x{f} clip, patch {s}, tubelet {cfg.tubelet_size}, "
        f"mask {cfg.mask_type} {cfg.mask_ratio}"
    )
    print(
        f"tokens        {tok['total']} ({'x'.join(map(str, tok['grid']))}), {tok['masked']} masked, "
        f"{tok['total'] - tok['masked']} visible"
    )
    print(
        f"params        encoder {p['encoder'] / 1e6:.2f} M | decoder {p['decoder'] / 1e6:.2f} M | "
        f"total {p['total'] / 1e6:.2f} M | classifier ({args.num_classes} classes) {p['classifier'] / 1e6:.2f} M"
    )
    print(
        f"GFLOPs/clip   pretrain fwd {g['pretrain_forward']:.2f} | pretrain fwd+bwd {g['pretrain_fwd_bwd']:.2f} | "
        f"classifier fwd {g['classifier_forward']:.2f}  (2 FLOPs per multiply-add)"
    )
    if cfg.decoder_mask_type != "none":
        without = g["pretrain_fwd_bwd_without_decoder_mask"]
        print(
            f"decoder mask  {cfg.decoder_mask_type} {cfg.decoder_mask_ratio}: decoder reconstructs "
            f"{tok['decoded']} tokens instead of {tok['masked']}; pretrain fwd+bwd {g['pretrain_fwd_bwd']:.2f} vs "
            f"{without:.2f} GFLOPs ({g['pretrain_fwd_bwd'] / without - 1:+.1%})"
        )
    return 0
