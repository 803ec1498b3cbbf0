"""The tensors of every version a scenario saves, derived from the version number alone, so that a
checker in another process knows bit for bit what a checkpoint of that version holds."""

from __future__ import annotations

from typing import Any

import torch

SHAPES = {
    # name: (rows of the large weight, columns, rows of the optimizer moment)
    "large": (1024, 1024, 256),  # a 4 MiB weight: written with direct I/O
    "medium": (512, 1024, 256),
    "small": (128, 128, 64),
    "remote": (512, 512, 128),  # a 1 MiB weight: several parts of a multipart upload
}


def _generator(version: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * version + salt)


def model_state(shape: str, version: int) -> dict[str, Any]:
    """The model of ``version``: random float32, float64 and int64 tensors and a tied weight.

    The ``frozen`` shape keeps its two backbone tensors the same in every version (an incremental
    save hard-links them) and changes only the head.
    """
    if shape == "frozen":
        backbone = _generator(0, 7)
        model = {
            "backbone.0": torch.randn(512, 512, generator=backbone),
            "backbone.1": torch.randn(512, 256, generator=backbone),
            "head": torch.randn(256, 16, generator=_generator(version, 1)),
        }
        model["head_tied"] = model["head"]
        return model
    rows, columns, _ = SHAPES[shape]
    generator = _generator(version, 1)
    model = {
        "w": torch.randn(rows, columns, generator=generator),
        "b": torch.randn(7, generator=generator, dtype=torch.float64),
        "counts": torch.randint(-(2**40), 2**40, (5,), generator=generator, dtype=torch.int64),
        "tied": torch.randn(3, generator=generator),
    }
    model["tied_again"] = model["tied"]
    return model


def optimizer_state(shape: str, version: int) -> dict[str, Any]:
    """An optimizer state dict of ``version`` (integer parameter ids, a tensor moment, a step)."""
    moment = 64 if shape == "frozen" else SHAPES[shape][2]
    generator = _generator(version, 2)
    return {
        "state": {0: {"m": torch.randn(moment, moment, generator=generator), "step": torch.tensor(float(version))}},
        "param_groups": [{"lr": 0.1, "betas": [0.9, 0.99], "params": [0]}],
    }
