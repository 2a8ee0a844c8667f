"""Model checkpoints in three formats, from local paths or any fsspec URL.

- ``vmae`` (ours): a directory with ``model.safetensors`` and ``vmae.json`` (config, kind, head settings).
- ``hf``: a directory a ``transformers`` ``VideoMAEForPreTraining`` / ``VideoMAEForVideoClassification``
  loads with ``from_pretrained`` (``config.json`` + ``model.safetensors``).
- ``official``: an MCG-NJU VideoMAE ``.pth`` (pretraining or finetuning), state under ``model`` or ``module``;
  read with ``torch.load(weights_only=True)``. Such files carry no config: pass ``cfg`` or it is inferred from
  the weight shapes with the paper's 16x224x224 clip (positions are fixed sinusoids, so any clip size loads).

The config file is written after the weights, so a directory with a config is complete.
Training state (optimizer, data cursor, rng) is the pretrain job's business, not this module's.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from model.config import VideoMAEConfig
from model.keymaps import CLASSIFIER, PRETRAIN, detect_kind, from_hf, from_official, to_hf, to_official
from model.videomae import VideoMAE, VideoMAEClassifier
from pipeline.storage import exists, get_fs, join, read_bytes, write_bytes_atomic

FORMATS = ("vmae", "hf")
VMAE_META = "vmae.json"
WEIGHTS = "model.safetensors"
_HF_ARCH = {PRETRAIN: "VideoMAEForPreTraining", CLASSIFIER: "VideoMAEForVideoClassification"}
_HEADS_BY_WIDTH = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16}  # paper encoder/decoder widths

Model = VideoMAE | VideoMAEClassifier


def _unwrap(model: nn.Module) -> Model:
    model = getattr(model, "_orig_mod", model)  # torch.compile(model) wrapper
    if not isinstance(model, VideoMAE | VideoMAEClassifier):
        raise ValueError(f"model must be a VideoMAE or VideoMAEClassifier, got {type(model).__name__}")
    return model


def _kind(model: Model) -> str:
    return PRETRAIN if isinstance(model, VideoMAE) else CLASSIFIER


def _cpu_state(model: Model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under the official MCG-NJU key names (save as ``torch.save({"model": sd}, path)``)."""
    model = _unwrap(model)
    return to_official(_cpu_state(model), _kind(model))


def _hf_config(model: Model) -> dict:
    cfg = model.cfg
    out = {
        "architectures": [_HF_ARCH[_kind(model)]],
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
        "use_mean_pooling": isinstance(model, VideoMAEClassifier),
        "decoder_num_attention_heads": cfg.decoder_heads,
        "decoder_hidden_size": cfg.decoder_width,
        "decoder_num_hidden_layers": cfg.decoder_depth,
        "decoder_intermediate_size": cfg.decoder_mlp_hidden,
        "norm_pix_loss": cfg.norm_pix_loss,
        "torch_dtype": "float32",
    }
    if isinstance(model, VideoMAEClassifier):
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_classes)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(model.num_classes)}
    return out


def _config_from_hf(hf: dict, where: str) -> VideoMAEConfig:
    try:
        width, dec_width = int(hf["hidden_size"]), int(hf["decoder_hidden_size"])
        mlp_ratio = hf["intermediate_size"] / width
        if abs(hf["decoder_intermediate_size"] / dec_width - mlp_ratio) > 1e-9:
            raise ValueError("encoder and decoder MLP ratios differ (one mlp_ratio is supported)")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (gelu only)")
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
            qkv_bias=bool(hf.get("qv_bias", True)),
            norm_pix_loss=bool(hf.get("norm_pix_loss", True)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: not a usable VideoMAE config.json: {e}") from e


def save_checkpoint(model: nn.Module, url: str, *, format: str = "vmae") -> str:
    """Write ``model`` (full, unsharded state) as directory ``url`` in ``format`` ("vmae" or "hf"); returns
    ``url``. The config file is written last, so its presence marks a complete checkpoint."""
    if format not in FORMATS:
        raise ValueError(f"checkpoint format must be one of {FORMATS}, got {format!r}")
    model = _unwrap(model)
    state = _cpu_state(model)
    if format == "hf":
        tensors = {
            k: v.clone() for k, v in to_hf(state, _kind(model)).items()
        }  # split qkv views -> own storage
        write_bytes_atomic(join(url, WEIGHTS), st_save(tensors, metadata={"format": "pt"}))
        write_bytes_atomic(join(url, "config.json"), json.dumps(_hf_config(model), indent=2).encode())
        return url
    meta = {"format_version": 1, "kind": _kind(model), "config": dataclasses.asdict(model.cfg)}
    if isinstance(model, VideoMAEClassifier):
        meta.update(num_classes=model.num_classes, head_drop=model.head_drop.p)
    write_bytes_atomic(join(url, WEIGHTS), st_save(state, metadata={"format": "pt"}))
    write_bytes_atomic(join(url, VMAE_META), json.dumps(meta, indent=2).encode())
    return url


def _read_json(url: str) -> dict:
    try:
        return json.loads(read_bytes(url))
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}: not valid JSON: {e}") from e


def _read_safetensors(url: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(read_bytes(url))
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"{url}: not a readable safetensors file: {e}") from e


