"""The work of one study cell, in stages that run as Ray work: pretrain (or initialise) a model, finetune it
on the target's labelled clips, evaluate both.

- :func:`pretrain_stage` — once per distinct pretraining run (cells and studies share it through the
  content-addressed ``runs/`` folder): a Ray Train fit (``runner.pretrain: train``) or the same trainer in a
  Ray task (``local``) that exports ``<run>/final``; a ``scratch`` run exports the untrained model of its
  seed. ``pretrain.json`` (written last) is the commit, and records the run's wall time and the part of it
  spent outside the training loop (start-up overhead); a run continued from its checkpoint after a killed
  study records the invocation that finished it.
- :func:`finetune_eval_stage` — one Ray task per (cell, seed): finetune (``jobs.train.finetune.FinetuneTask`` in a
  ``LocalSession``: no Ray Train start-up per finetune) from the pretrained or scratch encoder with the same
  recipe, then evaluate the classifier on the target's test clips (``finetune.top1``) and the frozen encoder
  with a linear probe and kNN (``linear_probe.*``, ``knn.*``).

Seeds: a cell's seed sets the pretraining run's model init and data order/augmentation/masks, the finetune
run's, and the probe's initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import torch

from jobs.config import from_dict, load_config, to_dict
from jobs.eval.eval import EvalConfig, SplitSection, evaluate
from jobs.study.data import JobRef, TargetInfo, resolve_path
from jobs.train.config import FinetuneConfig, PretrainConfig
from jobs.train.finetune import FinetuneTask
from jobs.train.launch import export_url, local_log_dir, run_exists
from jobs.train.lineage import code_version
from jobs.train.metrics import read_metrics
from jobs.train.pretrain import PretrainTask, fit
from jobs.train.trainer import run_local
from model import VideoMAE, save_checkpoint
from pipeline import storage

PRETRAIN_DONE = "pretrain.json"
DONE = "vmae.json"


def _read_done(url: str) -> dict[str, Any] | None:
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def _tail_loss(recs: dict[int, dict[str, Any]]) -> float | None:
    """Mean logged loss over the last quarter of the run's steps (a logged loss is one step's: noisy)."""
    if not recs:
        return None
    last = max(recs)
    tail = [r["loss"] for step, r in recs.items() if step > 0.75 * last]
    return sum(tail) / len(tail)


def pretrain_stage(pcfg: PretrainConfig, init: str, launcher: str = "train") -> dict[str, Any]:
    """Run (or find) one pretraining run and its exported model; returns its ``pretrain.json`` record
    (``checkpoint``, ``steps``, ``final_loss``, ``wall_s``, ``train_s``, ``overhead_s``, ``recon_png``)."""
    done_url = storage.join(pcfg.run_url, PRETRAIN_DONE)
    if (done := _read_done(done_url)) is not None:
        return {**done, "ran": False}
    t0 = time.time()
    info: dict[str, Any] = {"run_url": pcfg.run_url, "steps": 0, "final_loss": None, "recon_png": None,
                            "checkpoint": export_url(pcfg), "train_s": 0.0}  # fmt: skip
    if init == "pretrained":
        if launcher == "train":
            fit(pcfg, resume=run_exists(pcfg))
        else:
            run_local(PretrainTask(pcfg), run_url=pcfg.run_url, log_dir=local_log_dir(pcfg),
                      export_url=export_url(pcfg), device=run_device(pcfg.scaling.use_gpu))  # fmt: skip
        if not storage.exists(storage.join(info["checkpoint"], DONE)):
            raise RuntimeError(f"pretraining {pcfg.run_url} ended without its exported model")
        logs = local_log_dir(pcfg)
        recs = read_metrics(os.path.join(logs, "metrics.jsonl")) if os.path.exists(logs) else {}
        last = recs[max(recs)] if recs else {}
        images = os.path.join(logs, "images")
        pngs = sorted(os.listdir(images)) if os.path.isdir(images) else []
        info.update(steps=max(recs) if recs else 0, final_loss=last.get("loss"),
                    first_loss=recs[min(recs)]["loss"] if recs else None, first_loss_step=min(recs) if recs else None,
                    tail_loss=_tail_loss(recs),
                    train_s=last.get("elapsed_s", 0.0),
                    recon_png=os.path.join(images, pngs[-1]) if pngs else None)  # fmt: skip
    else:
        torch.manual_seed(pcfg.seed)  # the trainer's initialisation, so scratch = a run's step 0
        lineage = {"code": code_version(), "init": f"scratch (torch seed {pcfg.seed})", "shards": None,
                   "subset": None, "config": storage.redact(to_dict(pcfg))}  # fmt: skip
        save_checkpoint(VideoMAE(pcfg.model.build()), info["checkpoint"], lineage=lineage)
    info["wall_s"] = round(time.time() - t0, 3)
    info["overhead_s"] = (
        round(info["wall_s"] - float(info["train_s"] or 0.0), 3) if init == "pretrained" else 0.0
    )
    storage.write_bytes_atomic(done_url, json.dumps(info, indent=1).encode())
    return {**info, "ran": True}


def finetune_config(
    ref: JobRef, pcfg: PretrainConfig, *, pretrained: str | None, target: TargetInfo, manifest: str, seed: int,
    run_url: str,
) -> FinetuneConfig:  # fmt: skip
    """The cell's finetune run: the study's finetune YAML (recipe) on the pretraining run's architecture (its
    model section, plus the YAML's model overrides such as drop path), trained on the target's labelled
    split with the cell's seed."""
    base = load_config(FinetuneConfig, resolve_path(ref.config) if ref.config else None,
                       [*ref.overrides, f"loader.manifest={manifest}"], num_classes=max(target.num_classes, 2))  # fmt: skip
    model = dataclasses.replace(pcfg.model, overrides={**pcfg.model.overrides, **base.model.overrides})
    loader = dataclasses.replace(base.loader, manifest=manifest, subset=target.train_url, seed=seed)
    storage_path, name = run_url.rstrip("/").rsplit("/", 1)
    return dataclasses.replace(base, model=model, loader=loader, seed=seed, pretrained=pretrained,
                               storage_path=storage_path, name=name)  # fmt: skip


