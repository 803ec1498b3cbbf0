"""Print the structural figures of the package: class and function sizes, local-versus-remote
branches (conditionals on them) outside ``storage/``, private members reached across modules, and internal imports made
by the adapters.

    python scripts/structure_figures.py [package_dir]

Used for the before-and-after figures of the seams redesign; run it on any checkout.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

BRANCH = re.compile(r"\bis_url\(|\.remote\b|_local_disk\b|isinstance\([^)]*LocalStore")
CONDITIONAL = re.compile(r"\b(if|elif|else|while)\b")
ADAPTERS = ("cli.py", "hf.py", "lightning.py")


def _modules(package: Path) -> list[Path]:
    return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


def _sizes(package: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    classes, functions = [], []
    for path in _modules(package):
        tree = ast.parse(path.read_text())
        name = path.relative_to(package.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
    return sorted(classes, reverse=True), sorted(functions, reverse=True)


def _branches(package: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for path in _modules(package):
        relative = path.relative_to(package)
        if relative.parts[0] in ("storage", "_storage"):
            continue
        lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
        count = sum(1 for line in lines if BRANCH.search(line) and CONDITIONAL.search(line))
        if count:
            found[str(relative)] = count
    return found


def _internal_imports(package: Path) -> dict[str, list[str]]:
    found = {}
    for adapter in ADAPTERS:
        path = package / adapter
        if not path.exists():
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1 and node.module:
                names.add(node.module)
        found[adapter] = sorted(names)
    return found


def main(package: Path) -> None:
    classes, functions = _sizes(package)
    print("classes over 300 lines:", [f"{name} ({size})" for size, name in classes if size > 300])
    print("largest classes:", [f"{name} ({size})" for size, name in classes[:6]])
    print("functions over 60 lines:", [f"{name} ({size})" for size, name in functions if size > 60])
    branches = _branches(package)
    print(f"local/remote branches outside storage/: {sum(branches.values())}", branches)
    for adapter, modules in _internal_imports(package).items():
        print(f"{adapter} imports {len(modules)} package modules: {modules}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "ckpt_plugin").resolve())
