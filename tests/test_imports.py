"""The package's layers import in one direction: no cycle between its subpackages, counting
every import (also those inside functions); checkpoint sources outside io/ are named by module
path in a table, never imported by io/."""

from __future__ import annotations

import ast
from pathlib import Path

import rlvr_ray
from rlvr_ray.io.sources import SOURCES

ROOT = Path(rlvr_ray.__file__).parent


def _part(module: str) -> str | None:
    """rlvr_ray.io.checkpoint -> "io"; a module of the package's top level -> its name."""
    parts = module.split(".")
    return parts[1] if parts[0] == "rlvr_ray" and len(parts) > 1 else None


def package_imports() -> dict[str, set[str]]:
    """subpackage -> the other subpackages its modules import."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        here = _part(".".join(rel.parts))
        if here is None or here == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                there = _part(name)
                if there and there != here:
                    graph.setdefault(here, set()).add(there)
    return graph


def _reaches(graph: dict[str, set[str]], a: str, b: str) -> bool:
    seen, todo = set(), [a]
    while todo:
        x = todo.pop()
        if x == b:
            return True
        if x not in seen:
            seen.add(x)
            todo += graph.get(x, ())
    return False


def test_io_and_hub_do_not_import_each_other():
    graph = package_imports()
    assert "io" in graph.get("hub", set())  # the Hub reads checkpoints through io
    assert not _reaches(graph, "io", "hub"), graph.get("io")


def test_no_cycle_between_io_stats_and_hub():
    graph = package_imports()
    for a in ("io", "stats", "hub"):
        for b in graph.get(a, ()):
            assert not _reaches(graph, b, a), (a, b)


def test_every_source_module_exists_and_opens_refs():
    import importlib

    for scheme, module in SOURCES.items():
        assert callable(importlib.import_module(module).open_source), scheme
