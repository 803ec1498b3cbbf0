"""Split a state tree into tensors and a JSON skeleton, and join them again. No pickle, no I/O.

``encode(tree)`` walks dicts, lists and tuples. Every tensor is replaced by a reference
``{"__tensor__": name}`` and collected under that name; everything else becomes JSON. Values that
plain JSON would lose are wrapped in one-key marker objects so that they come back exactly:

=====================  =========================================
``(1, 2)``              ``{"__tuple__": [1, 2]}``
``{0: "a"}``            ``{"__dict__": [[0, "a"]]}`` (any non-str key, or a key that is a marker)
``float("nan")``        ``{"__float__": "nan"}`` (also ``"inf"``, ``"-inf"``)
``torch.float16``       ``{"__dtype__": "float16"}``
``torch.device("cpu")`` ``{"__device__": "cpu"}``
``b"raw"``              ``{"__bytes__": "<base64>"}``
``{1, 2}``              ``{"__set__": [1, 2]}``
``Path("a/b")``         ``{"__path__": "a/b"}``
``np.float32(1.5)``     ``{"__numpy__": "float32", "value": 1.5}``
``np.array(...)``       ``{"__ndarray__": name}`` (stored as a tensor)
=====================  =========================================

Tensors that are the same view of the same memory (tied weights) are stored once: every later
occurrence refers to the first one's name, and ``decode`` hands back one shared tensor object.

Importing this module imports neither torch nor numpy, so that tools which only read metadata
start fast: a value can only be a tensor or a numpy value when its library is already imported,
and decoding imports torch or numpy only for a marker that needs it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import functools
import pathlib
import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CorruptCheckpointError, EncodingError
from .documents import within_depth as _within_depth

if TYPE_CHECKING:
    import torch

TENSOR = "__tensor__"
NDARRAY = "__ndarray__"
TUPLE = "__tuple__"
DICT = "__dict__"
FLOAT = "__float__"
DTYPE = "__dtype__"
DEVICE = "__device__"
BYTES = "__bytes__"
SET = "__set__"
PATH = "__path__"
NUMPY = "__numpy__"
MARKERS = frozenset({TENSOR, NDARRAY, TUPLE, DICT, FLOAT, DTYPE, DEVICE, BYTES, SET, PATH, NUMPY})

_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# safetensors keeps its header metadata under this key, so no tensor may take the name.
_RESERVED_TENSOR_NAMES = frozenset({"__metadata__"})


def format_path(path: tuple[Any, ...]) -> str:
    """Render a key path as Python subscripts, e.g. ``optimizer["state"][0]["exp_avg"]``."""
    if not path:
        return "<root>"
    head, *rest = path
    return str(head) + "".join(f"[{key!r}]" for key in rest)


def tensor_identity(tensor: torch.Tensor) -> tuple[Any, ...]:
    """A key equal for two tensors exactly when they are the same view of the same memory."""
    if tensor.device.type == "meta" or tensor.is_sparse:
        return ("unique", id(tensor))
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


class _Encoder:
    def __init__(self, root: str) -> None:
        self.root = root
        # A tensor, dtype or device exists only once torch is imported, a numpy value once numpy is.
        self._torch = sys.modules.get("torch")
        self._np = sys.modules.get("numpy")
        self.tensors: dict[str, torch.Tensor] = {}
        self._names_by_identity: dict[tuple[Any, ...], str] = {}
        self._active: set[int] = set()

    def tensor_name(self, path: tuple[Any, ...]) -> str:
        base = ".".join(str(key) for key in path[1:]) or self.root
        name, counter = base, 1
        while name in self.tensors or name in _RESERVED_TENSOR_NAMES:
            name, counter = f"{base}~{counter}", counter + 1
        return name

    def add_tensor(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> str:
        if tensor.is_sparse or tensor.layout != self._torch.strided:
            raise EncodingError(
                f"cannot store the {tensor.layout} tensor at {format_path(path)}: only dense "
                "tensors are supported; convert it with .to_dense() first"
            )
        if tensor.device.type == "meta":
            raise EncodingError(
                f"the tensor at {format_path(path)} is on the meta device and holds no data; "
                "materialize the model before saving it"
            )
        identity = tensor_identity(tensor)
        existing = self._names_by_identity.get(identity)
        if existing is not None:
            return existing
        name = self.tensor_name(path)
        self.tensors[name] = tensor.detach()
        self._names_by_identity[identity] = name
        return name

    def encode(self, value: Any, path: tuple[Any, ...]) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        torch, _np = self._torch, self._np
        if type(value) is not float and _np is not None and isinstance(value, _np.floating):
            return {NUMPY: value.dtype.name, "value": self.encode(float(value), path)}  # np.float64 is a float
        if isinstance(value, float):
            if math.isfinite(value):
                return float(value)
            return {FLOAT: "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
        if torch is not None and isinstance(value, torch.Tensor):
            return {TENSOR: self.add_tensor(value, path)}
        if torch is not None and isinstance(value, (torch.dtype, torch.device)):
            return {DTYPE: str(value).removeprefix("torch.")} if isinstance(value, torch.dtype) else {DEVICE: str(value)}
        if isinstance(value, (bytes, bytearray)):
            return {BYTES: base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, pathlib.PurePath):
            return {PATH: str(value)}
        if _np is not None and isinstance(value, _np.ndarray):
            return self.encode_ndarray(value, path)
        if _np is not None and isinstance(value, _np.generic):
            return {NUMPY: value.dtype.name, "value": self.encode(value.item(), path)}
        if isinstance(value, (dict, list, tuple, set, frozenset)) or isinstance(value, Mapping):
            return self.encode_container(value, path)
        raise EncodingError(
            f"cannot store a value of type {type(value).__module__}.{type(value).__qualname__} at "
            f"{format_path(path)} without pickle: convert it to tensors, numbers, strings, lists "
            "or dicts first (for example with its state_dict() or to a plain dict)"
        )

    def encode_ndarray(self, array: Any, path: tuple[Any, ...]) -> dict[str, str]:
        import torch

        self._torch = torch
        try:
            tensor = torch.from_numpy(self._np.ascontiguousarray(array))
        except TypeError as exc:
            raise EncodingError(
                f"cannot store the numpy array of dtype {array.dtype} at {format_path(path)}: "
                "convert it to a numeric dtype first"
            ) from exc
        return {NDARRAY: self.add_tensor(tensor, path)}

    def encode_container(self, value: Any, path: tuple[Any, ...]) -> Any:
        if id(value) in self._active:
            raise EncodingError(f"the value at {format_path(path)} contains itself; break the cycle before saving")
        self._active.add(id(value))
        try:
            if isinstance(value, tuple):
                if hasattr(value, "_fields"):
                    raise EncodingError(
                        f"cannot store the namedtuple {type(value).__qualname__} at {format_path(path)}: "
                        "its type would be lost; store value._asdict() instead"
                    )
                return {TUPLE: [self.encode(item, path + (index,)) for index, item in enumerate(value)]}
            if isinstance(value, list):
                return [self.encode(item, path + (index,)) for index, item in enumerate(value)]
            if isinstance(value, (set, frozenset)):
                items = sorted(value, key=repr)
                return {SET: [self.encode(item, path + (index,)) for index, item in enumerate(items)]}
            keys = list(value.keys())
            if all(isinstance(key, str) for key in keys) and not MARKERS.intersection(keys):
                return {key: self.encode(value[key], path + (key,)) for key in keys}
            return {DICT: [[self.encode(key, path + ("<key>",)), self.encode(value[key], path + (key,))] for key in keys]}
        finally:
            self._active.discard(id(value))


def encode(tree: Any, root: str = "state") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``tree`` into a JSON-ready skeleton and a flat ``{name: tensor}`` dict.

    ``root`` names the tree in error messages. Tensor names are the key path joined by dots,
    so a flat ``state_dict`` keeps its own keys as names. Raises :class:`EncodingError`, naming
    the key path, for any value that cannot be stored without pickle.
    """
    encoder = _Encoder(root)
    skeleton = encoder.encode(tree, (root,))
    if not _within_depth(skeleton, MAX_TREE_DEPTH):
        raise EncodingError(
            f"{root} is nested more than {MAX_TREE_DEPTH} levels deep (tuples, sets and dicts with non-string "
            "keys count twice); checkpoints refuse deeper trees when loaded, so flatten it before saving"
        )
    return skeleton, encoder.tensors


