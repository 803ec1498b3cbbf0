"""Write a checkpoint for other tools: a ``save_pretrained``-style folder, one ``.safetensors``
file, or a torch ``.pt`` file.

Every function verifies the files it reads against their recorded checksums, writes to a local
path through a temporary name and publishes it whole, and never overwrites what is there. A
per-rank sharded checkpoint is consolidated into full tensors first. ``ckpt export`` calls
:func:`export`; the checkpoint can come from a :class:`~ckpt_plugin.CheckpointManager` or from a
registry's validated version (:meth:`~ckpt_plugin.ArtifactRegistry.checkpoint_info`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ._display import plain
from .errors import ConfigurationError
from ._format import codec
from ._format.layout import MODEL_FILE
from ._format.records import METADATA_FILE
from ._io.files import copy_file, write_bytes_file, write_tensor_file
from ._io.info import CheckpointInfo
from ._io.writer import SAFETENSORS_METADATA
from ._local_dirs import publish_dir
from ._storage import LOCAL, publish_file, publish_made
from .summary import recorded_metadata
from .tensors import ProgressFactory, model_files, model_tensors, read_verified

if TYPE_CHECKING:
    from ._format.records import FileRecord

HF_CONFIG_FILES = ("config.json", "generation_config.json")
PT_WARNING = "a .pt file is a pickle: load it only with weights_only=True, and only from sources you trust"


FORMATS = ("hf", "safetensors", "pt")
"""What :func:`export` writes: a ``save_pretrained``-style folder, the model as one
``.safetensors`` file, or a torch ``.pt`` file (a pickle) for tools that read only those."""


def default_output(stem: str, to: str) -> Path:
    """Where :func:`export` writes when no target is given: ``STEM-hf/``, ``STEM.safetensors`` or ``STEM.pt`` here."""
    return Path(f"{stem}-hf" if to == "hf" else f"{stem}.{to}")


def export(
    info: CheckpointInfo,
    target: str | Path,
    to: str,
    *,
    config_file: str | Path | None = None,
    weights_only: bool = False,
    progress: ProgressFactory | None = None,
) -> list[str]:
    """Write checkpoint ``info`` to the new local path ``target`` in format ``to``; return notes
    for the user (such as the warning that a ``.pt`` file is a pickle).

    ``config_file`` applies to ``hf``, ``weights_only`` to ``pt``; ``progress`` receives the bytes
    read. An existing ``target`` is refused with a :class:`ConfigurationError`.
    """
    if to not in FORMATS:
        raise ConfigurationError(f"cannot export to {to!r}; choose one of {', '.join(FORMATS)}")
    target = Path(target)
    if target.exists():
        raise ConfigurationError(f"{target} already exists; choose another --output or remove it")
    if to == "hf":
        return export_hf(info, target, Path(config_file) if config_file is not None else None, progress)
    if to == "safetensors":
        return export_safetensors(info, target, progress)
    return export_pt(info, target, weights_only, progress)


def export_hf(info: CheckpointInfo, target: Path, config_file: Path | None = None,
              progress: ProgressFactory | None = None) -> list[str]:
    """Write ``target/`` as ``save_pretrained`` lays it out: ``model.safetensors`` (or its shards and
    index), ``config.json`` and, when the checkpoint has one, ``generation_config.json``.

    The config is ``config_file`` when given, else the model's own: the ``config.json`` the
    checkpoint holds (every Hugging Face callback checkpoint does), or the model config it
    recorded. A checkpoint with neither cannot give a folder that ``from_pretrained`` loads, so it
    is refused.
    """
    extra_files = [name for name in HF_CONFIG_FILES if name in info.files]
    if config_file is not None:
        config_bytes: bytes | None = config_file.read_bytes()
        extra_files = [name for name in extra_files if name != HF_CONFIG_FILES[0]]
    elif HF_CONFIG_FILES[0] in info.files:
        config_bytes = None  # copied and verified with the weights
    else:
        config_bytes = json.dumps(plain(recorded_model_config(info)), indent=2, sort_keys=True).encode() + b"\n"

    def fill(staging: Path) -> None:
        if info.sharded:  # per-rank shards: consolidated into one model.safetensors
            write_model_file(info, staging / MODEL_FILE, progress)
            copied: list[str] = []
        else:
            copied = model_files(info)
        size = sum(info.files[name].size for name in copied if name in info.files)
        advance = progress(f"exporting {info.name}", size) if progress is not None else None
        for name in copied + extra_files:  # model.safetensors, or the shards and their index; the configs
            copy_file(info.file(name), staging / name, info.files[name], advance if name in copied else None,
                      reuse=False, backend=info.backend, target_backend=LOCAL)
        if config_bytes is not None:
            write_bytes_file(staging / HF_CONFIG_FILES[0], config_bytes)

    publish_dir(target.parent, target.name, fill)
    return []


def recorded_model_config(info: CheckpointInfo) -> Mapping[str, Any]:
    """The model config a checkpoint recorded (its config, or the config's ``"model"`` entry), or a
    :class:`ConfigurationError` saying why no loadable folder can be written without one."""
    config = codec.from_json(recorded_metadata(info).get("config"), info.file(METADATA_FILE), "config")
    for candidate in (config, config.get("model") if isinstance(config, Mapping) else None):
        if isinstance(candidate, Mapping) and isinstance(candidate.get("model_type"), str):
            return candidate
    raise ConfigurationError(
        f"{info.path} holds no config.json and records no model config with a 'model_type', so the exported "
        "folder would not load with from_pretrained; pass --config with the model's config.json "
        "(model.config.save_pretrained(dir) writes one)"
    )


def write_model_file(info: CheckpointInfo, target: Path, progress: ProgressFactory | None = None) -> FileRecord:
    """Write the full model of ``info`` (verified first) as one safetensors file at the new path ``target``."""
    read_verified(info, ("model",), progress)  # verifies the model's files, reporting the bytes checked
    return write_tensor_file(target, model_tensors(info, verify=False), SAFETENSORS_METADATA)


def export_safetensors(info: CheckpointInfo, target: Path, progress: ProgressFactory | None = None) -> list[str]:
    """Write the model's weights as one ``model.safetensors``-style file (shards consolidated)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    publish_made(target, lambda temporary: write_model_file(info, temporary, progress))
    return []


def export_pt(info: CheckpointInfo, target: Path, weights_only: bool = False,
              progress: ProgressFactory | None = None) -> list[str]:
    """Write a torch ``.pt`` file for tools that only read those: the model state dict, or the
    checkpoint dict (model, optimizer, scheduler, epoch, step, metrics, config, extra)."""
    checkpoint = read_verified(info, ("model",) if weights_only else None, progress)
    if weights_only:
        payload: Any = checkpoint["model"]
    else:
        keep = ("model", "optimizer", "scheduler", "epoch", "step", "metrics", "config", "extra")
        payload = {key: checkpoint[key] for key in keep if checkpoint.get(key) is not None}

    import torch

    def write(handle: BinaryIO) -> None:
        torch.save(payload, handle)

    target.parent.mkdir(parents=True, exist_ok=True)
    publish_file(target, write)
    return [PT_WARNING]


__all__ = [
    "HF_CONFIG_FILES",
    "FORMATS",
    "default_output",
    "export",
    "export_hf",
    "export_pt",
    "export_safetensors",
    "recorded_model_config",
    "write_model_file",
]
