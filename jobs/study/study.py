"""``vmae study --config configs/study/<name>.yaml [k=v ...]``: a grid of pretrain -> finetune -> evaluate cells,
each run with several seeds, reported as mean ± std with a verdict per finding.

Why a runner: the questions this project asks (does pretraining help on a small labelled set? which masking
ratio? does curation beat quantity? does pretraining on domain A help on domain B?) are all "train many small
models on different subsets, evaluate each the same way, compare beyond the noise". A *cell* fixes a
pretraining subset, a labelled target, an initialisation (``pretrained``: a pretraining run; ``scratch``: the
same architecture untrained), the mask and optional overrides (``pretrain.<key>``, ``finetune.<key>``,
``eval.<key>``); every cell runs once per seed of ``seeds``. The study

1. prepares its data when given a synth config (synth -> shard -> curate -> subsets -> target splits), every
   stage content-addressed by the hash of its inputs and config, so present stages are skipped;
2. runs the distinct pretraining runs (Ray Train fits, ``runner.parallel`` at a time in one Ray session) and,
   as each finishes, the finetune + evaluation of the cells that use it (Ray tasks running the same trainer
   without Ray Train's start-up; ``jobs.study.cells``). Runs and evaluations live under ``cache`` (default:
   the output) by content hash, so cells and studies that need the same run share it;
3. commits ``cells/<cell id>/seed_<s>/result.json`` per run, LAST; a rerun skips committed ones and
   resumes unfinished runs from their checkpoints, so a study killed mid-cell (``kill -9``) and run again
   ends with the numbers of an uninterrupted run (timings aside);
4. writes ``results.parquet`` (one row per cell and seed, in grid order), ``results.md`` (mean ± std over
   seeds, chance, the findings' verdicts, wall and overhead per cell) and PNG plots with error bars
   (``jobs.study.report``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import functools
import itertools
import json
import os
import re
import sys
import time
from typing import Any

import ray
from tqdm import tqdm

from jobs.config import load_config, save_config, to_dict
from jobs.ray_utils import init_ray
from jobs.study.cells import finetune_config, finetune_eval_stage, job_gpus, pretrain_stage
from jobs.study.data import DataConfig, JobRef, PreparedData, digest, prepare_data, resolve_path
from jobs.study.report import NAMED_PARAMS, write_report
from jobs.train.config import PretrainConfig
from jobs.train.launch import export_url
from pipeline import storage
from pipeline.loader.masking import check_mask_ratio

INITS = ("pretrained", "scratch")
PREFIXES = ("pretrain", "finetune", "eval")
RESULT_NAME = "result.json"
LAUNCHERS = ("train", "local")
FINDING_KINDS = ("greater", "not_worse")


def _check_param(key: str, where: str) -> None:
    if key not in NAMED_PARAMS and not re.fullmatch(r"(pretrain|finetune|eval)\.[\w.]+", key):
        raise ValueError(f"{where}: unknown parameter {key!r}; use {NAMED_PARAMS} or <job>.<key> "
                         f"with job in {PREFIXES}")  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class GridConfig:
    """Cells = product of ``axes`` (in key order), then the explicit ``cells``; none given: one cell.

    Keys: ``subset``/``target`` (names from the data section), ``init`` (pretrained | scratch),
    ``mask_ratio``/``mask_type`` (the model's), ``pretrain.<key>``, ``finetune.<key>``, ``eval.<key>``."""

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class FindingSpec:
    """A claim to test on ``metric``: the cells matching ``better`` (a dict of parameters) against those
    matching ``worse``. ``greater``: reproduced when mean(better) - mean(worse) > 2 standard errors of the
    difference; ``not_worse``: when the difference is > -2 standard errors."""

    name: str
    metric: str = "finetune.top1"
    better: dict[str, Any] = dataclasses.field(default_factory=dict)
    worse: dict[str, Any] = dataclasses.field(default_factory=dict)
    kind: str = "greater"

    def __post_init__(self) -> None:
        if not self.name or not self.better or not self.worse:
            raise ValueError(f"report.findings: each needs a name, better and worse, got {self!r}")
        if self.kind not in FINDING_KINDS:
            raise ValueError(f"finding {self.name!r}: kind must be one of {FINDING_KINDS}, got {self.kind!r}")
        for key in (*self.better, *self.worse):
            _check_param(key, f"finding {self.name!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """Which metrics the tables and plots show (flattened keys, e.g. ``finetune.top1``; empty: every key
    ending in ``top1``), and the findings to test."""

    metrics: tuple[str, ...] = ()
    findings: tuple[FindingSpec, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunnerSection:
    """How the study's runs share the cluster: ``parallel`` runs at a time; pretraining as a Ray Train fit
    (``train``, the production path: elastic, fault tolerant) or the same trainer in one Ray task
    (``local``)."""

    parallel: int = 2
    pretrain: str = "train"

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise ValueError(f"runner.parallel must be >= 1, got {self.parallel}")
        if self.pretrain not in LAUNCHERS:
            raise ValueError(f"runner.pretrain must be one of {LAUNCHERS}, got {self.pretrain!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyConfig:
    name: str = "study"
    output: str = "studies/debug"  # folder / s3:// prefix: cells/, results.*, plots/ (and data/, runs/)
    cache: str | None = None  # shared folder for data/, runs/, evals/ (content-addressed); None: output
    data_file: str | None = None  # a YAML of the data section shared by studies (instead of ``data``)
    data: DataConfig | None = None
    grid: GridConfig = dataclasses.field(default_factory=GridConfig)
    seeds: tuple[int, ...] = (0,)
    pretrain: JobRef = dataclasses.field(default_factory=lambda: JobRef(config="configs/pretrain/debug.yaml"))
    finetune: JobRef | None = None  # set: each cell also finetunes on its target's labelled split
    eval: JobRef = dataclasses.field(default_factory=lambda: JobRef(config="configs/eval/debug.yaml"))
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
    runner: RunnerSection = dataclasses.field(default_factory=RunnerSection)
    num_cpus: int | None = 2  # size of the local Ray cluster the study starts (ignored with --address)

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("output must be a folder or s3:// prefix")
        if self.data_file is not None:  # the shared section, loaded here so every check below sees it
            shared = load_config(DataConfig, resolve_path(self.data_file))
            if self.data is not None and self.data != shared:  # a saved study config holds both, equal
                raise ValueError(f"give data or data_file, not both: data differs from {self.data_file!r}")
            object.__setattr__(self, "data", shared)
        if self.data is None:
            raise ValueError("give data (the section) or data_file (a data YAML shared by studies)")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1 or null, got {self.num_cpus}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {list(self.seeds)}")
        subsets = {r.name for r in self.data.subsets}
        targets = {t.name for t in self.data.targets}
        for cell in expand_grid(self):
            if cell["subset"] not in subsets:
                raise ValueError(f"grid: subset {cell['subset']!r} is not in data.subsets {sorted(subsets)}")
            if cell["target"] not in targets:
                raise ValueError(f"grid: target {cell['target']!r} is not in data.targets {sorted(targets)}")
            if cell["init"] not in INITS:
                raise ValueError(f"grid: init must be one of {INITS}, got {cell['init']!r}")
            if cell["mask_ratio"] is not None:
                check_mask_ratio(cell["mask_ratio"], name="grid: mask_ratio")

    @property
    def store(self) -> str:
        return self.cache or self.output


def expand_grid(cfg: StudyConfig) -> list[dict[str, Any]]:
    """Every cell's full parameter dict (named parameters filled with defaults), duplicates dropped. A scratch
    cell does not pretrain, so its subset and mask are not its own: they are reset to the defaults, and the
    scratch cells of a subset x init grid collapse into one."""
    defaults = {"subset": cfg.data.subsets[0].name, "target": cfg.data.targets[0].name, "init": "pretrained",
                "mask_ratio": None, "mask_type": None}  # fmt: skip
    keys = list(cfg.grid.axes)
    cells = (
        [dict(zip(keys, c, strict=True)) for c in itertools.product(*cfg.grid.axes.values())] if keys else []
    )
    cells += [dict(c) for c in cfg.grid.cells]
    out, seen = [], set()
    for c in cells or [{}]:
        full = {**defaults, **c}
        if full["init"] == "scratch":
            full.update(subset=defaults["subset"], mask_ratio=None, mask_type=None)
        ident = json.dumps(full, sort_keys=True)
        if ident not in seen:
            seen.add(ident)
            out.append(full)
    return out


def _overrides(params: dict[str, Any], job: str) -> list[str]:
    return [f"{k[len(job) + 1 :]}={json.dumps(v)}" for k, v in params.items() if k.startswith(job + ".")]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CellRun:
    """One cell at one seed, resolved: its pretraining run (shared by identical ones) and its
    finetune/eval job (``eval_id``: shared by identical ones)."""

    cell_id: str
    seed: int
    params: dict[str, Any]
    pretrain: PretrainConfig
    pretrain_id: str
    eval_id: str
    job: dict[str, Any]  # finetune_eval_stage's input

    @property
    def url_part(self) -> str:
        return f"{self.cell_id}/seed_{self.seed}"


def resolve_cell(cfg: StudyConfig, params: dict[str, Any], data: PreparedData, seed: int) -> CellRun:
    """The runs of a cell at ``seed``, and its id ``<readable params>-<hash of what it depends on>``."""
    subset, target = data.subsets[params["subset"]], data.targets[params["target"]]
    ref = cfg.pretrain
    pcfg = load_config(PretrainConfig, resolve_path(ref.config) if ref.config else None,
                       [*ref.overrides, *_overrides(params, "pretrain")])  # fmt: skip
    model = {k: params[k] for k in ("mask_ratio", "mask_type") if params[k] is not None}
    model_section = dataclasses.replace(pcfg.model, overrides={**pcfg.model.overrides, **model})
    loader = dataclasses.replace(pcfg.loader, manifest=data.manifest_url, subset=subset.url, seed=seed)
    pcfg = dataclasses.replace(pcfg, model=model_section, loader=loader, seed=seed)
    # the run's identity holds the *resolved* model (not how its overrides are spelled): a cell that names the
    # recipe's own mask settings ({mask_type: tube, mask_ratio: 0.9}) shares the recipe's runs
    resolved = dataclasses.asdict(pcfg.model.build())
    if params["init"] == "scratch":  # untrained weights depend on the model and the seed only
        ident = {"init": "scratch", "model": resolved, "seed": seed}
    else:
        ident = {k: v for k, v in to_dict(pcfg).items() if k not in ("name", "storage_path")}
        ident["model"], ident["subset_hash"] = resolved, subset.inputs_hash
        need = pcfg.loader.videos_per_batch * pcfg.scaling.num_workers
        if subset.size < need:
            raise ValueError(f"subset {subset.name!r} has {subset.size} samples, fewer than one global batch "
                             f"({need}); use a larger subset or a smaller loader.batch_size")  # fmt: skip
    pretrain_id = f"{params['init']}-{digest(ident)[:12]}"
    runs = storage.join(cfg.store, "runs")
    pcfg = dataclasses.replace(pcfg, name=pretrain_id, storage_path=runs)
    encoder = export_url(pcfg)
    ft = None
    if cfg.finetune is not None:
        fref = JobRef(
            config=cfg.finetune.config, overrides=(*cfg.finetune.overrides, *_overrides(params, "finetune"))
        )
        probe = finetune_config(fref, pcfg, pretrained=None, target=target, manifest=data.manifest_url, seed=seed,
                                run_url=storage.join(runs, "ft-tmp"))  # fmt: skip
        ft_ident = {
            k: v for k, v in to_dict(probe).items() if k not in ("name", "storage_path", "pretrained")
        }
        ft_id = f"ft-{digest([pretrain_id, ft_ident, target.inputs_hash])[:12]}"
        ft = to_dict(
            dataclasses.replace(
                probe, name=ft_id, pretrained=None if params["init"] == "scratch" else encoder
            )
        )
    eval_over = [*cfg.eval.overrides, *_overrides(params, "eval")]
    eval_id = digest([pretrain_id, ft, cfg.eval.config, eval_over, target.inputs_hash])[:16]
    job = {"finetune": ft, "encoder": encoder, "eval": dataclasses.asdict(cfg.eval), "eval_overrides": eval_over,
           "test": [data.manifest_url, target.test_url], "train": [data.manifest_url, target.train_url],
           "seed": seed, "out": storage.join(cfg.store, "evals", eval_id)}  # fmt: skip
    shown = {k: v for k, v in params.items() if v is not None}
    slug = re.sub(r"[^A-Za-z0-9.=_-]+", "", "_".join(f"{k.split('.')[-1]}={v}" for k, v in shown.items()))[
        :80
    ]
    cell_hash = digest([_seedless(ident), _seedless(ft), cfg.eval.config, eval_over, target.inputs_hash])[:10]
    return CellRun(cell_id=f"{slug}-{cell_hash}", seed=seed, params=params, pretrain=pcfg,
                   pretrain_id=pretrain_id, eval_id=eval_id, job=job)  # fmt: skip


def _seedless(d: dict | None) -> dict | None:
    """A resolved config dict without its seeds: what a cell is, whatever seed it runs with."""
    if d is None:
        return None
    d = json.loads(json.dumps(d))
    for node in (d, d.get("loader") or {}):
        node.pop("seed", None)
    for key in ("name", "storage_path", "pretrained"):  # run names and paths hash the seed in
        d.pop(key, None)
    return d


def _commit(cfg: StudyConfig, run: CellRun, data: PreparedData, pre: dict, ev: dict) -> dict[str, Any]:
    subset, target = data.subsets[run.params["subset"]], data.targets[run.params["target"]]
    result = {
        "cell_id": run.cell_id, "seed": run.seed, "params": run.params, "pretrain_id": run.pretrain_id,
        "eval_id": run.eval_id, "subset": subset.summary(), "target": target.summary(), "pretrain": pre,
        "metrics": ev["metrics"], "finetune_wall_s": ev.get("finetune_wall_s", 0.0),
        "eval_wall_s": ev.get("eval_wall_s", 0.0), "checkpoint": pre["checkpoint"],
        "finetune_checkpoint": ev.get("finetune_checkpoint"), "lineage": ev.get("lineage"),
    }  # fmt: skip
    storage.write_bytes_atomic(storage.join(cfg.output, "cells", run.url_part, RESULT_NAME),
                               json.dumps(result, indent=1).encode())  # fmt: skip
    return result


def _with_credentials(fn: Any) -> Any:
    """``fn`` run in a Ray task after installing the driver's object-store credentials (first argument)."""

    def run(credentials: dict[str, str], *args: Any) -> Any:
        storage.install_credentials(credentials)
        return fn(*args)

    run.__name__ = run.__qualname__ = fn.__name__
    return run


def _run_all(cfg: StudyConfig, runs: list[CellRun], data: PreparedData) -> tuple[list[dict], dict[str, int]]:
    """Pretraining runs first (``runner.parallel`` at a time); each finished one releases the finetune/eval
    tasks of its cells, which go ahead of the remaining pretraining runs."""
    stage = ray.remote(num_cpus=1)(_with_credentials(finetune_eval_stage))
    pre_task = ray.remote(num_cpus=1)(_with_credentials(pretrain_stage))
    creds = ray.put(storage.credentials_from_env())  # a Ray object: never in runtime_env / job metadata
    results, todo = [], []
    for r in runs:
        url = storage.join(cfg.output, "cells", r.url_part, RESULT_NAME)
        if storage.exists(url):
            results.append(json.loads(storage.read_bytes(url)))
        else:
            todo.append(r)
    counts = {"ran": len(todo), "skipped": len(results), "pretrain_runs": 0}
    pretrains = {r.pretrain_id: r for r in todo}
    evals: dict[str, list[CellRun]] = {}
    for r in todo:
        evals.setdefault(r.eval_id, []).append(r)
    queue_pre = list(pretrains.values())
    queue_eval: list[str] = []
    pre_out: dict[str, dict] = {}
    bar = tqdm(total=len(pretrains) + len(evals), desc=f"study {cfg.name}", unit="run")

    def do_pretrain(r: CellRun) -> dict:
        init, launcher = r.params["init"], cfg.runner.pretrain
        if launcher == "local" and init == "pretrained":
            gpus = int(r.pretrain.scaling.use_gpu)
            return ray.get(pre_task.options(num_gpus=gpus).remote(creds, r.pretrain, init, launcher))
        return pretrain_stage(r.pretrain, init, launcher)

    def do_eval(eval_id: str) -> dict:
        url = storage.join(evals[eval_id][0].job["out"], RESULT_NAME)
        if storage.exists(url):
            return json.loads(storage.read_bytes(url))
        job = evals[eval_id][0].job
        out = ray.get(stage.options(num_gpus=job_gpus(job)).remote(creds, job))
        storage.write_bytes_atomic(url, json.dumps(out, indent=1).encode())
        return out

    with cf.ThreadPoolExecutor(cfg.runner.parallel) as pool:
        running: dict[cf.Future, tuple[str, str]] = {}
        while queue_pre or queue_eval or running:
            while len(running) < cfg.runner.parallel and (queue_eval or queue_pre):
                if queue_eval:
                    eid = queue_eval.pop(0)
                    running[pool.submit(do_eval, eid)] = ("eval", eid)
                else:
                    r = queue_pre.pop(0)
                    running[pool.submit(do_pretrain, r)] = ("pretrain", r.pretrain_id)
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                kind, key = running.pop(fut)
                out = fut.result()  # a failed run stops the study with its error
                bar.update()
                if kind == "pretrain":
                    pre_out[key] = out
                    counts["pretrain_runs"] += bool(out.get("ran") and out.get("steps"))
                    queue_eval += [e for e, rs in evals.items() if rs[0].pretrain_id == key]
                else:
                    for r in evals[key]:
                        results.append(_commit(cfg, r, data, pre_out[r.pretrain_id], out))
    bar.close()
    return in_grid_order(results, runs), counts


def in_grid_order(results: list[dict[str, Any]], runs: list[CellRun]) -> list[dict[str, Any]]:
    """``results`` (cell results) in the order of ``runs``, not in the order they finished: a rerun lists its
    skipped cells first and parallel runs end in any order; the report must depend on neither."""
    order = {(r.cell_id, r.seed): i for i, r in enumerate(runs)}
    return sorted(results, key=lambda x: order[x["cell_id"], x["seed"]])


def run_study(cfg: StudyConfig, *, address: str | None = None) -> dict[str, Any]:
    """Prepare data, run every unfinished cell and seed, write the report. Returns counts and the report's
    URLs: ``{"cells", "runs", "ran", "skipped", "pretrain_runs", "wall_s", "results", "files"}``."""
    t0 = time.time()
    if storage.protocol(cfg.output) == "file":  # Ray workers run in another working directory
        cfg = dataclasses.replace(cfg, output=os.path.abspath(cfg.output))
    if cfg.cache and storage.protocol(cfg.cache) == "file":
        cfg = dataclasses.replace(cfg, cache=os.path.abspath(cfg.cache))
    # --address, $RAY_ADDRESS (a Ray job), else a new local cluster
    started = init_ray(
        address, new_local=True, num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False
    )
    try:
        save_config(cfg, cfg.output, "study_config.yaml")
        pretrain = functools.partial(pretrain_stage, init="pretrained", launcher=cfg.runner.pretrain)
        data = prepare_data(cfg.data, storage.join(cfg.store, "data"), pretrain=pretrain)
        cells = expand_grid(cfg)
        runs = [resolve_cell(cfg, p, data, seed) for p in cells for seed in cfg.seeds]
        results, counts = _run_all(cfg, runs, data)
    finally:
        if started:
            ray.shutdown()
    wall = round(time.time() - t0, 1)
    files = write_report(results, cfg.output, report=cfg.report, title=cfg.name, wall_s=wall)
    return {
        "cells": len(cells),
        "runs": len(runs),
        **counts,
        "wall_s": wall,
        "results": results,
        "files": files,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML under configs/study/")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    parser.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. output=studies/x")


CONFIG_DIR = "configs/study"  # where this command's --config YAMLs live (jobs.cli.config_registry)
CONFIG_CLASS = StudyConfig
CONFIG_DIRS = {"configs/study/data": DataConfig}  # data sections shared by studies (``data_file``)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(StudyConfig, args.config, args.overrides)
        out = run_study(cfg, address=args.address)
    except ValueError as e:
        print(f"vmae study: error: {e}", file=sys.stderr)
        return 2
    print(f"vmae study {cfg.name}: {out['cells']} cells x {len(cfg.seeds)} seeds ({out['ran']} run, "
          f"{out['skipped']} already done, {out['pretrain_runs']} pretraining runs) in {out['wall_s']:.0f} s")  # fmt: skip
    for name, url in out["files"].items():
        print(f"  {name}: {url}")
    return 0
