"""Shared helpers of the core tests: exact tree comparison and a tiny training setup."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors have the same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    a_bytes = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    b_bytes = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(a_bytes, b_bytes)


def assert_same_tree(expected: Any, actual: Any, path: str = "<root>") -> None:
    """Assert two trees are equal exactly: same container and scalar types, same keys, same bits."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: expected a tensor, got {type(actual).__name__}"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert tuple(actual.shape) == tuple(expected.shape), f"{path}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert same_bits(expected, actual), f"{path}: tensor contents differ"
        return
    if isinstance(expected, dict) and isinstance(actual, dict):
        pass  # an OrderedDict state_dict comes back as a plain dict, with the same order
    else:
        assert type(actual) is type(expected), f"{path}: type {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, dict):
        typed_keys = sorted((type(key).__name__, repr(key)) for key in expected)
        assert sorted((type(key).__name__, repr(key)) for key in actual) == typed_keys, (
            f"{path}: keys {list(actual)!r} != {list(expected)!r}"
        )
        for key in expected:
            assert_same_tree(expected[key], actual[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for index, (e, a) in enumerate(zip(expected, actual)):
            assert_same_tree(e, a, f"{path}[{index}]")
    elif isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), f"{path}: {actual!r} is not NaN"
        else:
            assert actual == expected and math.copysign(1, actual) == math.copysign(1, expected), (
                f"{path}: {actual!r} != {expected!r}"
            )
    elif expected != expected:  # NaN of another float type, such as numpy's
        assert actual != actual, f"{path}: {actual!r} is not NaN"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


class TinyNet(nn.Module):
    """A small network with dropout, so that training draws from the torch generator."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_training(width: int = 8, lr: float = 0.1) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyNet(width)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return model, optimizer


def train_one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    x = torch.randn(16, 4)
    y = torch.randn(16, 2)
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def visible_names(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def hidden_dirs(directory: Path) -> list[str]:
    """Hidden directories: where writers stage and delete checkpoints. Hidden files (caches) are not counted."""
    return sorted(name for name in os.listdir(directory) if name.startswith(".") and (directory / name).is_dir())


def snapshot_tree(directory: Path) -> dict[str, bytes]:
    """Every visible file under ``directory`` (relative path -> bytes), to prove nothing changed.

    Hidden entries at the top (staging directories, caches) are left out; check them with
    :func:`hidden_dirs`.
    """
    files: dict[str, bytes] = {}
    for root, dirs, names in os.walk(directory):
        if Path(root) == directory:
            dirs[:] = [name for name in dirs if not name.startswith(".")]
            names = [name for name in names if not name.startswith(".")]
        for name in names:
            path = Path(root) / name
            files[str(path.relative_to(directory))] = path.read_bytes()
    return files


def full_state() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """A model, optimizer and scheduler with state, so that every kind of file gets written."""
    model, optimizer = tiny_training(width=64)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    for _ in range(2):
        train_one_step(model, optimizer)
        scheduler.step()
    return model, optimizer, scheduler


def save_full(manager: Any, epoch: int, state: tuple[Any, Any, Any] | None = None, **kwargs: Any) -> Any:
    """Save ``state`` (by default a new :func:`full_state`) with metrics, config and extra state as ``epoch``."""
    model, optimizer, scheduler = full_state() if state is None else state
    return manager.save(model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                        metrics={"loss": 1.0 / (epoch + 1)}, config={"lr": 0.1},
                        extra={"note": "x", "t": torch.arange(4)}, **kwargs)


def objects(url: str) -> list[str]:
    """Every object under the object store ``url``, relative to it, sorted."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    try:
        return sorted(name[len(path) :].lstrip("/") for name in fs.find(path))
    except FileNotFoundError:
        return []


def recover_now(manager: Any) -> None:
    """Remove what interrupted saves left in ``manager``'s checkpoint place at once: on an object
    store every uncommitted prefix of ours then counts as dead (no grace period for live writers)."""
    from ckpt_plugin._storage import open_store

    store = open_store(manager.checkpoint_dir, manager.storage_options or None)
    if hasattr(store, "grace_seconds"):
        store.grace_seconds = 0
    store.recover()
