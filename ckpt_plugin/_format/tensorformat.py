"""The safetensors byte layout: plan a file's header, and parse and check one. No I/O.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to its dtype, shape and ``[begin, end)`` byte range, then the raw tensor bytes with no holes.
The writer in :mod:`ckpt_plugin._storage` streams tensors into that layout without first copying
the whole state into one buffer, which is what keeps a save's extra memory small.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import msgspec

from ..errors import CorruptCheckpointError, EncodingError, IncompatibleCheckpointError

if TYPE_CHECKING:
    import torch

_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
"""Each safetensors dtype code and the name of its ``torch`` dtype. Headers are parsed without
torch (listing and inspecting read them); the dtypes themselves are looked up on first use."""
_ITEM_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "C64": 8,
    "U64": 8, "U32": 4, "U16": 2, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1,
}
"""Bytes per element of each code (the test suite checks them against torch's ``itemsize``)."""


@functools.cache
def _dtypes() -> dict[str, torch.dtype]:
    """The codes whose dtype this torch release has, and those dtypes."""
    import torch

    return {code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)}


@functools.cache
def _codes() -> dict[torch.dtype, str]:
    return {dtype: code for code, dtype in _dtypes().items()}


HEADER_LIMIT = 100 * 1024 * 1024
"""The largest header read, as the reference implementation allows. A header of empty tensors at
this size (about 1.7 million of them) parses in about 3 s and 0.5 GiB (``benchmarks/header_parse.py``)."""
METADATA_KEY = "__metadata__"
MAX_DIMS = 64
_Offset = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_Code = Literal[tuple(_DTYPE_NAMES)]  # type: ignore[valid-type]


