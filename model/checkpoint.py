"""Model checkpoints in three formats, from local paths or any fsspec URL.

- ``vmae`` (ours): a directory with ``model.safetensors`` and ``vmae.json`` (config, kind, head settings).
- ``hf``: a directory a ``transformers`` ``VideoMAEForPreTraining`` / ``VideoMAEForVideoClassification``
  loads with ``from_pretrained`` (``config.json`` + ``model.safetensors``), ``use_mean_pooling`` true or false.
- ``official``: a ``.pth`` of MCG-NJU VideoMAE or OpenGVLab VideoMAE V2 (pretraining or finetuning, ViT-S to
  ViT-g/14), state under ``model`` or ``module``; read with ``torch.load(weights_only=True)``. Such files carry no
  config: pass ``cfg`` or it is inferred from the weight shapes (``model.infer``). Written as
  ``{"model": state_dict}`` under the official names, which the official finetuning scripts load (they take
  ``model|module``, strip ``encoder.`` and load non-strictly).

The config file is written after the weights, so a directory with a config is complete.
Training state (optimizer, data cursor, rng) is the pretrain job's business, not this module's.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from model.config import VideoMAEConfig
from model.infer import config_from_hf, hf_config, infer_config
from model.keymaps import CLASSIFIER, PRETRAIN, detect_kind, from_hf, from_official, to_hf, to_official
from model.videomae import VideoMAE, VideoMAEClassifier
from pipeline.storage import exists, get_fs, join, read_bytes, write_bytes_atomic

FORMATS = ("vmae", "hf", "official")
LINEAGE_PTH = "vmae_lineage"  # the key in an official .pth / HF config.json
VMAE_META = "vmae.json"
WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
HF_LEGACY_WEIGHTS = "pytorch_model.bin"
_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers in saved state dicts

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
    """Our weights under the official key names (``save_checkpoint(..., format="official")`` writes them)."""
    model = _unwrap(model)
    return to_official(_cpu_state(model), _kind(model))


def save_checkpoint(model: nn.Module, url: str, *, format: str = "vmae", lineage: dict | None = None) -> str:
    """Write ``model`` (full, unsharded state) to ``url`` in ``format``: a directory for "vmae"/"hf", a ``.pth``
    file for "official"; returns ``url``. A directory's config file is written last, so its presence marks a
    complete checkpoint. An official pretraining file of an ``encoder_norm=False`` model has no
    ``encoder.norm`` (the official finetuning loads it; the official pretraining class would not).

    ``lineage`` (JSON-able, ``jobs.train.lineage``) is stored with the weights: ``vmae.json``'s ``lineage``, the HF
    ``config.json``'s ``vmae_lineage`` (transformers keeps unknown keys), the ``.pth``'s ``vmae_lineage`` (a
    JSON string, so ``weights_only`` loading reads it); :func:`read_lineage` gets it back."""
    if format not in FORMATS:
        raise ValueError(f"checkpoint format must be one of {FORMATS}, got {format!r}")
    model = _unwrap(model)
    state = _cpu_state(model)
    kind = _kind(model)
    if format != "vmae" and kind == CLASSIFIER and model.cfg.classifier_pool != "mean":
        raise ValueError(
            f"{url}: a classifier with classifier_pool={model.cfg.classifier_pool!r} has no {format} layout "
            "(its head reads T' pooled slices); save it as vmae"
        )
    if format == "official":
        buffer = io.BytesIO()
        obj = {"model": to_official(state, kind)}
        if lineage is not None:
            obj[LINEAGE_PTH] = json.dumps(lineage, sort_keys=True)
        torch.save(obj, buffer)
        write_bytes_atomic(url, buffer.getvalue())
        return url
    if format == "hf":
        tensors = {k: v.clone() for k, v in to_hf(state, kind).items()}  # split qkv views -> own storage
        num_classes = model.num_classes if kind == CLASSIFIER else None
        write_bytes_atomic(join(url, WEIGHTS), st_save(tensors, metadata={"format": "pt"}))
        config = hf_config(model.cfg, kind, num_classes)
        if lineage is not None:
            config[LINEAGE_PTH] = lineage
        write_bytes_atomic(join(url, HF_CONFIG), json.dumps(config, indent=2).encode())
        return url
    meta = {"format_version": 1, "kind": kind, "config": dataclasses.asdict(model.cfg)}
    if isinstance(model, VideoMAEClassifier):
        meta.update(num_classes=model.num_classes, head_drop=model.head_drop.p)
    if lineage is not None:
        meta["lineage"] = lineage
    write_bytes_atomic(join(url, WEIGHTS), st_save(state, metadata={"format": "pt"}))
    write_bytes_atomic(join(url, VMAE_META), json.dumps(meta, indent=2).encode())
    return url


def _read_json(url: str) -> dict:
    try:
        return json.loads(read_bytes(url))
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}: not valid JSON: {e}") from e


def _read_safetensors(url: str) -> dict[str, torch.Tensor]:
    if not exists(url):
        raise ValueError(f"{url}: missing (an incomplete checkpoint directory)")
    try:
        return st_load(read_bytes(url))
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"{url}: not a readable safetensors file: {e}") from e


def _read_hf_weights(url: str) -> tuple[dict[str, torch.Tensor], str]:
    """Weights of a Hugging Face directory and the file they came from: ``model.safetensors``, its sharded
    form (``model.safetensors.index.json``) or a legacy ``pytorch_model.bin`` (read with weights_only)."""
    index = join(url, WEIGHTS + ".index.json")
    if not exists(join(url, WEIGHTS)) and exists(index):
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{index}: no weight_map")
        return {k: v for shard in shards for k, v in _read_safetensors(join(url, shard)).items()}, index
    legacy = join(url, HF_LEGACY_WEIGHTS)
    if not exists(join(url, WEIGHTS)) and exists(legacy):
        state, _, _ = _read_official(legacy)
        return state, legacy
    return _read_safetensors(join(url, WEIGHTS)), join(url, WEIGHTS)


def _one_line(error: Exception) -> str:
    """torch.load's multi-paragraph message cut to its cause (the refused global / operand, the zip error)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        cause = (
            text.split("WeightsUnpickler error:", 1)[1]
            .split("Please use")[0]
            .split("Check the documentation")[0]
        )
        text = f"weights_only load refused: {cause}"
    return " ".join(text.split())[:300]


