"""Capture and restore every random number generator a training run draws from.

A resumed run is bitwise identical to an uninterrupted one only if the torch CPU generator, each
CUDA device's generator, numpy's global generator and Python's ``random`` continue where they were.
"""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any


def _numpy() -> ModuleType | None:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy ships with every supported torch
        return None
    return numpy


def capture_rng_state() -> dict[str, Any]:
    """The state of every global generator, as a tree the codec can store without pickle."""
    import torch

    _np = _numpy()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _np is not None:
        state["numpy"] = _np.random.get_state()
    return state


def portable_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with numpy's key array as a list of ints, so that it holds only what
    torch's weights-only loader accepts (tensors, numbers, strings, tuples, lists, dicts).
    :func:`restore_rng_state` takes either form."""
    numpy_state = state.get("numpy")
    if numpy_state is None:
        return state
    name, keys, pos, has_gauss, cached = numpy_state
    keys = keys.tolist() if hasattr(keys, "tolist") else list(keys)
    return {**state, "numpy": (str(name), keys, int(pos), int(has_gauss), float(cached))}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back to ``state``, as returned by :func:`capture_rng_state`.

    CUDA states are restored only where CUDA is available, for as many devices as both have.
    """
    import torch

    _np = _numpy()
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state and _np is not None:
        name, keys, pos, has_gauss, cached = state["numpy"]
        _np.random.set_state((name, _np.asarray(keys, dtype=_np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        devices = min(len(state["cuda"]), torch.cuda.device_count())
        for index in range(devices):
            torch.cuda.set_rng_state(state["cuda"][index].cpu(), index)
