"""The package's layers import downward only: records and errors at the bottom, then config, data,
model, engine, tracking, reports, analysis and the gmoe-train entry point."""

from __future__ import annotations

import ast

from tests.conftest import REPO

# Each unit (a folder of gmoe_bench, or a top-level module) may import only units of a lower rank.
RANK = {"errors": 0, "records": 0, "config": 1, "output_dirs": 2, "data": 3, "model": 4,
        "engine": 5, "tracking": 5, "reports": 6, "analysis": 7, "sweep_check": 8, "train": 8,
        "entry": 9}


def unit(module: str) -> str:
    """'gmoe_bench.engine.run' -> 'engine'; 'gmoe_bench.records' -> 'records'."""
    return module.split(".")[1]


def package_imports() -> dict[str, set[str]]:
    """unit -> the other gmoe_bench units its modules import (at any depth, lazily or not)."""
    graph: dict[str, set[str]] = {}
    for path in (REPO / "gmoe_bench").rglob("*.py"):
        source = unit(".".join(path.relative_to(REPO).with_suffix("").parts))
        edges = graph.setdefault(source, set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            edges |= {unit(n) for n in names if n.startswith("gmoe_bench.") and unit(n) != source}
    graph.pop("__init__", None)
    return graph


def test_layers_import_downward_only() -> None:
    graph = package_imports()
    assert set(graph) <= set(RANK), f"a new unit needs a rank: {set(graph) - set(RANK)}"
    upward = {(a, b) for a, targets in graph.items() for b in targets if RANK[b] >= RANK[a]}
    assert not upward, f"imports against the layering: {sorted(upward)}"
    assert graph["records"] == set() and graph["errors"] == set()
