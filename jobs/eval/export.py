"""``vmae export``: any checkpoint this project reads, written in one of the formats it writes.

Why: a model pretrained or finetuned here is finetuned/evaluated elsewhere (Hugging Face transformers, the
MCG-NJU / OpenGVLab scripts), and downloaded checkpoints come in all three formats; one command converts.

    vmae export runs/vit_b_k400 --format official --output vit_b_k400.pth
    vmae export videomae_base_k400.pth --format hf --output hf/videomae-base
    vmae export vit_g_hybrid_pt_1200e.pth --format vmae --output vit_g --model vit_g

The input is whatever ``jobs.train.checkpointing.load_any_checkpoint`` reads (a ``vmae``/``hf`` directory, an official
``.pth``, a training run or one of its step checkpoints). An official file's architecture is inferred from its
weights; ``--model``/``--set`` give it instead (e.g. non-conventional head counts).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jobs.config import apply_overrides, from_dict
from jobs.train.checkpointing import load_any_checkpoint
from model.checkpoint import FORMATS, save_checkpoint
from model.config import VideoMAEConfig, get_config
from pipeline import storage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="checkpoint to read: directory, .pth file or run directory (any URL)"
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="format to write")
    parser.add_argument(
        "--output", required=True, help="directory (vmae, hf) or .pth file (official) to write; any URL"
    )
    parser.add_argument(
        "--model", default=None, help="architecture of an official .pth (a model config name)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of --model's config (repeatable), e.g. --set encoder_heads=8",
    )


def _cfg(args: argparse.Namespace) -> VideoMAEConfig | None:
    if args.model is None:
        if args.overrides:
            raise ValueError("--set needs --model")
        return None
    base = dataclasses.asdict(get_config(args.model))
    return from_dict(VideoMAEConfig, apply_overrides(base, args.overrides), where=f"model {args.model}")


def run(args: argparse.Namespace) -> int:
    try:
        if storage.exists(args.output):  # never mix two checkpoints in one directory
            raise ValueError(f"output {args.output!r} already exists")
        model, meta = load_any_checkpoint(args.checkpoint, cfg=_cfg(args))
        save_checkpoint(model, args.output, format=args.format)
    except (ValueError, OSError) as e:
        print(f"vmae export: error: {e}", file=sys.stderr)
        return 2
    cfg = model.cfg
    print(
        f"exported {meta['kind']} ({meta['format']}, {cfg.encoder_width} wide x {cfg.encoder_depth} blocks, "
        f"patch {cfg.patch_size}{', config inferred' if meta['config_inferred'] else ''}) "
        f"{args.checkpoint} -> {args.output} ({args.format})"
    )
    return 0
