"""The model of one checkpoint as tensors: its files, their shapes, the full tensors, and how two
models differ.

A plain checkpoint keeps its model in ``model.safetensors`` (or in Hugging Face-style shards and
their index); a per-rank sharded one keeps a piece of every tensor in each rank's file, and its
full tensors come from consolidating them (:mod:`ckpt_plugin._distributed.consolidate`). The
functions here hide that difference. Shapes come from the safetensors headers alone, so
:func:`model_shapes` of a plain checkpoint does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Optional

from .errors import CheckpointNotFoundError, CorruptCheckpointError
from ._format import shards
from ._format.layout import MODEL_FILE, STATE_FILE
from ._io.files import read_header, verify_file
from ._io.info import CheckpointInfo
from ._io.reader import item_shards, open_item_files
from ._reading import read_checkpoint, read_sharded_items

if TYPE_CHECKING:
    import torch

    from ._format.records import FileRecord

ProgressFactory = Callable[[str, int], Optional[Callable[[int], None]]]
"""Given a label and a byte count, a callback advanced by the bytes read (or None for no bar)."""


def model_files(info: CheckpointInfo) -> list[str]:
    """The files that hold the model of ``info``: one file, HF-style shards and index, or per-rank shards."""
    if info.sharded:
        from ._distributed.consolidate import model_files as sharded_model_files

        return sharded_model_files(info.files)
    return shards.item_files(info.files, MODEL_FILE) or [MODEL_FILE]


def model_tensors(info: CheckpointInfo, *, map_location: Any = None, verify: bool = True) -> dict[str, torch.Tensor]:
    """The full model tensors of ``info``, by name, as one ``state_dict`` holds them.

    A per-rank sharded checkpoint is consolidated into full tensors; a plain one gives the tensors
    of its model file (or shards). ``map_location`` moves them to a device (CPU when None). With
    ``verify`` every file read is checked against its recorded checksum first.
    """
    if info.sharded:
        items = read_sharded_items(info.location, info.files, ["model"], verify=verify, map_location=map_location,
                                   backend=info.backend)
        return items["model"]
    tensors = open_item_files(info.location, info.files, model_files(info)[0], verify=verify, backend=info.backend)
    if map_location is None:
        return tensors
    return {name: tensor.to(map_location) for name, tensor in tensors.items()}


def model_tensors_of(manager: Any, which: str | int | CheckpointInfo = "latest", *, map_location: Any = None,
                     verify: bool = True) -> dict[str, torch.Tensor]:
    """:func:`model_tensors` of the checkpoint ``which`` names in ``manager`` (``"latest"``,
    ``"best"``, an epoch number or a :class:`CheckpointInfo`); a :class:`CheckpointNotFoundError`
    when there is none."""
    info = manager.resolve(which)
    if info is None:
        raise CheckpointNotFoundError(f"there is no {which} checkpoint in {manager.checkpoint_dir}")
    return model_tensors(info, map_location=map_location, verify=verify)


def sharded_across_ranks(*objects: Any) -> bool:
    """Whether any module or state dict among ``objects`` is sharded across ranks in a distributed
    job (DTensors, an FSDP1 module, ShardedTensors): then only a collective save holds it whole."""
    from ._distributed.collective import holds_dtensors  # loads torch.distributed

    return holds_dtensors(*objects)


def model_shapes(info: CheckpointInfo) -> dict[str, tuple[int, ...]]:
    """The shape of every model tensor, from the safetensors headers alone (no tensor is read, and
    torch is not imported), or from the consolidated tensors of a per-rank sharded checkpoint."""
    if info.sharded:
        return {name: tuple(tensor.shape) for name, tensor in model_tensors(info, verify=False).items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in item_shards(info.location, info.files, model_files(info)[0], verify=False, backend=info.backend):
        _, specs, _ = read_header(info.file(name), info.files.get(name), backend=info.backend)
        shapes.update((tensor, spec.shape) for tensor, spec in specs.items())
    return shapes


def model_parameters(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """How many numbers the tensors of ``shapes`` hold."""
    return sum(math.prod(shape) for shape in shapes.values())


def verify_files(
    files: Iterable[tuple[Any, FileRecord]], label: str, progress: ProgressFactory | None = None, backend: Any = None
) -> list[dict[str, str]]:
    """Check every ``(location, record)`` on ``backend`` (the local file system when None), with
    one ``progress`` bar labelled ``label``; return a problem (``path``, ``error``) for each damaged
    or missing file."""
    from ._storage import LOCAL

    files = list(files)
    advance = progress(label, sum(record.size for _, record in files)) if progress is not None else None
    problems = []
    for path, record in files:
        try:
            verify_file(path, record, advance, backend=backend or LOCAL)
        except CorruptCheckpointError as exc:
            problems.append({"path": str(path), "error": str(exc)})
    return problems


def read_verified(info: CheckpointInfo, items: tuple[str, ...] | None = None,
                  progress: ProgressFactory | None = None) -> dict[str, Any]:
    """Read ``items`` of ``info`` (all when None) after checking the files they need, reporting the
    bytes checked to ``progress``; a :class:`CorruptCheckpointError` names the first damaged file."""
    needed = {*model_files(info), STATE_FILE} if items == ("model",) else set(info.files)
    files = [(info.file(name), info.files[name]) for name in sorted(needed) if name in info.files]
    problems = verify_files(files, f"reading {info.name}", progress, info.backend)
    if problems:
        raise CorruptCheckpointError(problems[0]["error"])
    return read_checkpoint(info, verify=False, items=items)


def compare_tensors(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per tensor name of two state dicts: ``status`` (unchanged, changed, added, removed,
    or reshaped when the shape or dtype differs) and ``max_abs_diff`` where it can be computed."""
    import torch

    rows = []
    for name in dict.fromkeys([*a, *b]):
        x, y = a.get(name), b.get(name)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            status = "added" if x is None else "removed" if y is None else ("unchanged" if _same_value(x, y) else "changed")
            rows.append({"name": name, "status": status, "max_abs_diff": None})
        elif x.shape != y.shape or x.dtype != y.dtype:
            rows.append({"name": name, "status": "reshaped", "max_abs_diff": None,
                         "from": f"{x.dtype} {list(x.shape)}", "to": f"{y.dtype} {list(y.shape)}"})
        elif _same_bits(x, y):
            rows.append({"name": name, "status": "unchanged", "max_abs_diff": 0.0})
        else:
            rows.append({"name": name, "status": "changed", "max_abs_diff": _max_abs_diff(x, y)})
    return rows


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether two tensors of one shape and dtype hold the same bytes (NaNs included)."""
    import torch

    return torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


def _same_value(x: Any, y: Any) -> bool:
    """Whether two values of a state dict that are not both tensors are equal: lists, tuples and
    dicts element by element, tensors inside them bit by bit, anything else with ``==``."""
    import torch

    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                and x.dtype == y.dtype and _same_bits(x, y))
    if isinstance(x, Mapping) or isinstance(y, Mapping):
        return (isinstance(x, Mapping) and isinstance(y, Mapping) and x.keys() == y.keys()
                and all(_same_value(x[key], y[key]) for key in x))
    if isinstance(x, (list, tuple)) or isinstance(y, (list, tuple)):
        return (type(x) is type(y) and len(x) == len(y)
                and all(_same_value(p, q) for p, q in zip(x, y)))
    return type(x) is type(y) and bool(x == y)


def _max_abs_diff(x: torch.Tensor, y: torch.Tensor, chunk: int = 1 << 22) -> float:
    """The largest ``|y - x|``, in chunks to bound memory; NaN in both places counts as equal."""
    import torch

    wide = torch.complex128 if x.is_complex() else torch.float64
    x, y = x.reshape(-1), y.reshape(-1)
    largest = 0.0
    for begin in range(0, x.numel(), chunk):
        p, q = x[begin : begin + chunk].to(wide), y[begin : begin + chunk].to(wide)
        difference = (q - p).abs()
        both_nan = torch.isnan(p) & torch.isnan(q)
        difference = torch.where(both_nan, torch.zeros_like(difference), difference).nan_to_num(nan=math.inf)
        largest = max(largest, float(difference.max()))
    return largest


__all__ = [
    "ProgressFactory",
    "compare_tensors",
    "model_files",
    "model_parameters",
    "model_shapes",
    "model_tensors",
    "model_tensors_of",
    "read_verified",
    "sharded_across_ranks",
    "verify_files",
]
