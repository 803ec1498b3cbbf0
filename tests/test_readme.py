"""Every fenced python block of README.md runs as written (names it does not define come from readme_prelude)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from readme_prelude import PRELUDES

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- prelude: (?P<prelude>\w+) -->\n)?```python\n(?P<code>.*?)```", re.S)


def readme_blocks() -> list[tuple[str, int, str]]:
    """``(prelude, line, code)`` for every python block, in README order."""
    text = README.read_text()
    return [
        (match["prelude"] or "torch", text.count("\n", 0, match.start("code")) + 1, match["code"])
        for match in BLOCK.finditer(text)
    ]


def test_the_readme_has_python_blocks_and_known_preludes() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 8  # the sections of Use, Fast saves, Fast restore, Promotion, Lightning, HF, plot
    assert {prelude for prelude, _, _ in blocks} <= set(PRELUDES)
    assert README.read_text().count("```python") == len(blocks), "every python block is found"


@pytest.mark.parametrize("prelude", sorted(PRELUDES))
def test_readme_blocks_run_as_written(prelude: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [(line, code) for name, line, code in readme_blocks() if name == prelude]
    if prelude != "torch":
        pytest.importorskip({"lightning": "lightning.pytorch", "hf": "transformers"}[prelude])
    assert blocks, f"no README block uses the {prelude} prelude"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__", **PRELUDES[prelude]()}
    for line, code in blocks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the blocks' output is not under test, only that they run
            try:
                exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code
            except Exception as exc:  # noqa: BLE001 - name the block that failed
                pytest.fail(f"the README block at line {line} ({prelude} prelude) raised {type(exc).__name__}: {exc}")
