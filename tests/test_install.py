"""The README's install commands work as written, in a new virtual environment made from a copy of
the clone: every extra they name exists, and the ``ckpt`` command is on that environment's PATH."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def install_commands() -> list[list[str]]:
    """The ``python3 -m pip install`` lines of the README's install section, as argument lists."""
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- --8<-- [start:install] -->", 1)[1].split("<!-- --8<-- [end:install] -->", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("python3 -m pip install")]


def copy_of_the_clone(target: Path) -> Path:
    """The files git tracks (and those not ignored), without build outputs or environments."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True).stdout.splitlines()
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_the_readme_names_the_install_commands():
    commands = install_commands()
    assert [c[:4] for c in commands] == [["python3", "-m", "pip", "install"]] * len(commands) and len(commands) >= 3
    assert any(c[-1] == "torch==2.13.0" for c in commands), "the README must install the pinned torch first"
    assert any(c[-2:] == ["-e", "."] for c in commands), "the README must install the core from the clone"


def test_every_install_command_in_the_docs_installs_from_the_clone_with_extras_that_exist():
    """The package is on no index: ``pip install ckpt-plugin[...]`` would fail on a fresh machine."""
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = 0
    for page in pages:
        for match in re.finditer(r"pip install ([^`\n]*)", page.read_text()):
            arguments = match.group(1)
            assert "ckpt-plugin" not in arguments and "ckpt_plugin" not in arguments, f"{page.name}: {match.group(0)}"
            for named in re.findall(r"""-e ['"]?\.\[([a-z,]+)\]""", arguments):
                found += 1
                unknown = set(named.split(",")) - extras
                assert not unknown, f"{page.name}: {match.group(0)} names extras that do not exist: {unknown}"
    assert found >= 5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_install_commands_work_in_a_new_environment(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git clone")
    clone = copy_of_the_clone(tmp_path / "clone")
    environment = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(environment)], check=True, timeout=300)
    python = environment / "bin" / "python"
    # The new environment sees this one's packages after its own (torch and the extras' libraries),
    # so the commands install the package itself and download nothing but the build backend.
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "zz_outer_environment.pth").write_text("".join(f"{path}\n" for path in sorted(outer)))
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": ""}
    for command in install_commands():
        done = subprocess.run([str(python), *command[1:]], cwd=clone, capture_output=True, text=True, timeout=600, env=env)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{shlex.join(command)} failed:\n{output[-4000:]}"
        assert "does not provide the extra" not in output, f"{shlex.join(command)} names an unknown extra:\n{output}"
    # pip reports the environment's own install first (the one this environment may also hold, as
    # tox installs it, comes after it on the path).
    shown = subprocess.run([str(python), "-m", "pip", "show", "ckpt-plugin"], capture_output=True, text=True,
                           timeout=120, env=env, cwd=tmp_path)
    assert shown.returncode == 0 and f"Editable project location: {clone}" in shown.stdout, shown.stdout + shown.stderr
    helped = subprocess.run([str(environment / "bin" / "ckpt"), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert helped.returncode == 0 and "list" in helped.stdout, helped.stdout + helped.stderr
