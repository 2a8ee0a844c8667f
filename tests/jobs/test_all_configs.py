"""Every YAML under configs/ loads into the dataclass of the job it configures (a new folder must be added
here, so no shipped config can rot unloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def _config_class(path: Path):
    rel = path.relative_to(CONFIGS).parts
    if rel[0] == "shard":
        from jobs.shard import ShardJobConfig

        return ShardJobConfig
    if rel[:2] == ("curate", "subsets"):
        from pipeline.subset import SubsetRule

        return SubsetRule
    if rel[0] == "curate":
        from jobs.curate import CurateConfig

        return CurateConfig
    if rel[0] == "synth":
        from pipeline.synth import SynthConfig

        return SynthConfig
    if rel[0] == "pretrain":
        from jobs.pretrain_config import PretrainConfig

        return PretrainConfig
    if rel[0] == "finetune":
        from jobs.finetune_config import FinetuneConfig

        return FinetuneConfig
    if rel[0] == "eval":
        from jobs.evaluate import EvalConfig

        return EvalConfig
    if rel[0] == "study":
        from jobs.study import StudyConfig

        return StudyConfig
    raise AssertionError(f"{path}: no config class registered for configs/{rel[0]}/ in this test")


ALL = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_configs():
    assert len(ALL) >= 20


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(CONFIGS)) for p in ALL])
def test_every_yaml_loads(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name each other relative to the project root
    cfg = load_config(_config_class(path), str(path))
    assert cfg is not None
