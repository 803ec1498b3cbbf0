"""Showing strings read from checkpoints and registries: control characters made visible.

A metric name, a version, a user or a host is data. Printed as it is, ``"\\x1b[2J"`` clears the
screen and ``"\\x1b]0;...\\x07"`` sets the terminal's title; :func:`visible` writes every C0 and C1
control character and DEL as its Python escape instead (``"\\x1b"``; newlines too, so that a name
cannot fake a line of output), and so the marks that reorder or break lines (``"\\u202e"``).
The CLI prints through a console that applies it to every string and never reads Rich markup in
them; ``ckpt plot`` labels its pictures with it.
"""

from __future__ import annotations

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


__all__ = ["visible"]
