"""The import graph of the project's own packages has no circle, and no
import inside a function hides one (docs/architecture.md: the layers). A
module's top-level imports are its edges (TYPE_CHECKING blocks left out);
importing `a.b.c` runs `a` and `a.b` first, so those are edges too, but a
module's own packages are not (they are being imported already)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("accounts", "api", "chatsite", "conversations", "files")


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    top: dict[str, set[str]] = {name: set() for name in modules}
    inside: dict[str, set[str]] = {name: set() for name in modules}

    def imported(name: str) -> list[str]:
        parts = name.split(".")
        return [m for m in (".".join(parts[: i + 1]) for i in range(len(parts))) if m in modules]

    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]

        def visit(node: ast.AST, in_function: bool, name: str = name, here: list[str] = here) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [alias.name for alias in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = here[: len(here) - child.level + 1] if child.level else []
                    module = ".".join([*base, *([child.module] if child.module else [])])
                    names = [module, *(f"{module}.{alias.name}" for alias in child.names)]
                for target in {t for n in names for t in imported(n)}:
                    if target != name and not name.startswith(target + "."):
                        (inside if in_function else top)[name].add(target)
                function = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                visit(child, in_function or function)

        visit(ast.parse(path.read_text()), False)
    return top, inside


def _reaches(top: dict[str, set[str]], start: str, goal: str) -> bool:
    seen: set[str] = set()
    stack = [start]
    while stack:
        current = stack.pop()
        if current == goal:
            return True
        if current not in seen:
            seen.add(current)
            stack.extend(top[current])
    return False


def test_no_module_imports_one_that_imports_it_back_at_the_top_or_inside_a_function() -> None:
    top, inside = _graph()
    assert len(top) > 100  # the walk found the code
    circles = sorted(f"{a} -> {b}" for a in top for b in top[a] if _reaches(top, b, a))
    assert circles == []
    hidden = sorted(f"{a} -> {b}" for a in inside for b in inside[a] - top[a] if _reaches(top, b, a))
    assert hidden == []


def test_accounts_imports_nothing_of_conversations() -> None:
    top, inside = _graph()
    reached = {b for a in top if a.startswith("accounts") for b in top[a] | inside[a]}
    assert not [b for b in reached if b.startswith("conversations")]
