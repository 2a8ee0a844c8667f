"""Imports in ``jobs/`` go one way (STYLE.md 1, ``jobs/__init__.py``), Ray starts in one place, and no module
reaches into another's private names.

Layers, a module importing only its own package or the layers below it:
``demo``, ``cli``, ``submit`` -> ``study`` -> ``data`` -> ``eval`` -> ``train`` -> ``config``, ``ray_utils``.
Function-level imports count too: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY = 5  # the entry points may import each other (``submit`` reads ``cli.COMMANDS``)
LAYERS = {"config": 0, "ray_utils": 0, "train": 1, "eval": 2, "data": 3, "study": 4,
          "demo": ENTRY, "cli": ENTRY, "submit": ENTRY}  # fmt: skip


def jobs_modules() -> dict[str, Path]:
    """``jobs.x.y`` -> its file, for every module of ``jobs/`` (package ``__init__`` files left out)."""
    out = {}
    for path in sorted((ROOT / "jobs").rglob("*.py")):
        if path.name != "__init__.py":
            out[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    return out


def imports(source: str) -> list[tuple[str, str, int]]:
    """``(module, name, line)`` of every absolute import at any depth: ``from a.b import c`` gives
    ``("a.b", "c", line)``, ``import a.b`` gives ``("a.b", "", line)``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.module, a.name, node.lineno) for a in node.names]
    return out


def jobs_dependencies(source: str, known: set[str]) -> set[str]:
    """The ``jobs`` modules (of ``known``) that ``source`` imports: ``from jobs.train import checkpointing``
    and ``from jobs.train.checkpointing import unwrap`` both import ``jobs.train.checkpointing``."""
    deps = set()
    for module, name, _ in imports(source):
        for candidate in (f"{module}.{name}", module):
            if candidate in known:
                deps.add(candidate)
                break
    return deps


def layer(module: str) -> int:
    return LAYERS[module.split(".")[1]]


def allowed(importer: str, imported: str) -> bool:
    a, b = importer.split(".")[1], imported.split(".")[1]
    return a == b or layer(imported) < layer(importer) or layer(importer) == layer(imported) == ENTRY


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a list of nodes, first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


MODULES = jobs_modules()
GRAPH = {m: jobs_dependencies(p.read_text(), set(MODULES)) - {m} for m, p in MODULES.items()}


def test_every_jobs_module_has_a_layer() -> None:
    assert {m.split(".")[1] for m in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_jobs_imports_go_one_way(module: str) -> None:
    bad = sorted(d for d in GRAPH[module] if not allowed(module, d))
    assert not bad, (
        f"{module} (layer {layer(module)}) imports {bad}: {' -> '.join(LAYERS)} (to the right only)"
    )


def test_jobs_imports_have_no_cycle() -> None:
    assert find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(find_cycle(GRAPH))}"


def python_files() -> list[Path]:
    return sorted(p for d in ("jobs", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py"))


def test_no_private_import_from_jobs() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line}: from {m} import {n}"
           for p in python_files() for m, n, line in imports(p.read_text())
           if m.split(".")[0] == "jobs" and n.startswith("_")]  # fmt: skip
    assert not bad, "make the name public or move it:\n" + "\n".join(bad)


def ray_init_calls(source: str) -> list[int]:
    """Lines that call ``ray.init(`` (or import ``init`` from ray)."""
    lines = [line for m, n, line in imports(source) if m == "ray" and n == "init"]
    for node in ast.walk(ast.parse(source)):
        f = getattr(node, "func", None)
        if (
            isinstance(f, ast.Attribute)
            and f.attr == "init"
            and isinstance(f.value, ast.Name)
            and f.value.id == "ray"
        ):
            lines.append(node.lineno)
    return lines


def test_only_ray_utils_starts_ray() -> None:
    found = [
        f"{p.relative_to(ROOT)}:{line}" for p in MODULES.values() for line in ray_init_calls(p.read_text())
    ]
    assert found and all(f.startswith("jobs/ray_utils.py:") for f in found), found
    text = [str(p.relative_to(ROOT)) for p in MODULES.values() if "ray.init(" in p.read_text()]
    assert text == ["jobs/ray_utils.py"], text  # what `grep -rn "ray.init(" jobs` shows


def test_the_checkers_see_violations() -> None:
    known = {"jobs.study.cells", "jobs.study.data", "jobs.train.checkpointing", "jobs.eval.features"}
    src = "def f():\n    from jobs.study.cells import pretrain_stage\n    import jobs.eval.features\n"
    assert jobs_dependencies(src, known) == {"jobs.study.cells", "jobs.eval.features"}
    assert jobs_dependencies("from jobs.train import checkpointing as c\n", known) == {
        "jobs.train.checkpointing"
    }
    assert not allowed("jobs.train.launch", "jobs.eval.features")  # train never imports eval
    assert not allowed("jobs.ray_utils", "jobs.config") and allowed("jobs.submit", "jobs.cli")
    assert allowed("jobs.data.embed", "jobs.eval.features") and allowed("jobs.study.cells", "jobs.study.data")
    cycle = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    private = (
        "from jobs.data.shard import RayConfig, " + "_init_ray\n"
    )  # split: a grep for the rule stays clean
    assert [n for _, n, _ in imports(private)] == ["RayConfig", "_init_ray"]
    assert ray_init_calls("import ray\n\ndef go():\n    ray.init(address='local')\n") == [4]
    assert ray_init_calls('"""docs: ray.init("ray://x")"""\nfrom ray import init\n') == [2]
