"""The checks a validation runs on a loaded checkpoint before it becomes a version."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import ConfigurationError

Check = Callable[[dict[str, Any]], Any]


def run_checks(checks: Sequence[tuple[str, Check]], checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """Run every check on ``checkpoint``; a false result or an exception fails it.

    Returns one ``{"name", "passed", "detail"}`` record per check, in order. ``detail`` holds the
    exception, or the returned value when it was not a plain bool. A check that raises
    :class:`ConfigurationError` says it was asked a wrong question (such as a metric the checkpoint
    never recorded), not that the model failed: that error is raised as it is.
    """
    results = []
    for name, check in checks:
        try:
            outcome = check(checkpoint)
            passed = bool(outcome)
            detail = None if isinstance(outcome, bool) else repr(outcome)[:200]
        except ConfigurationError:
            raise
        except Exception as exc:  # a check that raises fails the gate, whatever it raised
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        results.append({"name": name, "passed": passed, "detail": detail})
    return results


def named_checks(checks: Sequence[Check] | Mapping[str, Check]) -> list[tuple[str, Check]]:
    """``checks`` (callables, or a mapping of name to callable) as ``(name, check)`` pairs."""
    if isinstance(checks, Mapping):
        pairs = [(str(name), check) for name, check in checks.items()]
    else:
        pairs = [(_check_name(check, index), check) for index, check in enumerate(checks, 1)]
    for name, check in pairs:
        if not callable(check):
            raise ConfigurationError(f"check {name!r} is {check!r}, not a callable taking the loaded checkpoint")
    return pairs


def _check_name(check: Any, index: int) -> str:
    name = getattr(check, "__name__", None) or getattr(getattr(check, "func", None), "__name__", None)
    if not name or name == "<lambda>":
        return f"check {index}" + (" (lambda)" if name else "")
    return str(name)