class _Entry(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One tensor of a header, typed as safetensors itself requires (integers are JSON integers)."""

    dtype: _Code
    shape: tuple[_Offset, ...]
    data_offsets: tuple[_Offset, _Offset]


_decode_members = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_decode_entry = msgspec.json.Decoder(_Entry).decode
_decode_metadata = msgspec.json.Decoder(Optional[dict[str, str]]).decode


class TensorSpec(msgspec.Struct, frozen=True, gc=False):
    """Where one tensor lies in a safetensors file (offsets are absolute, from the file start)."""

    name: str
    code: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        """The tensor's ``torch`` dtype (imports torch)."""
        return dtype_of(self.code, self.name)


def dtype_code(dtype: torch.dtype, name: str) -> str:
    """The safetensors code of ``dtype``, or an :class:`EncodingError` naming the tensor."""
    codes = _codes()
    try:
        return codes[dtype]
    except KeyError:
        raise EncodingError(
            f"tensor {name!r} has dtype {dtype}, which safetensors cannot store; supported: "
            f"{', '.join(sorted(str(d).removeprefix('torch.') for d in codes))}"
        ) from None


def dtype_of(code: str, name: str | None = None) -> torch.dtype:
    """The dtype of safetensors code ``code``; :class:`KeyError` for a code that is not on the list,
    :class:`IncompatibleCheckpointError` for one this torch release has no dtype for."""
    if code not in _DTYPE_NAMES:
        raise KeyError(code)
    try:
        return _dtypes()[code]
    except KeyError:
        import torch

        tensor = f"tensor {name!r} has" if name is not None else "it has"
        raise IncompatibleCheckpointError(
            f"{tensor} dtype {code} (torch.{_DTYPE_NAMES[code]}), which torch {torch.__version__} does not have; "
            "upgrade torch to load it"
        ) from None


def plan(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[TensorSpec]]:
    """Lay ``tensors`` out as safetensors: return the header bytes and each tensor's place.

    Tensors are ordered by element size, largest first, then by name, so that every tensor
    starts at an offset aligned to its element size and a memory map can view it directly.
    """
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    entries: dict[str, object] = {}
    if metadata:
        entries[METADATA_KEY] = {str(key): str(value) for key, value in metadata.items()}
    offset = 0
    relative: list[tuple[str, torch.Tensor, str, int, int]] = []
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        code = dtype_code(tensor.dtype, name)
        entries[name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        relative.append((name, tensor, code, offset, offset + nbytes))
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header += b" " * (-(8 + len(header)) % 8)
    data_start = 8 + len(header)
    specs = [TensorSpec(name, code, tuple(t.shape), data_start + b, data_start + e) for name, t, code, b, e in relative]
    return struct.pack("<Q", len(header)) + header, specs


def parse(buffer: memoryview | bytes, file_size: int, filename: str) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Read and check the header at the start of ``buffer``; return the tensor specs and metadata.

    Raises :class:`CorruptCheckpointError`, naming ``filename``, if the header is malformed or the
    byte ranges do not tile the data section exactly. The work is linear in the header's size and
    each tensor costs one small object: the header is split into members without building them,
    and each member is decoded straight into its typed entry, which is then dropped.
    """

    def corrupt(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{filename} is not a valid safetensors file: {why}; restore it or delete this checkpoint")

    if file_size < 8:
        raise corrupt("it is shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", bytes(buffer[:8]))
    if header_len > HEADER_LIMIT or 8 + header_len > file_size:
        raise corrupt(f"its header length {header_len} does not fit the file's {file_size} bytes")
    try:
        members = _decode_members(memoryview(buffer)[8 : 8 + header_len])
    except RecursionError:
        raise corrupt("its header is nested too deeply") from None
    except msgspec.DecodeError as exc:  # ValidationError (not an object) is a DecodeError too
        raise corrupt(f"its header is not a JSON object ({exc})") from None
    metadata_member = members.pop(METADATA_KEY, None)
    try:
        metadata = (_decode_metadata(metadata_member) if metadata_member is not None else None) or {}
    except (msgspec.DecodeError, RecursionError) as exc:
        raise corrupt(f"its {METADATA_KEY} is not a map of strings ({exc})") from None
    data_start = 8 + header_len
    specs: dict[str, TensorSpec] = members  # type: ignore[assignment]  # each member is replaced in place
    decode_entry, prod, item_sizes = _decode_entry, math.prod, _ITEM_SIZES  # the loop runs per tensor
    for name, member in members.items():
        try:
            entry = decode_entry(member)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise corrupt(f"the header entry of tensor {name!r} is malformed ({exc})") from None
        shape = entry.shape
        begin, end = entry.data_offsets
        numel = prod(shape)
        if (
            end - begin != numel * item_sizes[entry.dtype]
            or begin > end
            or data_start + end > file_size
            or len(shape) > MAX_DIMS
            or (numel == 0 and len(shape) > 1 and prod(filter(None, shape)) >= 2**63)
        ):
            raise corrupt(_entry_problem(name, entry, data_start, file_size))
        specs[name] = TensorSpec(name, entry.dtype, shape, data_start + begin, data_start + end)
    _check_tiling(specs, data_start, file_size, corrupt)
    return specs, metadata


def _entry_problem(name: str, entry: _Entry, data_start: int, file_size: int) -> str:
    """What is wrong with a header entry that failed the checks of :func:`parse`."""
    shape = entry.shape
    begin, end = entry.data_offsets
    if len(shape) > MAX_DIMS or math.prod(filter(None, shape)) >= 2**63:
        return f"tensor {name!r} has shape {list(shape)}, which no tensor can have"
    if begin > end or data_start + end > file_size:
        return f"the byte range [{begin}, {end}) of tensor {name!r} does not fit the file"
    return f"the byte range of tensor {name!r} does not match its shape and dtype {entry.dtype}"


def _check_tiling(specs: Mapping[str, TensorSpec], data_start: int, file_size: int, corrupt: Any) -> None:
    """Check that the tensors' byte ranges tile the data section exactly, with no hole or overlap;
    an empty tensor must sit where one range ends and the next begins."""
    boundaries = {data_start}
    cursor = data_start
    for spec in sorted((spec for spec in specs.values() if spec.end > spec.start), key=_start):
        if spec.start != cursor:
            raise corrupt(f"the byte range of tensor {spec.name!r} does not match its shape and position")
        cursor = spec.end
        boundaries.add(cursor)
    for spec in specs.values():
        if spec.end == spec.start and spec.start not in boundaries:
            raise corrupt(f"the byte range of tensor {spec.name!r} does not match its shape and position")
    if cursor != file_size:
        raise corrupt(f"its tensors end at byte {cursor}, but the file has {file_size} bytes")


def _start(spec: TensorSpec) -> int:
    return spec.start
