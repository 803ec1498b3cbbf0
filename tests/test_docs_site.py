"""The documentation site builds with ``mkdocs build --strict``: no broken link, no missing page, and
an API reference rendered from the docstrings of the public names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_site_builds_strictly_with_the_api_reference(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (site / "reference" / "api" / "index.html").read_text()
    for name in ("load_latest", "load_best", "ArtifactRegistry", "CorruptCheckpointError"):
        assert name in reference, f"the API reference does not document {name}"


def test_the_readme_stays_short_and_opens_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the detail to docs/"
    commands = [line for line in lines[:8] if line.startswith("python3 -m pip install tox")]
    assert [c.split("#")[0].split()[-1] for c in commands] == ["example", "py311"]
