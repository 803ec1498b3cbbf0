"""Every fenced ``python`` block of README.md and of ``docs/`` runs as written, collected by Sybil.

A block runs after the prelude named in an HTML comment just above it (``<!-- prelude: hf -->``),
or after ``torch`` when there is none; the preludes (``tests/doc_preludes.py``) define the tiny
model and training objects a block uses without defining. Within one page, the blocks of one
prelude share a namespace and a fresh working directory, so a later block sees what an earlier one
saved.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sybil import Document, Example, Region, Sybil

sys.path.insert(0, str(Path(__file__).parent / "tests"))

BLOCK = re.compile(r"(?:<!-- prelude: (?P<prelude>\w+) -->\n)?```python\n(?P<code>.*?)```", re.S)
_STATE = "__doc_state__"


def python_blocks(document: Document) -> Iterator[Region]:
    """One region per fenced python block, parsed as ``(prelude, first line, code)``."""
    for match in BLOCK.finditer(document.text):
        line = document.text.count("\n", 0, match.start("code")) + 1
        yield Region(match.start(), match.end(), (match["prelude"] or "torch", line, match["code"]), run_block)


def run_block(example: Example) -> None:
    """Run one block in its prelude's namespace and working directory."""
    prelude, line, code = example.parsed
    state = example.namespace[_STATE]
    namespace = state["namespaces"].get(prelude)
    if namespace is None:
        from doc_preludes import PRELUDES

        if prelude not in PRELUDES:
            raise ValueError(f"{example.path}:{line}: unknown prelude {prelude!r}; choose one of {sorted(PRELUDES)}")
        directory = Path(state["root"]) / prelude
        directory.mkdir()
        os.chdir(directory)
        namespace = state["namespaces"][prelude] = {"__name__": "__docs__", **PRELUDES[prelude]()}
        state["directories"][prelude] = directory
    os.chdir(state["directories"][prelude])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a block's output is not under test, only that it runs as written
        exec(compile(code, f"{example.path}:{line}", "exec"), namespace)  # noqa: S102 - the docs' own code


def _setup(namespace: dict[str, Any]) -> None:
    namespace[_STATE] = {"root": tempfile.mkdtemp(prefix="docs-"), "cwd": os.getcwd(), "namespaces": {}, "directories": {}}


def _teardown(namespace: dict[str, Any]) -> None:
    state = namespace.pop(_STATE)
    os.chdir(state["cwd"])
    shutil.rmtree(state["root"], ignore_errors=True)


pytest_collect_file = Sybil(
    parsers=[python_blocks], patterns=["README.md", "docs/*.md", "docs/**/*.md"], setup=_setup, teardown=_teardown
).pytest()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keep every block of one document on one xdist worker (``--dist loadgroup``): later blocks
    use what earlier ones saved, in the page's own namespace and directory."""
    for item in items:
        if item.path.suffix == ".md":
            item.add_marker(pytest.mark.xdist_group(f"docs:{item.path}"))