def evaluate_checkpoint(
    ref: JobRef, overrides: tuple[str, ...], *, checkpoint: str, test: tuple[str, str],
    train: tuple[str, str] | None, output: str, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """``jobs.eval.eval.evaluate`` of ``checkpoint`` on the target's test split (and with ``train``, a linear
    probe and kNN fitted on the labelled split); ``train``/``test`` are (manifest, subset) pairs."""
    cfg = load_config(
        EvalConfig, resolve_path(ref.config) if ref.config else None, overrides, checkpoint=checkpoint,
        output=output, test=SplitSection(manifest=test[0], subset=test[1]),
        train=None if train is None else SplitSection(manifest=train[0], subset=train[1]),
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, seed=seed))
    return evaluate(cfg)


def run_device(use_gpu: bool) -> str:
    """Where an in-process (``run_local``) fit of a config runs: its ``scaling.use_gpu`` says, as under Ray
    Train (the study gives such a task one GPU, ``job_gpus``); a GPU config with no GPU visible is an error,
    not a silent CPU run."""
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("a scaling.use_gpu=true fit found no CUDA device in its Ray task")
    return "cuda" if use_gpu else "cpu"


def job_gpus(job: dict[str, Any]) -> int:
    """GPUs a finetune/eval task of ``job`` asks Ray for: one when its finetune config trains on GPU."""
    return int(bool(job["finetune"] and job["finetune"]["scaling"]["use_gpu"]))


def finetune_eval_stage(job: dict[str, Any]) -> dict[str, Any]:
    """Finetune + evaluate one (cell, seed); ``job`` holds plain values (it crosses into a Ray task):
    ``finetune`` (a resolved FinetuneConfig dict or None), ``encoder`` (the pretrained/scratch export),
    ``eval`` ref and overrides, the target's splits, ``out`` (where the evals go). Returns metrics, timings."""
    out: dict[str, Any] = {"metrics": {}, "finetune_wall_s": 0.0}
    ref = JobRef(**job["eval"])
    test, train = tuple(job["test"]), tuple(job["train"])
    t0 = time.time()
    if job["finetune"] is not None:
        fcfg = from_dict(FinetuneConfig, job["finetune"])
        final = export_url(fcfg)
        if not storage.exists(storage.join(final, DONE)):
            run_local(FinetuneTask(fcfg), run_url=fcfg.run_url, log_dir=local_log_dir(fcfg), export_url=final,
                      device=run_device(fcfg.scaling.use_gpu))  # fmt: skip
        out["finetune_wall_s"] = round(time.time() - t0, 3)
        report = evaluate_checkpoint(ref, tuple(job["eval_overrides"]), checkpoint=final, test=test, train=None,
                                     output=storage.join(job["out"], "finetuned.json"))  # fmt: skip
        for views, acc in report["multiview"].items():
            out["metrics"].update({f"finetune.{k}": v for k, v in acc.items() if k in ("top1", "top5")})
            out["metrics"]["finetune.views"] = views
            break
        out["finetune_checkpoint"] = final
        out["lineage"] = report["lineage"]  # the finetuned model's, with its encoder's chain
    t1 = time.time()
    report = evaluate_checkpoint(ref, tuple(job["eval_overrides"]), checkpoint=job["encoder"], test=test,
                                 train=train, output=storage.join(job["out"], "encoder.json"), seed=job["seed"])  # fmt: skip
    for name in ("linear_probe", "knn"):
        out["metrics"].update({f"{name}.{k}": v for k, v in report[name].items() if k in ("top1", "top5")})
    out.setdefault("lineage", report["lineage"])
    out["eval_wall_s"] = round(time.time() - t1, 3)
    out["num_classes"] = report.get("num_classes")
    return out
