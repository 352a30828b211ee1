"""Size limits of the runtime code, checked with ``ast``: short functions, short modules.

A function longer than a screen or a module longer than 400 lines is where the next
feature gets tangled in; the limit is a test so it stays true, and the failure message
lists every violation (file, line, name, length) so one run shows the whole debt.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hutch", "hutch_bench", "pipeline", "topology")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400

_Function = ast.FunctionDef | ast.AsyncFunctionDef


def _modules() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def _functions(tree: ast.AST) -> Iterator[tuple[str, _Function]]:
    """Every function and method, nested ones included, with its dotted qualified name."""

    def walk(node: ast.AST, scope: str) -> Iterator[tuple[str, _Function]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, _Function | ast.ClassDef):
                name = f"{scope}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield name, child
                yield from walk(child, f"{name}.")
            else:
                yield from walk(child, scope)

    yield from walk(tree, "")


def _function_length(function: _Function) -> int:
    """Lines from the ``def`` (decorators excluded) to the last line of the body."""
    end = function.end_lineno or function.lineno
    return end - function.lineno + 1


def _violations() -> list[str]:
    found: list[str] = []
    for path in _modules():
        source = path.read_text()
        relative = path.relative_to(ROOT)
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{relative}: module has {lines} lines (max {MAX_MODULE_LINES})")
        for name, function in _functions(ast.parse(source, filename=str(path))):
            length = _function_length(function)
            if length > MAX_FUNCTION_LINES:
                found.append(f"{relative}:{function.lineno}: {name} has {length} lines "
                             f"(max {MAX_FUNCTION_LINES})")
    return found


def test_the_checker_sees_the_code() -> None:
    """Guard against a vacuous pass: the scan finds the packages and their functions."""
    modules = _modules()
    assert any(path.name == "worker.py" for path in modules)
    tree = ast.parse((ROOT / "pipeline" / "settings.py").read_text())
    assert sum(1 for _ in _functions(tree)) > 5


def test_function_length_counts_from_def_to_last_line() -> None:
    tree = ast.parse("@decorator\ndef f():\n    x = 1\n\n    return x\n")
    [(name, function)] = list(_functions(tree))
    assert (name, _function_length(function)) == ("f", 4)


def test_nested_functions_and_methods_are_named() -> None:
    tree = ast.parse("class A:\n    def m(self):\n        def inner():\n            pass\n")
    assert [name for name, _ in _functions(tree)] == ["A.m", "A.m.inner"]


def test_no_long_functions_or_modules() -> None:
    violations = _violations()
    assert not violations, (
        f"{len(violations)} size limit violation(s):\n" + "\n".join(violations))
