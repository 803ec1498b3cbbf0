"""The import layers hold: the ``[tool.importlinter]`` contracts of ``pyproject.toml`` are kept.

Imports point down (``format`` < ``storage`` < ``io`` < the helpers < ``distributed`` < the
manager < the registry < the adapters), nothing below the adapters imports a framework, and no
module imports pickle; docs/development.md describes the layers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = REPO_ROOT / "pyproject.toml"
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.argv[0] = 'lint-imports'; lint_imports_command()"


def contracts() -> list[dict]:
    with PYPROJECT.open("rb") as file:
        return tomllib.load(file)["tool"]["importlinter"]["contracts"]


def test_every_import_contract_is_kept():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--no-logo", str(PYPROJECT)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, f"an import breaks a contract of pyproject.toml:\n{run.stdout}\n{run.stderr}"


def test_every_module_of_the_package_sits_in_a_layer():
    """A new module joins a layer, so that the contracts say where it may import from."""
    (layers,) = [contract for contract in contracts() if contract["id"] == "layers"]
    placed = {
        name.strip() for layer in layers["layers"] for name in layer.replace("|", ":").split(":")
    }
    package = REPO_ROOT / "ckpt_plugin"
    modules = {
        f"ckpt_plugin.{path.stem if path.is_file() else path.name}"
        for path in package.iterdir()
        if (path.suffix == ".py" and path.name != "__init__.py") or (path / "__init__.py").is_file()
    }
    assert modules - placed == set(), "add these modules to the layers contract in pyproject.toml"
    assert placed - modules == set(), "these layers name modules that do not exist"
