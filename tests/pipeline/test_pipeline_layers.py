"""Imports in ``pipeline/`` and ``model/`` go one way (STYLE.md 1, ``pipeline/__init__.py``).

pipeline: ``storage`` <- ``ingest`` <- ``loader`` <- ``curation`` (a module imports its own layer or lower ones);
``model/`` and ``pipeline/`` never import ``jobs/``; ``model/`` imports neither ray nor torch.distributed except
``model/parallelize.py``. Function-level imports count too: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE_LAYERS = {"storage": 0, "ingest": 1, "loader": 2, "curation": 3}


def imported_modules(path: Path) -> list[str]:
    """Every absolute module name ``path`` imports, at any depth (``from a.b import c`` gives ``a.b`` and
    ``a.b.c``: ``from pipeline import storage`` imports the module ``pipeline.storage``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def pipeline_layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) < 2:
        return None
    return PIPELINE_LAYERS.get(parts[1])


@pytest.mark.parametrize("path", modules("pipeline"), ids=lambda p: str(p.relative_to(ROOT)))
def test_pipeline_imports_go_one_way(path: Path) -> None:
    rel = path.relative_to(ROOT).with_suffix("")
    own = pipeline_layer(".".join(rel.parts))
    for name in imported_modules(path):
        assert not name.startswith("jobs"), f"{rel} imports {name}: pipeline/ never imports jobs/"
        layer = pipeline_layer(name)
        if own is not None and layer is not None:
            assert layer <= own, f"{rel} (layer {own}) imports {name} (layer {layer}): imports go one way"


@pytest.mark.parametrize("path", modules("model"), ids=lambda p: str(p.relative_to(ROOT)))
def test_model_imports_no_jobs_and_no_ray(path: Path) -> None:
    rel = path.relative_to(ROOT)
    for name in imported_modules(path):
        assert not name.startswith("jobs"), f"{rel} imports {name}: model/ never imports jobs/"
        if rel.name != "parallelize.py":
            assert name.split(".")[0] != "ray", f"{rel} imports {name}"
            assert not name.startswith("torch.distributed"), f"{rel} imports {name}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pipeline.curation import quality\n    import jobs.cli\n")
    names = imported_modules(bad)
    assert "pipeline.curation.quality" in names and "jobs.cli" in names
    assert pipeline_layer("pipeline.curation.quality") > pipeline_layer("pipeline.ingest.shards")
