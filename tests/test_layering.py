"""The import direction of the package, for every module: an AST scan, not a review.

::

    cli      the commands: parse, call one function below, report
     │ ─ ─ ─ ▶ lab     test VMs, namespaces, the bench (only ``bench`` imports it, lazily)
     ▼          │
    control  QMP: all of QEMU's vocabulary, the migration steps, the commands' work
     ▼
    aio      sockets and the event loop: server, source relay, channel pump, TLS
     ▼
    core     sans-IO: frames, handshake, header vocabulary, session and closing rules

    errors, units, limits, _types, config_file: leaves any layer may import.

A module may import its own layer and the layers below it, never one above. The core
also imports no I/O at all (asyncio, sockets, TLS, the clock). Only
``migrelay.control.qmp`` imports ``qemu.qmp``, and nothing but the CLI imports typer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "migrelay"

#: Top to bottom: a module may import only what stands at its own place or below.
LAYERS = ("__main__", "cli", "lab", "control", "aio", "core")
#: Modules outside the layers that every layer may use; they import only each other and
#: the core (`limits` reads the codec's constants).
LEAVES = ("errors", "units", "limits", "_types", "config_file")
#: No I/O in the sans-IO core (STYLE.md §2).
IO_MODULES = {"asyncio", "socket", "ssl", "selectors", "time", "uvloop"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("migrelay", *parts))


def _imports(path: Path, package: str | None = None) -> set[str]:
    """Every module ``path`` imports, relative imports resolved within ``package``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if package is None:
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
            # `from migrelay import cli` imports the module migrelay.cli.
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _place(module: str) -> str | None:
    """The layer (or leaf) a ``migrelay.*`` module belongs to; None for the package root."""
    parts = module.split(".")
    if parts[0] != "migrelay" or len(parts) < 2:
        return None
    return parts[1]


def _allowed(importer: str, imported: str) -> bool:
    if importer in LEAVES:
        return imported in LEAVES or imported == "core"
    if imported in LEAVES or imported == importer:
        return True
    if imported in LAYERS:
        return LAYERS.index(imported) > LAYERS.index(importer)
    # The package's own attributes (``__version__``) and the C speedup (``_speedups``).
    return imported.startswith("_")


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if _place(_module_name(p)) is not None)


def _layering_violations(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        importer = _place(_module_name(path))
        assert importer is not None
        for name in sorted(_imports(path)):
            imported = _place(name)
            if imported is None or name == "migrelay.__version__":
                continue
            if not _allowed(importer, imported):
                found.append(f"{path.relative_to(SRC)} ({importer}) imports {name} ({imported})")
    return found


def test_every_module_belongs_to_a_layer_or_a_leaf() -> None:
    places = {_place(_module_name(path)) for path in _sources()}
    assert places <= {*LAYERS, *LEAVES}, places


def test_every_module_imports_only_its_own_layer_and_those_below() -> None:
    assert _layering_violations(_sources()) == []


def test_the_core_does_no_io() -> None:
    found = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in _sources()
        if _place(_module_name(path)) == "core"
        for name in _imports(path)
        if name.split(".")[0] in IO_MODULES or name.startswith("qemu")
    ]
    assert found == []


@pytest.mark.parametrize(
    ("package", "owner"),
    [
        ("qemu", "migrelay.control.qmp"),  # all QMP vocabulary in one module
        ("typer", "migrelay.cli"),  # the command line in one package
        ("matplotlib", "migrelay.lab"),  # plots are the lab's
    ],
)
def test_a_library_is_imported_only_by_its_owner(package: str, owner: str) -> None:
    importers = {
        _module_name(path)
        for path in _sources()
        for name in _imports(path)
        if name == package or name.startswith(package + ".")
    }
    assert all(m == owner or m.startswith(owner + ".") for m in importers), importers


def test_the_lab_is_loaded_only_by_the_bench_command() -> None:
    # A relay command must not pay for (or depend on) the harness: the CLI imports the
    # lab inside `bench` only, never at module level.
    for path in sorted((SRC / "cli").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                )
                assert not any(n.startswith("migrelay.lab") for n in names), path


def test_the_scan_sees_a_forbidden_import(tmp_path: Path) -> None:
    # The scan itself must be able to fail: an upward import, relative or absolute.
    assert "migrelay.errors" in _imports(SRC / "core" / "frames.py")
    for text in ("from ..aio import server\n", "from migrelay.cli import app\n"):
        probe = tmp_path / "probe.py"
        probe.write_text(text)
        names = _imports(probe, package="migrelay.core")
        assert any(not _allowed("core", _place(name) or "core") for name in names), names
    assert not _allowed("aio", "control")
    assert not _allowed("control", "lab")
    assert not _allowed("lab", "cli")
    assert not _allowed("units", "aio")
    assert _allowed("cli", "lab") and _allowed("control", "aio") and _allowed("aio", "errors")
