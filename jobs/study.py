"""``vmae study --config configs/study/<name>.yaml [k=v ...]``: a grid of pretrain -> evaluate cells.

Why a runner: the questions this project asks (does curation beat quantity? which masking ratio? does
pretraining on domain A help on domain B?) are all "train many small models on different subsets, evaluate
each the same way, compare". Each *cell* of the grid fixes a pretraining subset, a labelled target set, an
initialisation (``pretrained``: a Ray Train run; ``scratch``: the same run's step-0 weights) and optional
overrides (``mask_ratio``, ``pretrain.<key>``, ``eval.<key>``); the study

1. prepares its data when given a synth config (synth -> shard -> curate -> subsets -> target splits), every
   stage content-addressed by the hash of its inputs and config, so present stages are skipped;
2. runs each cell: pretrain (shared by cells with the same pretrain config; the run exports its model, a
   scratch cell exports the untrained one), evaluate (``jobs.evaluate.evaluate``: linear probe + kNN on frozen features), and writes
   ``cells/<cell id>/result.json`` atomically, LAST: the commit of that cell. The cell id ends with the hash of
   everything the cell depends on, so a rerun skips finished cells and reruns changed ones;
3. writes ``results.parquet`` (one row per cell), ``results.md`` and PNG plots (``jobs.study_report``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from jobs.config import load_config, save_config, to_dict
from jobs.study_data import DataConfig, JobRef, PreparedData, digest, prepare_data, resolve_path
from jobs.train_config import PretrainConfig
from pipeline import storage

INITS = ("pretrained", "scratch")
NAMED_PARAMS = ("subset", "target", "init", "mask_ratio")
RESULT_NAME = "result.json"
PRETRAIN_DONE = "pretrain.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GridConfig:
    """Cells = product of ``axes`` (in key order), then the explicit ``cells``; none given: one cell.

    Keys: ``subset``/``target`` (names from the data section), ``init`` (pretrained | scratch),
    ``mask_ratio`` (the model's), ``pretrain.<key>`` / ``eval.<key>`` (overrides)."""

    axes: dict[str, list] = dataclasses.field(default_factory=dict)
    cells: tuple[dict, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.axes, dict):
            raise ValueError(f"grid.axes must be a mapping of parameter -> list, got {self.axes!r}")
        for key, values in self.axes.items():
            _check_param(key, "grid.axes")
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid.axes.{key} must be a non-empty list, got {values!r}")
        for i, cell in enumerate(self.cells):
            if not isinstance(cell, dict):
                raise ValueError(f"grid.cells[{i}] must be a mapping, got {cell!r}")
            for key in cell:
                _check_param(key, f"grid.cells[{i}]")


def _check_param(key: str, where: str) -> None:
    if key not in NAMED_PARAMS and not re.fullmatch(r"(pretrain|eval)\.[\w.]+", key):
        raise ValueError(
            f"{where}: unknown parameter {key!r}; use {NAMED_PARAMS}, pretrain.<key> or eval.<key>"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """Which evaluation numbers the table and plots show (flattened keys, e.g. ``linear_probe.top1``);
    empty: every numeric key that ends with ``top1``."""

    metrics: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyConfig:
    name: str = "study"
    output: str = "studies/debug"  # folder / s3:// prefix: data/, runs/, cells/, results.*, plots/
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    grid: GridConfig = dataclasses.field(default_factory=GridConfig)
    pretrain: JobRef = dataclasses.field(default_factory=lambda: JobRef(config="configs/pretrain/debug.yaml"))
    eval: JobRef = dataclasses.field(default_factory=lambda: JobRef(config="configs/eval/debug.yaml"))
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
    num_cpus: int | None = 2  # size of the local Ray cluster the study starts (ignored with --address)

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("output must be a folder or s3:// prefix")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1 or null, got {self.num_cpus}")
        subsets = {r.name for r in self.data.subsets}
        targets = {t.name for t in self.data.targets}
        for cell in expand_grid(self):
            if cell["subset"] not in subsets:
                raise ValueError(f"grid: subset {cell['subset']!r} is not in data.subsets {sorted(subsets)}")
            if cell["target"] not in targets:
                raise ValueError(f"grid: target {cell['target']!r} is not in data.targets {sorted(targets)}")
            if cell["init"] not in INITS:
                raise ValueError(f"grid: init must be one of {INITS}, got {cell['init']!r}")
            m = cell["mask_ratio"]
            if m is not None and (isinstance(m, bool) or not isinstance(m, int | float) or not 0 < m < 1):
                raise ValueError(f"grid: mask_ratio must be a number in (0, 1), got {m!r}")


def expand_grid(cfg: StudyConfig) -> list[dict[str, Any]]:
    """Every cell's full parameter dict (named parameters filled with defaults), duplicates dropped."""
    defaults = {
        "subset": cfg.data.subsets[0].name,
        "target": cfg.data.targets[0].name,
        "init": "pretrained",
        "mask_ratio": None,
    }
    keys = list(cfg.grid.axes)
    cells = (
        [dict(zip(keys, c, strict=True)) for c in itertools.product(*cfg.grid.axes.values())] if keys else []
    )
    cells += [dict(c) for c in cfg.grid.cells]
    out, seen = [], set()
    for c in cells or [{}]:
        full = {**defaults, **c}
        ident = json.dumps(full, sort_keys=True)
        if ident not in seen:
            seen.add(ident)
            out.append(full)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cell:
    """One resolved grid cell. ``pretrain`` names the run (``pretrain_id``) shared by identical cells."""

    id: str
    params: dict[str, Any]
    pretrain: PretrainConfig
    pretrain_id: str
    eval_overrides: tuple[str, ...]
    eval_key: str  # identity of the evaluation (weights, eval config, target): equal keys share one report


def resolve_cell(cfg: StudyConfig, params: dict[str, Any], data: PreparedData) -> Cell:
    """Pretrain config and eval overrides of a cell, and its id ``<readable params>-<hash of inputs>``."""
    subset = data.subsets[params["subset"]]
    user = [*cfg.pretrain.overrides]  # the study YAML's own a.b=c strings, then the grid's pretrain.<key>
    user += [
        f"{k[len('pretrain.') :]}={json.dumps(v)}" for k, v in params.items() if k.startswith("pretrain.")
    ]
    pcfg = load_config(
        PretrainConfig, resolve_path(cfg.pretrain.config) if cfg.pretrain.config else None, user
    )
    model = pcfg.model
    if params["mask_ratio"] is not None:
        model = dataclasses.replace(
            model, overrides={**model.overrides, "mask_ratio": float(params["mask_ratio"])}
        )
    loader = dataclasses.replace(pcfg.loader, manifest=data.manifest_url, subset=subset.url)
    pcfg = dataclasses.replace(pcfg, model=model, loader=loader)
    if params["init"] == "scratch":  # step-0 weights depend on the model and the seed only
        ident = {"init": "scratch", "model": to_dict(pcfg.model), "seed": pcfg.seed}
    else:
        ident = {k: v for k, v in to_dict(pcfg).items() if k not in ("name", "storage_path")}
        ident["subset_hash"] = subset.inputs_hash
    pretrain_id = f"{params['init']}-{digest(ident)[:12]}"
    need = pcfg.loader.videos_per_batch * pcfg.scaling.num_workers
    if params["init"] == "pretrained" and subset.size < need:
        raise ValueError(f"subset {subset.name!r} has {subset.size} samples, fewer than one global batch "
                         f"({need}); use a larger subset or a smaller loader.batch_size")  # fmt: skip
    pcfg = dataclasses.replace(pcfg, name=pretrain_id, storage_path=storage.join(cfg.output, "runs"))
    eval_over = tuple(cfg.eval.overrides) + tuple(
        f"{k[len('eval.') :]}={json.dumps(v)}" for k, v in params.items() if k.startswith("eval.")
    )
    target = data.targets[params["target"]]
    h = digest({"pretrain": pretrain_id, "eval": [cfg.eval.config, eval_over], "target": target.inputs_hash})
    slug = "_".join(f"{k.split('.')[-1]}={v}" for k, v in params.items() if v is not None)
    slug = re.sub(r"[^A-Za-z0-9.=_-]+", "", slug)[:80]
    return Cell(id=f"{slug}-{h[:10]}", params=params, pretrain=pcfg, pretrain_id=pretrain_id,
                eval_overrides=eval_over, eval_key=h[:16])  # fmt: skip


def pretrain_stage(cell: Cell) -> dict[str, Any]:
    """Pretrain (or initialise) the cell's model once per ``pretrain_id``; the run exports its model to
    ``<run>/final`` (a scratch cell exports the untrained one there). A crashed run resumes from its latest
    Ray Train checkpoint. ``pretrain.json`` is the commit."""
    from jobs.launch import export_url, local_log_dir, run_exists
    from jobs.pretrain import fit

    pcfg = cell.pretrain
    done_url = storage.join(pcfg.run_url, PRETRAIN_DONE)
    if storage.exists(done_url):
        return {**json.loads(storage.read_bytes(done_url)), "ran": False}
    t0 = time.time()
    info: dict[str, Any] = {"run_url": pcfg.run_url, "steps": 0, "final_loss": None, "recon_png": None,
                            "checkpoint": export_url(pcfg)}  # fmt: skip
    if cell.params["init"] == "pretrained":
        result = fit(pcfg, resume=run_exists(pcfg))
        if not storage.exists(storage.join(info["checkpoint"], "vmae.json")):
            raise RuntimeError(f"pretraining {pcfg.run_url} ended without its exported model")
        metrics = result.metrics or {}
        images = os.path.join(local_log_dir(pcfg), "images")
        pngs = sorted(os.listdir(images)) if os.path.isdir(images) else []
        info.update(steps=int(metrics.get("step", 0) or 0), final_loss=metrics.get("loss"),
                    train_checkpoint=result.checkpoint.path if result.checkpoint else None,
                    recon_png=os.path.join(images, pngs[-1]) if pngs else None)  # fmt: skip
    else:
        import torch

        from model import VideoMAE, save_checkpoint

        torch.manual_seed(pcfg.seed)  # the trainer's initialisation, so scratch = a run's step 0
        save_checkpoint(VideoMAE(pcfg.model.build()), info["checkpoint"])
    info["wall_s"] = round(time.time() - t0, 3)
    storage.write_bytes_atomic(done_url, json.dumps(info, indent=1).encode())
    return {**info, "ran": True}


EvaluateFn = Callable[..., dict]


def default_evaluate(
    ref: JobRef, overrides: tuple[str, ...], *, checkpoint: str, train: tuple[str, str],
    test: tuple[str, str], output: str,
) -> dict:  # fmt: skip
    """Linear probe + kNN of ``checkpoint``'s frozen features: ``train``/``test`` are (manifest, subset)."""
    from jobs.evaluate import EvalConfig, SplitSection, evaluate

    cfg = load_config(
        EvalConfig, resolve_path(ref.config) if ref.config else None, overrides, checkpoint=checkpoint,
        output=output, train=SplitSection(manifest=train[0], subset=train[1]),
        test=SplitSection(manifest=test[0], subset=test[1]),
    )  # fmt: skip
    return evaluate(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def run_cell(cfg: StudyConfig, cell: Cell, data: PreparedData, evaluate_fn: EvaluateFn) -> dict[str, Any]:
    """Pretrain (shared), evaluate, commit ``result.json``; returns the result."""
    t0 = time.time()
    pre = pretrain_stage(cell)
    target = data.targets[cell.params["target"]]
    cell_url = storage.join(cfg.output, "cells", cell.id)
    t1 = time.time()
    eval_url = storage.join(cfg.output, "evals", f"{cell.eval_key}.json")
    reused = storage.exists(eval_url)  # a scratch model evaluated for another subset, or an earlier attempt
    if reused:
        report = json.loads(storage.read_bytes(eval_url))
    else:
        report = evaluate_fn(cfg.eval, cell.eval_overrides, checkpoint=pre["checkpoint"],
                             train=(data.manifest_url, target.train_url),
                             test=(data.manifest_url, target.test_url), output=eval_url)  # fmt: skip
    subset = data.subsets[cell.params["subset"]]
    result = {
        "cell_id": cell.id, "params": cell.params, "pretrain_id": cell.pretrain_id,
        "subset": subset.summary(), "target": target.summary(), "pretrain": pre,
        "metrics": {k: v for k, v in flatten(report).items() if isinstance(v, int | float) and not isinstance(v, bool)},
        "eval_wall_s": round(time.time() - t1, 3), "wall_s": round(time.time() - t0, 3),
        "checkpoint": pre["checkpoint"], "eval_report": eval_url, "eval_reused": reused,
    }  # fmt: skip
    storage.write_bytes_atomic(storage.join(cell_url, RESULT_NAME), json.dumps(result, indent=1).encode())
    return result


def run_study(
    cfg: StudyConfig, *, address: str | None = None, evaluate_fn: EvaluateFn | None = None
) -> dict[str, Any]:
    """Prepare data, run every unfinished cell, write the report. Returns counts and the report's URLs:
    ``{"cells", "ran", "skipped", "pretrain_runs", "results": [...], "files": {...}}``."""
    import ray

    from jobs.study_report import write_report

    evaluate_fn = evaluate_fn or default_evaluate
    if storage.protocol(cfg.output) == "file":  # Ray Train workers run in another working directory
        cfg = dataclasses.replace(cfg, output=os.path.abspath(cfg.output))
    started = False
    if not ray.is_initialized():  # --address, $RAY_ADDRESS (a Ray job), else a new local cluster
        address = address or os.environ.get("RAY_ADDRESS")
        local = {} if address else {"num_cpus": cfg.num_cpus}
        ray.init(address=address or "local", include_dashboard=False, **local)
        started = True
    try:
        save_config(cfg, cfg.output, "study_config.yaml")
        data = prepare_data(cfg.data, storage.join(cfg.output, "data"))
        cells = [resolve_cell(cfg, p, data) for p in expand_grid(cfg)]
        results, ran, pretrain_runs = [], 0, 0
        for cell in tqdm(cells, desc=f"study {cfg.name}", unit="cell"):
            url = storage.join(cfg.output, "cells", cell.id, RESULT_NAME)
            if storage.exists(url):
                results.append(json.loads(storage.read_bytes(url)))
                continue
            res = run_cell(cfg, cell, data, evaluate_fn)
            ran += 1
            pretrain_runs += bool(res["pretrain"]["ran"] and cell.params["init"] == "pretrained")
            results.append(res)
    finally:
        if started:
            ray.shutdown()
    files = write_report(results, cfg.output, metrics=cfg.report.metrics, title=cfg.name)
    return {"cells": len(cells), "ran": ran, "skipped": len(cells) - ran, "pretrain_runs": pretrain_runs,
            "results": results, "files": files}  # fmt: skip


CONFIG_DIR = "configs/study"  # where this command's --config YAMLs live (jobs.cli.config_registry)
CONFIG_CLASS = StudyConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML under configs/study/")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    parser.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. output=studies/x")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(StudyConfig, args.config, args.overrides)
        out = run_study(cfg, address=args.address)
    except ValueError as e:
        print(f"vmae study: error: {e}", file=sys.stderr)
        return 2
    print(f"vmae study {cfg.name}: {out['cells']} cells ({out['ran']} run, {out['skipped']} already done, "
          f"{out['pretrain_runs']} pretraining runs)")  # fmt: skip
    for name, url in out["files"].items():
        print(f"  {name}: {url}")
    return 0