def _read_official(url: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """State dict, the other scalar top-level entries (epoch, ...) and the saved training ``args`` (as a dict)
    of an official ``.pth``."""
    data = read_bytes(url)
    try:
        # official files keep their argparse args
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt/foreign file
        raise ValueError(
            f"{url}: not a readable torch checkpoint ({type(e).__name__}: {_one_line(e)})"
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{url}: expected a dict, found {type(obj).__name__}")
    extra: dict = {}
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    for wrapper in ("model", "module"):
        if isinstance(obj.get(wrapper), dict):
            extra = {k: v for k, v in obj.items() if k != wrapper and isinstance(v, int | float | str)}
            obj = obj[wrapper]
            break
    for prefix in _STRIP_PREFIXES:
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k.removeprefix(prefix): v for k, v in obj.items()}
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not obj:
        raise ValueError(f"{url}: expected a state dict of tensors; non-tensor entries {bad[:5]}")
    return obj, extra, args


def _kind_of(keys, where: str) -> str:
    try:
        return detect_kind(keys)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _build(kind: str, cfg: VideoMAEConfig, state: dict, where: str, head_drop: float = 0.0) -> Model:
    if kind == PRETRAIN:
        return VideoMAE(cfg)
    if "head.weight" not in state:
        raise ValueError(f"{where}: classifier state has no head.weight")
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

    Returns ``(model, meta)`` with ``meta = {"format", "kind", "url", "config_inferred", "extra", "lineage"}``
    (``lineage`` None when the checkpoint records none)."""
    weights, vmae_meta, hf_cfg = join(url, WEIGHTS), join(url, VMAE_META), join(url, HF_CONFIG)
    fs, path = get_fs(url)
    is_dir = fs.isdir(path)
    if not is_dir and not fs.exists(path):
        raise ValueError(f"checkpoint {url!r} does not exist")
    extra: dict = {}
    inferred = False
    head_drop = 0.0
    lineage = None
    if is_dir and exists(vmae_meta):
        fmt, meta = "vmae", _read_json(vmae_meta)
        lineage = meta.get("lineage")
        kind, state = meta.get("kind"), _read_safetensors(weights)
        try:
            stored = VideoMAEConfig(**meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{vmae_meta}: bad config: {e}") from e
        cfg = cfg or stored
        if kind not in (PRETRAIN, CLASSIFIER):
            raise ValueError(f"{vmae_meta}: kind must be {PRETRAIN!r} or {CLASSIFIER!r}, got {kind!r}")
        head_drop = float(meta.get("head_drop", 0.0))
    elif is_dir and exists(hf_cfg):
        fmt, hf = "hf", _read_json(hf_cfg)
        lineage = hf.get(LINEAGE_PTH)
        raw, weights = _read_hf_weights(url)
        kind = _kind_of(raw.keys(), weights)
        state = from_hf(raw, kind)
        cfg = cfg or config_from_hf(hf, kind, hf_cfg)
    elif is_dir:
        raise ValueError(f"{url}: directory holds neither {VMAE_META} (vmae) nor {HF_CONFIG} (hf)")
    else:
        fmt, weights = "official", url
        raw, extra, args = _read_official(url)
        lineage = _lineage_of_official(extra.pop(LINEAGE_PTH, None), url)
        kind = _kind_of(raw.keys(), url)
        state = from_official(raw, kind)
        if cfg is None:
            cfg, inferred = infer_config(state, kind, where=url, args=args), True
    model = _build(kind, cfg, state, weights, head_drop=head_drop)
    _load_into(model, state, weights)
    return model, {"format": fmt, "kind": kind, "url": url, "config_inferred": inferred, "extra": extra,
                   "lineage": lineage}  # fmt: skip


def _lineage_of_official(raw: str | None, url: str) -> dict | None:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}: {LINEAGE_PTH} is not valid JSON: {e}") from e


def read_lineage(url: str) -> dict | None:
    """The lineage stored with the checkpoint at ``url`` (see :func:`save_checkpoint`), reading only its
    metadata for a directory; ``None`` when it records none (e.g. a published checkpoint)."""
    fs, path = get_fs(url)
    if fs.isdir(path):
        if exists(join(url, VMAE_META)):
            return _read_json(join(url, VMAE_META)).get("lineage")
        if exists(join(url, HF_CONFIG)):
            return _read_json(join(url, HF_CONFIG)).get(LINEAGE_PTH)
        raise ValueError(f"{url}: directory holds neither {VMAE_META} (vmae) nor {HF_CONFIG} (hf)")
    if not fs.exists(path):
        raise ValueError(f"checkpoint {url!r} does not exist")
    _, extra, _ = _read_official(url)
    return _lineage_of_official(extra.get(LINEAGE_PTH), url)
