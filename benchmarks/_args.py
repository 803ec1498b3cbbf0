"""argparse types that check the benchmarks' arguments before anything is measured (no torch here,
so a script can check its arguments in a process that must not import it)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def whole_number(minimum: int = 1, *, or_zero: bool = False, multiple_of: int = 1) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``minimum`` (or 0, when ``or_zero``) that is a
    multiple of ``multiple_of``. Anything else ends the script with a usage error naming the option."""
    wanted = f"a whole number of at least {minimum}" + (" (or 0)" if or_zero else "")
    if multiple_of > 1:
        wanted += f" that is a multiple of {multiple_of}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not (or_zero and value == 0) and (value < minimum or value % multiple_of):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value

    return parse


def existing_dir(text: str) -> Path:
    """An argparse ``type``: a directory that exists (the benchmarks make their scratch directories in it)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing directory")
    return path


def number_between(low: float, high: float | None = None) -> Callable[[str], float]:
    """An argparse ``type``: a number from ``low`` to ``high`` (no upper bound when None)."""
    wanted = f"a number from {low} to {high}" if high is not None else f"a number of at least {low}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not (value >= low and (high is None or value <= high)):  # also refuses nan
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value

    return parse