def _read_official(url: str) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and the other top-level entries (epoch, ...) of an official ``.pth``."""
    data = read_bytes(url)
    try:
        with torch.serialization.safe_globals(
            [argparse.Namespace]
        ):  # official files keep their argparse args
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt/foreign file
        raise ValueError(f"{url}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{url}: expected a dict, found {type(obj).__name__}")
    extra: dict = {}
    for wrapper in ("model", "module"):
        if isinstance(obj.get(wrapper), dict):
            extra = {k: v for k, v in obj.items() if k != wrapper and isinstance(v, int | float | str)}
            obj = obj[wrapper]
            break
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not obj:
        raise ValueError(f"{url}: expected a state dict of tensors; non-tensor entries {bad[:5]}")
    return obj, extra


def _count(state: dict, prefix: str) -> int:
    return len({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def infer_config(state: dict[str, torch.Tensor], kind: str, *, where: str = "state") -> VideoMAEConfig:
    """Architecture from weight shapes (our key names); clip size = paper default 16x224x224."""
    try:
        width, in_chans, tubelet, patch, _ = state["encoder.patch_embed.proj.weight"].shape
        fields = dict(
            patch_size=patch,
            tubelet_size=tubelet,
            in_chans=in_chans,
            encoder_width=width,
            encoder_depth=_count(state, "encoder.blocks."),
            encoder_heads=_HEADS_BY_WIDTH[width],
            mlp_ratio=state["encoder.blocks.0.mlp.fc1.weight"].shape[0] / width,
            qkv_bias="encoder.blocks.0.attn.q_bias" in state,
        )
        if kind == PRETRAIN:
            dec_width = state["encoder_to_decoder.weight"].shape[0]
            fields.update(
                decoder_width=dec_width,
                decoder_depth=_count(state, "decoder.blocks."),
                decoder_heads=_HEADS_BY_WIDTH[dec_width],
            )
        return VideoMAEConfig(**fields)
    except KeyError as e:
        raise ValueError(
            f"{where}: cannot infer the model config (missing {e} or a non-paper width); pass cfg="
        ) from e


def _build(kind: str, cfg: VideoMAEConfig, state: dict, head_drop: float = 0.0) -> Model:
    if kind == PRETRAIN:
        return VideoMAE(cfg)
    if "head.weight" not in state:
        raise ValueError("classifier state has no head.weight")
    return VideoMAEClassifier(cfg, int(state["head.weight"].shape[0]), head_drop=head_drop)


def _load_into(model: Model, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load with a ``ValueError`` that names the file and every missing/unexpected/mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{where}: checkpoint does not match {type(model).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}, shape mismatches {shapes}"
        )
    model.load_state_dict(state, strict=True)


def load_checkpoint(url: str, *, cfg: VideoMAEConfig | None = None) -> tuple[Model, dict]:
    """Load a ``vmae``/``hf`` directory or an official ``.pth`` file into a new ``VideoMAE`` (pretraining
    weights) or ``VideoMAEClassifier`` (finetuned weights). ``cfg`` overrides the stored/inferred config (its
    architecture must match the weights; clip size and objective settings may differ).

    Returns ``(model, meta)`` with ``meta = {"format", "kind", "url", "config_inferred", "extra"}``."""
    weights, vmae_meta, hf_cfg = join(url, WEIGHTS), join(url, VMAE_META), join(url, "config.json")
    fs, path = get_fs(url)
    is_dir = fs.isdir(path)
    if not is_dir and not fs.exists(path):
        raise ValueError(f"checkpoint {url!r} does not exist")
    extra: dict = {}
    inferred = False
    if is_dir and exists(vmae_meta):
        fmt, meta = "vmae", _read_json(vmae_meta)
        kind, state = meta.get("kind"), _read_safetensors(weights)
        try:
            stored = VideoMAEConfig(**meta["config"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{vmae_meta}: bad config: {e}") from e
        cfg = cfg or stored
        if kind not in (PRETRAIN, CLASSIFIER):
            raise ValueError(f"{vmae_meta}: kind must be {PRETRAIN!r} or {CLASSIFIER!r}, got {kind!r}")
        model = _build(kind, cfg, state, head_drop=float(meta.get("head_drop", 0.0)))
    elif is_dir and exists(hf_cfg):
        fmt, hf = "hf", _read_json(hf_cfg)
        raw = _read_safetensors(weights)
        kind = detect_kind(raw.keys())
        if kind == CLASSIFIER and not hf.get("use_mean_pooling", True):
            raise ValueError(f"{hf_cfg}: use_mean_pooling=false classifiers are not supported")
        state = from_hf(raw, kind)
        cfg = cfg or _config_from_hf(hf, hf_cfg)
        model = _build(kind, cfg, state)
        weights = url
    elif is_dir:
        raise ValueError(f"{url}: directory holds neither {VMAE_META} (vmae) nor config.json (hf)")
    else:
        fmt, weights = "official", url
        raw, extra = _read_official(url)
        kind = detect_kind(raw.keys())
        state = from_official(raw, kind)
        if cfg is None:
            cfg, inferred = infer_config(state, kind, where=url), True
        model = _build(kind, cfg, state)
    _load_into(model, state, weights)
    return model, {"format": fmt, "kind": kind, "url": url, "config_inferred": inferred, "extra": extra}