MAX_TREE_DEPTH = 100
"""The deepest nesting of an encoded tree; deeper ones are refused when saved and when loaded."""



@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """What ``__dtype__`` may name: the ``torch.dtype`` values of the torch namespace, nothing else
    (also available as ``DTYPES``; imports torch)."""
    import torch

    return {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


def __getattr__(name: str) -> Any:
    if name == "DTYPES":
        return torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


NUMPY_SCALAR_TYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"}
)
"""What ``__numpy__`` may name: numeric and bool scalar types of at most 8 bytes."""
_DEVICE = re.compile(r"[a-z][a-z0-9_]{0,31}(?::[0-9]{1,6})?")
_MARKER_KEYS = {marker: frozenset({marker}) for marker in MARKERS} | {NUMPY: frozenset({NUMPY, "value"})}


class _Malformed(Exception):
    """A node that is not what :func:`encode` writes; collects its key path while propagating."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why
        self.path: list[Any] = []


def decode(skeleton: Any, tensors: Mapping[str, torch.Tensor], where: str = "the checkpoint", root: str = "state") -> Any:
    """Rebuild the tree that :func:`encode` split, taking tensors from ``tensors`` by name.

    Only data comes back: containers, str, bytes, numbers, bool, None, tensors, numpy scalars and
    arrays, ``torch.dtype`` values, devices and paths. A marker that names anything else (a torch
    function for ``__dtype__``, a void type for ``__numpy__``), a tensor that is not in ``tensors``,
    or nesting deeper than :data:`MAX_TREE_DEPTH` raises :class:`CorruptCheckpointError` naming
    ``where`` (the file) and the key path under ``root``.
    """
    try:
        return _decode(skeleton, tensors, 0)
    except _Malformed as bad:
        raise CorruptCheckpointError(
            f"{where}: {format_path((root, *reversed(bad.path)))} {bad.why}; the checkpoint is damaged or was not "
            "written by ckpt_plugin: restore it or delete it"
        ) from None


def _decode(node: Any, tensors: Mapping[str, torch.Tensor], depth: int) -> Any:
    kind = type(node)
    if kind is str or kind is int or kind is float or kind is bool or node is None:
        return node
    if depth >= MAX_TREE_DEPTH:
        raise _Malformed(f"is nested more than {MAX_TREE_DEPTH} levels deep")
    if kind is list:
        return _decode_items(node, tensors, depth)
    if kind is not dict:
        raise _Malformed(f"is a {kind.__name__}, which JSON does not hold")
    if MARKERS.intersection(node):
        return _decode_marker(node, tensors, depth)
    result = {}
    for key, value in node.items():
        try:
            result[key] = _decode(value, tensors, depth + 1)
        except _Malformed as bad:
            bad.path.append(key)
            raise
    return result


def _decode_items(items: list[Any], tensors: Mapping[str, torch.Tensor], depth: int) -> list[Any]:
    result = []
    for index, item in enumerate(items):
        try:
            result.append(_decode(item, tensors, depth + 1))
        except _Malformed as bad:
            bad.path.append(index)
            raise
    return result


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        raise _Malformed(f"holds a {type(value).__name__} where only a hashable value may be") from None
    return value


def _decode_marker(node: dict[str, Any], tensors: Mapping[str, torch.Tensor], depth: int) -> Any:
    marker = next(key for key in node if key in MARKERS)
    if set(node) != _MARKER_KEYS[marker]:
        raise _Malformed(f"mixes the {marker} marker with other keys ({', '.join(map(repr, sorted(node)))})")
    value = node[marker]
    if marker in (TENSOR, NDARRAY):
        if type(value) is not str:
            raise _Malformed(f"names a tensor by a {type(value).__name__}, not a string")
        try:
            tensor = tensors[value]
        except KeyError:
            raise _Malformed(f"refers to tensor {value!r}, which is not among the stored tensors") from None
        if marker == TENSOR:
            return tensor
        try:
            return (tensor if tensor.device.type == "cpu" else tensor.cpu()).numpy()
        except (TypeError, RuntimeError) as exc:
            raise _Malformed(f"is a numpy array of a dtype numpy cannot hold ({exc})") from None
    if marker in (TUPLE, SET, DICT):
        if type(value) is not list:
            raise _Malformed(f"holds a {type(value).__name__} under {marker}, not a list")
        items = _decode_items(value, tensors, depth)
        if marker == TUPLE:
            return tuple(items)
        if marker == SET:
            return {_hashable(item) for item in items}
        if not all(type(pair) is list and len(pair) == 2 for pair in items):
            raise _Malformed(f"holds {DICT} entries that are not [key, value] pairs")
        return {_hashable(key): item for key, item in items}
    if marker == FLOAT:
        if type(value) is not str or value not in _SPECIAL_FLOATS:
            raise _Malformed(f"holds {value!r} under {FLOAT}; only 'nan', 'inf' and '-inf' are stored there")
        return _SPECIAL_FLOATS[value]
    if marker == DTYPE:
        dtype = torch_dtypes().get(value) if type(value) is str else None
        if dtype is None:
            raise _Malformed(f"names {value!r} as a dtype, which is not a torch dtype")
        return dtype
    if marker == DEVICE:
        if type(value) is not str or _DEVICE.fullmatch(value) is None:
            raise _Malformed(f"holds {value!r} as a device, which is not a device name such as 'cpu' or 'cuda:0'")
        import torch

        try:
            return torch.device(value)
        except (RuntimeError, ValueError) as exc:
            raise _Malformed(f"holds {value!r} as a device, which torch does not know ({exc})") from None
    if marker == BYTES:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise _Malformed("holds bytes that are not base64") from None
    if marker == PATH:
        if type(value) is not str:
            raise _Malformed(f"holds a {type(value).__name__} as a path, not a string")
        return pathlib.Path(value)
    if marker == NUMPY:
        if type(value) is not str or value not in NUMPY_SCALAR_TYPES:
            raise _Malformed(f"names {value!r} as a numpy scalar type; only numeric and bool types are stored")
        number = _decode(node["value"], tensors, depth + 1)
        if type(number) not in (int, float, bool):
            raise _Malformed(f"holds a {type(number).__name__} as the value of a numpy scalar, not a number")
        try:
            import numpy as _np  # ships with every supported torch
        except ImportError:  # pragma: no cover
            raise ImportError("this checkpoint holds numpy scalars; install numpy to load it") from None
        try:
            return _np.dtype(value).type(number)
        except (OverflowError, ValueError, TypeError) as exc:
            raise _Malformed(f"holds {number!r}, which a numpy {value} cannot hold ({exc})") from None
    raise _Malformed("is an unknown marker object")  # pragma: no cover


def dumps(skeleton: Any) -> bytes:
    """Serialize a skeleton (or any encoded value) as strict JSON bytes.

    Non-ASCII characters are escaped, so that strings holding lone surrogates (file names and
    command lines that are not valid UTF-8, as Python decodes them) are stored and come back exactly.
    """
    return json.dumps(skeleton, allow_nan=False, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def loads(data: bytes | str) -> Any:
    """Parse JSON written by :func:`dumps`."""
    return json.loads(data)


def to_json(value: Any, root: str = "value") -> Any:
    """Encode a tree that must hold no tensors (config, metrics) as a JSON-ready value."""
    skeleton, tensors = encode(value, root)
    if tensors:
        first = next(iter(tensors))
        raise EncodingError(
            f"{root} must not hold tensors, but {root}.{first} is one; convert it with .tolist() or .item()"
        )
    return skeleton


def from_json(skeleton: Any, where: str = "the checkpoint", root: str = "value") -> Any:
    """Decode a value encoded by :func:`to_json`; see :func:`decode` for what it refuses."""
    return decode(skeleton, {}, where, root)
