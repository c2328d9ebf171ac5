"""The import direction of STYLE.md §1: cli -> control, aio -> core, never back.

The sans-IO core must not import asyncio, sockets, the clock or the upper layers: an
AST scan of every module, so a violation fails here rather than in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "migrelay"

FORBIDDEN_IN_CORE = {
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "time",
    "uvloop",
    "migrelay.aio",
    "migrelay.control",
    "migrelay.cli",
    "qemu",
}
FORBIDDEN_IN_AIO = {"migrelay.control", "migrelay.cli", "qemu", "typer"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = "migrelay." + ".".join(path.relative_to(SRC).parent.parts)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rstrip(".").split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
    return names


def _violations(layer: str, forbidden: set[str]) -> list[str]:
    found = []
    for path in sorted((SRC / layer).rglob("*.py")):
        for name in _imports(path):
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                found.append(f"{path.relative_to(SRC)} imports {name}")
    return found


@pytest.mark.parametrize(
    ("layer", "forbidden"), [("core", FORBIDDEN_IN_CORE), ("aio", FORBIDDEN_IN_AIO)]
)
def test_layer_imports_only_downwards(layer: str, forbidden: set[str]) -> None:
    assert _violations(layer, forbidden) == []


def test_layering_scan_detects_a_forbidden_import(tmp_path: Path) -> None:
    # The scan itself must be able to fail: resolve a relative import the way it would
    # appear in core/.
    module = SRC / "core" / "frames.py"
    assert "migrelay.core.events" in _imports(module)
    assert "migrelay.errors" in _imports(module)
