"""``parallel.compile`` scopes reach ``model.parallelize`` through the config loader and ``session.wrap``:
``true``/``blocks`` compile each transformer block, ``model`` the whole pretraining forward (numerics of both are
checked in tests/model/test_parallelize.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.train.config import ParallelConfig, PretrainConfig
from jobs.train.session import LocalSession, wrap
from model import VideoMAE, get_config

ROOT = Path(__file__).resolve().parents[3]


def _compiled(model: VideoMAE) -> tuple[bool, bool]:
    """(whole forward compiled, every block compiled)."""
    blocks = [*model.encoder.blocks, *model.decoder.blocks]
    return "forward_indexed" in vars(model), all(b._compiled_call_impl is not None for b in blocks)


@pytest.mark.parametrize(
    ("value", "want"), [("false", (False, False)), ("true", (False, True)), ("blocks", (False, True)),
                        ("model", (True, False))],
)  # fmt: skip
def test_compile_scope_from_an_override_reaches_the_model(value, want, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name each other relative to the project root
    cfg = load_config(PretrainConfig, "configs/pretrain/debug.yaml", [f"parallel.compile={value}"])
    model = wrap(VideoMAE(get_config("tiny")), cfg.parallel, LocalSession(str(tmp_path), device="cpu"))
    assert _compiled(model) == want  # compiled lazily: nothing runs inductor here


def test_compile_scope_values_are_checked():
    with pytest.raises(ValueError, match="parallel.compile must be"):
        ParallelConfig(compile="whole")
    with pytest.raises(ValueError, match="not supported with parallel.strategy=fsdp"):
        ParallelConfig(compile="model", strategy="fsdp")
    assert ParallelConfig(compile="blocks", strategy="fsdp").compile == "blocks"
