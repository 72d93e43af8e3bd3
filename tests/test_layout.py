"""The rules the source tree keeps (docs/architecture.md, "Rules the layout keeps"): module size,
no import cycles, and which package may import which."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rdzv", "launcher")
MAX_LINES = 400
GENERATED = ROOT / "rdzv" / "etcd" / "proto"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run at import: module level, into `if`/`try` blocks, never into a
    function or an `if TYPE_CHECKING:` block (annotations only)."""
    for node in body:
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _top_level(block)
        else:
            yield node


def imports(path: Path, *, at_import_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = _top_level(tree.body) if at_import_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def test_no_module_is_over_400_lines() -> None:
    long = {
        name: n for name, path in modules().items()
        if GENERATED not in path.parents and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_cycle() -> None:
    known = modules()
    graph = {name: {m for m in imports(path, at_import_only=True) if m in known and m != name}
             for name, path in known.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(name):], name]))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def allowed(importer: str, imported: str) -> bool:
    """The dependency rules between packages (a function-level import counts too)."""
    if importer.startswith("rdzv") and imported.startswith("launcher"):
        return False  # the library never needs the launcher
    if importer.startswith("rdzv.etcd"):
        # The etcd client knows nothing of rendezvous: it could be published on its own.
        return not imported.startswith(("rdzv.rendezvous", "rdzv.backends"))
    if importer.startswith("rdzv.rendezvous") and imported.startswith("rdzv.backends"):
        return imported == "rdzv.backends.api" or imported.startswith("rdzv.backends.api.")
    if importer.startswith("rdzv.backends.") and imported.startswith("rdzv.backends."):
        mine, theirs = importer.split(".")[2], imported.split(".")[2]
        shared = ("api", "common")
        # static is c10d with fixed ranks: the one backend built on another.
        return mine == theirs or theirs in shared or (mine, theirs) == ("static", "c10d")
    return True


def test_packages_import_only_what_the_layout_allows() -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, path in modules().items()
        for target in imports(path, at_import_only=False)
        if not allowed(name, target)
    )
    assert not wrong, "\n".join(wrong)
