"""The error tree (`migrelay.errors`): every class is a RelayError and drawn in the docstring.

A caller catches `RelayError` for "anything migrelay raised on purpose"; a class left
out of the tree (as `Refusal` once was) escapes that, and a class left out of the
drawing is one a reader of the module does not know exists.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import migrelay.errors as errors_module
from migrelay.errors import RelayError

SRC = Path(__file__).resolve().parent.parent / "src" / "migrelay"


def _classes() -> dict[str, type]:
    return {
        name: value
        for name, value in vars(errors_module).items()
        if inspect.isclass(value) and value.__module__ == errors_module.__name__
    }


def test_every_error_class_is_a_relay_error_and_in_the_drawing() -> None:
    drawing = errors_module.__doc__ or ""
    for name, cls in _classes().items():
        assert issubclass(cls, RelayError), name
        assert f" {name} " in drawing or f"{name}\n" in drawing, f"{name} is not drawn"


def test_the_drawing_shows_each_class_under_its_base() -> None:
    # The drawing's indentation is the hierarchy: each class sits under its base.
    lines = [line for line in (errors_module.__doc__ or "").splitlines() if "─ " in line]
    depth: dict[str, int] = {"RelayError": -1}
    stack: list[tuple[int, str]] = [(-1, "RelayError")]
    for line in lines:
        name = line.split("─ ", 1)[1].split()[0]
        column = line.index("─ ")
        while stack and stack[-1][0] >= column:
            stack.pop()
        parent = stack[-1][1]
        assert _classes()[name].__bases__[0].__name__ == parent, (name, parent)
        stack.append((column, name))
        depth[name] = column
    assert set(depth) - {"RelayError"} == set(_classes()) - {"RelayError"}


def test_no_module_outside_errors_defines_an_exception() -> None:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if any(b.endswith(("Error", "Exception")) for b in bases):
                    found.append(f"{path.relative_to(SRC)}: {node.name}")
    assert found == []
