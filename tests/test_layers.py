"""Imports run one way (docs/architecture.md): streams/ and corpora/ at the bottom, then the
libraries vectorstore/, verification/ and llm/ (none imports another), workers/, trainer/, and
promptcot/ (settings root, stage registry, CLI) on top.

Every import statement of every module counts, including imports inside functions (they run
too); only ``if TYPE_CHECKING:`` blocks are exempt (type hints, never executed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED: dict[str, set[str]] = {
    "corpora": set(),
    "streams": set(),
    "vectorstore": {"streams", "corpora"},
    "verification": {"streams", "corpora"},
    "llm": {"streams", "corpora"},
    "workers": {"llm", "verification", "vectorstore", "streams", "corpora"},
    "trainer": {"workers", "llm", "verification", "vectorstore", "streams", "corpora"},
    "promptcot": {"trainer", "workers", "llm", "verification", "vectorstore", "streams", "corpora"},
}


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every import outside ``if TYPE_CHECKING:``."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_down_the_layers(package):
    violations = []
    for path in _modules(package):
        for line, imported in _imports(ast.parse(path.read_text(), str(path))):
            if imported in ALLOWED and imported != package and imported not in ALLOWED[package]:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_the_check_sees_a_violation():
    """The walker finds imports inside functions and skips TYPE_CHECKING blocks."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from promptcot.settings import Settings\n"
        "def f():\n    import trainer.em\n"
    )
    assert [name for _, name in _imports(tree)] == ["typing", "trainer"]


def test_every_project_package_is_layered():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - {"tests", "bench"} == set(ALLOWED)
