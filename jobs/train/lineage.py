"""Lineage: what a model was trained from, recorded in every checkpoint and export it writes.

``build_lineage(cfg)`` runs on the driver (it reads the manifests once and knows the code checkout; workers on a
cluster run from an uploaded copy without ``.git``) and is handed to the trainer, which writes it into every
``model.save_checkpoint`` (``vmae.json``'s ``lineage``, an HF ``config.json``'s ``vmae_lineage``, an official
``.pth``'s ``vmae_lineage``). Keys:

- ``code``: the package version and git commit of the checkout (``.dirty`` when tracked files differ from it);
- ``shards``: ``{manifest, sha256}``, the sha256 of the shard set's ``manifest.json`` bytes;
- ``subset``: ``{url, sha256, rule}`` of the subset manifest (``null`` when training on the whole set);
- ``config``: the resolved training config (credentials redacted);
- ``pretrained``: for finetuning, ``{url, lineage}`` of the checkpoint the encoder came from (its own lineage,
  without its config, so a chain stays short).

``describe(lineage)`` is the few lines ``vmae eval`` and ``vmae study`` print and write in their reports.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from typing import Any

from jobs.config import to_dict
from jobs.train.checkpointing import model_url
from model.checkpoint import read_lineage
from pipeline import storage
from pipeline.ingest import manifest as mf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout


@functools.cache
def code_version() -> str:
    """The package version and git commit (``pipeline.ingest.manifest.code_version``), ``.dirty`` when tracked files
    of the checkout differ from that commit."""
    version = mf.code_version()
    try:
        dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--"], capture_output=True,
                               timeout=30).returncode == 1  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return f"{version}.dirty" if dirty and "+g" in version else version


def _sha256(url: str, storage_cfg: Any = None) -> str:
    return hashlib.sha256(storage.read_bytes(url, storage_cfg)).hexdigest()


def build_lineage(cfg: Any) -> dict[str, Any]:
    """The lineage of a training run of ``cfg`` (a ``TrainConfig`` with absolute loader paths)."""
    loader = cfg.loader
    manifest_url = (
        loader.manifest
        if loader.manifest.endswith(".json")
        else storage.join(loader.manifest, mf.MANIFEST_NAME)
    )
    out: dict[str, Any] = {
        "code": code_version(),
        "shards": {"manifest": manifest_url, "sha256": _sha256(manifest_url, loader.storage)},
        "subset": None,
        "config": storage.redact(to_dict(cfg)),
    }
    if loader.subset:
        sub = mf.read_subset(loader.subset, loader.storage)
        out["subset"] = {
            "url": loader.subset,
            "sha256": _sha256(loader.subset, loader.storage),
            "rule": sub.rule,
        }
    pretrained = getattr(cfg, "pretrained", None)
    if pretrained:
        out["pretrained"] = {"url": pretrained, "lineage": pretrained_lineage(pretrained)}
    return out


def pretrained_lineage(url: str) -> dict[str, Any] | None:
    """The lineage recorded in the checkpoint at ``url`` (``None`` for a published checkpoint without one),
    without its config."""
    lin = read_lineage(model_url(url))
    if lin is None:
        return None
    return {k: v for k, v in lin.items() if k != "config"}


def flat(lineage: dict[str, Any] | None) -> dict[str, str]:
    """Table columns of a (finetuned or pretrained) model's lineage: ``code`` and the *pretraining* run's shard
    manifest hash, subset hash and rule (empty strings where unknown or a scratch init)."""
    lineage = lineage or {}
    pre = lineage  # a pretraining run's own lineage, or for a finetuned model its encoder's
    if lineage.get("pretrained"):
        pre = lineage["pretrained"].get("lineage") or {}
    shards, sub = pre.get("shards") or {}, pre.get("subset") or {}
    return {
        "lineage_code": str(lineage.get("code") or ""),
        "pretrain_shards_sha256": str(shards.get("sha256") or ""),
        "pretrain_subset_sha256": str(sub.get("sha256") or ""),
        "pretrain_subset_rule": json.dumps(sub.get("rule"), sort_keys=True) if sub else "",
    }


def describe(lineage: dict[str, Any] | None, indent: str = "") -> list[str]:
    """Human-readable lines: code, shard manifest hash, subset hash and rule, and the pretrained chain."""
    if not lineage:
        return [f"{indent}lineage: none recorded (a published or pre-lineage checkpoint)"]
    lines = [f"{indent}code: {lineage.get('code')}"]
    if lineage.get("init"):
        return [*lines, f"{indent}init: {lineage['init']} (never trained)"]
    shards = lineage.get("shards") or {}
    lines.append(
        f"{indent}shards: {shards.get('manifest')} (manifest sha256 {str(shards.get('sha256'))[:16]})"
    )
    sub = lineage.get("subset")
    if sub:
        lines.append(f"{indent}subset: {sub['url']} (sha256 {sub['sha256'][:16]}), rule {sub.get('rule')}")
    else:
        lines.append(f"{indent}subset: none (the whole shard set)")
    pre = lineage.get("pretrained")
    if pre:
        lines.append(f"{indent}pretrained from: {pre['url']}")
        lines += describe(pre.get("lineage"), indent + "  ")
    return lines
