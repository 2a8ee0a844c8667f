"""Every YAML under configs/ loads into the config class of the command that reads it (each command module
declares its ``CONFIG_DIR`` / ``CONFIG_CLASS``; ``jobs.cli.config_registry`` collects them), and every value
the YAML sets arrives in the loaded config unchanged (no key dropped, renamed or mis-converted). Semantic
checks of the shipped recipes live next to their jobs' tests (paper lr/batch, model/clip consistency, ...)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.cli import config_registry
from jobs.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
REGISTRY = config_registry()
ALL = sorted(CONFIGS.rglob("*.yaml"))


def _config_class(path: Path) -> type:
    rel = path.relative_to(ROOT).as_posix()
    dirs = [d for d in REGISTRY if rel.startswith(d + "/") and "/" not in rel[len(d) + 1 :]]
    assert dirs, f"{rel}: no command declares CONFIG_DIR for its folder (registered: {sorted(REGISTRY)})"
    return REGISTRY[dirs[0]]


def _same(want, got, where: str) -> None:
    """Every key/value of ``want`` (the YAML) is in ``got`` (the loaded config as a plain dict)."""
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: YAML has a mapping, config has {got!r}"
        for k, v in want.items():
            assert k in got, f"{where}.{k}: set in the YAML, missing from the loaded config"
            _same(v, got[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {want!r} loaded as {got!r}"
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            _same(w, g, f"{where}[{i}]")
    else:
        assert got == want and (isinstance(want, bool) == isinstance(got, bool)), (
            f"{where}: {want!r} -> {got!r}"
        )


def test_registry_covers_every_config_folder():
    folders = {p.parent.relative_to(ROOT).as_posix() for p in ALL}
    assert folders == set(REGISTRY), "every configs/ folder is read by exactly one command and vice versa"
    assert len(ALL) >= 20


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(CONFIGS)) for p in ALL])
def test_every_yaml_loads_with_its_values(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name each other relative to the project root
    cls = _config_class(path)
    cfg = load_config(cls, str(path))
    assert isinstance(cfg, cls)
    _same(yaml.safe_load(path.read_text()) or {}, to_dict(cfg), path.stem)


GPU_PRETRAIN = ("vit_s", "vit_b", "vit_l")
GPU_STUDIES = sorted((CONFIGS / "study").glob("*_gpu.yaml"))


def _feedable(cfg, where: str) -> None:
    """A GPU recipe the loader can feed (benchmarks/feed.py): repeated sampling (R = 2..4 clips per decode, as
    VideoMAE V2 and MAE-ST) and decode workers from the node's CPUs."""
    loader = cfg.loader
    assert 2 <= loader.num_sample <= 4, f"{where}: loader.num_sample {loader.num_sample}"
    assert loader.batch_size % loader.num_sample == 0 and loader.videos_per_batch >= 2, where
    assert loader.num_workers == "auto" and loader.pin_memory is True, where


@pytest.mark.parametrize("name", GPU_PRETRAIN)
def test_gpu_pretrain_recipes_can_be_fed(name, monkeypatch):
    from jobs.train.config import PretrainConfig

    monkeypatch.chdir(ROOT)
    cfg = load_config(PretrainConfig, f"configs/pretrain/{name}.yaml")
    _feedable(cfg, name)
    assert cfg.loader.num_sample == (2 if name == "vit_l" else 4)  # the figures cited in the YAML


@pytest.mark.parametrize("path", GPU_STUDIES, ids=[p.name for p in GPU_STUDIES])
def test_gpu_studies_pretrain_with_a_feedable_recipe(path, monkeypatch):
    """A study's pretraining runs are its pretrain config plus its overrides (as ``jobs.study.study`` resolves
    them): they keep the recipe's repeated sampling and workers."""
    from jobs.study.study import StudyConfig
    from jobs.train.config import PretrainConfig

    monkeypatch.chdir(ROOT)
    study = load_config(StudyConfig, str(path))
    cfg = load_config(PretrainConfig, study.pretrain.config, list(study.pretrain.overrides))
    _feedable(cfg, path.name)
    assert cfg.scaling.use_gpu
