"""Showing strings read from checkpoints and registries: control characters made visible.

A metric name, a version, a user or a host is data. Printed as it is, ``"\\x1b[2J"`` clears the
screen and ``"\\x1b]0;...\\x07"`` sets the terminal's title; :func:`visible` writes every C0 and C1
control character and DEL as its Python escape instead (``"\\x1b"``; newlines too, so that a name
cannot fake a line of output), and so the marks that reorder or break lines (``"\\u202e"``).
The CLI prints through a console that applies it to every string and never reads Rich markup in
them; ``ckpt plot`` labels its pictures with it.

The other helpers format recorded values for people (:func:`format_metrics`, :func:`age`) and
for JSON (:func:`plain`).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from typing import Any

_CONTROLS = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]
_REORDERING = [0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_VISIBLE = {
    **{code: f"\\x{code:02x}" for code in _CONTROLS},
    **{code: f"\\u{code:04x}" for code in _REORDERING},
}


def visible(text: Any) -> str:
    """``str(text)`` with every control character written as ``\\xNN``, and the
    bidirectional and line-separator marks as ``\\uNNNN``."""
    return str(text).translate(_VISIBLE)


def plain(value: Any) -> Any:
    """``value`` as strict JSON data: tuples become lists, NaN and infinities become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``name=value`` pairs on one line, floats to four significant digits."""
    return "  ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}" for name, value in metrics.items())


def age(timestamp: str | None) -> str:
    """How long ago the ISO ``timestamp`` was, as ``"3h ago"`` (``"?"`` when there is none)."""
    if not timestamp:
        return "?"
    seconds = (datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(timestamp)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


__all__ = ["age", "format_metrics", "plain", "visible"]
