"""Property tests for the codec: random nested trees survive encode -> JSON -> decode exactly, and
values that cannot be stored without pickle raise ``EncodingError`` naming their key path."""

from __future__ import annotations

import json
import pathlib
import tempfile
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from core_helpers import assert_same_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_plugin import CheckpointManager, EncodingError
from ckpt_plugin._format import codec

# Strings a user might well have as keys that look like the codec's own markers.
MARKER_LIKE = ["__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__", "__dtype__", "__device__",
               "__bytes__", "__set__", "__path__", "__numpy__", "value", "__metadata__", "__tensor", "__", ""]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool, torch.float8_e4m3fn]


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    numel = 1
    for dim in shape:
        numel *= dim
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator, dtype=torch.uint8).bool()
    size = torch.empty((), dtype=dtype).element_size()
    tensor = torch.randint(0, 256, (numel * size,), generator=generator, dtype=torch.uint8).view(dtype).reshape(shape)
    if draw(st.booleans()) and tensor.dim() == 2:
        tensor = tensor.t()
    return tensor


text = st.one_of(st.sampled_from(MARKER_LIKE), st.text(max_size=8))
# Any code point, lone surrogates included: Python decodes file names that are not UTF-8 that way.
any_text = st.one_of(text, st.text(st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), max_size=4),
                     st.lists(st.one_of(st.characters(exclude_categories=[]), st.characters(min_codepoint=0xDC80,
                              max_codepoint=0xDCFF)), max_size=6).map("".join))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, float("inf"), float("-inf"), float("nan")]),
    text,
    st.binary(max_size=16),
)
keys = st.one_of(
    text,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.tuples(st.one_of(text, st.integers(-5, 5))),
    st.tuples(st.integers(-5, 5), text),
)


def trees(leaves) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=4).map(tuple),
            st.dictionaries(keys, children, max_size=4),
        ),
        max_leaves=12,
    )


json_trees = trees(st.one_of(scalars, any_text))
# Values the codec documents beyond plain JSON.
documented_values = st.one_of(
    st.sampled_from(DTYPES + [torch.complex64, torch.int16]),
    st.sampled_from([torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")]),
    st.builds(pathlib.PurePosixPath, st.text(st.characters(exclude_characters="\x00"), max_size=8)).map(lambda p: pathlib.Path(p)),
    st.sets(st.one_of(st.integers(), st.text(max_size=4), st.booleans()), max_size=4),
    st.builds(np.float32, st.floats(width=32, allow_nan=False)),
    st.builds(np.float64, st.floats()),
    st.builds(np.float16, st.floats(width=16)),
    st.builds(np.int64, st.integers(-(2**63), 2**63 - 1)),
    st.builds(np.bool_, st.booleans()),
    st.builds(np.uint8, st.integers(0, 255)),
)
documented_trees = trees(st.one_of(scalars, documented_values))
tensor_trees = trees(st.one_of(scalars, tensors()))


def through_json(tree: Any) -> Any:
    skeleton, tensor_map = codec.encode(tree, "tree")
    text_form = codec.dumps(skeleton)
    return codec.decode(codec.loads(text_form), dict(tensor_map))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(tree=json_trees)
def test_json_trees_round_trip_exactly(tree):
    assert_same_tree(tree, through_json(tree))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(tree=tensor_trees)
def test_trees_with_tensors_round_trip_exactly(tree):
    assert_same_tree(tree, through_json(tree))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(tree=documented_trees)
def test_documented_extra_values_round_trip_exactly(tree):
    assert_same_tree(tree, through_json(tree))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(tree=tensor_trees)
def test_encoded_skeleton_is_strict_json(tree):
    skeleton, _ = codec.encode(tree, "tree")
    text_form = codec.dumps(skeleton)
    parsed = json.loads(text_form, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert parsed == codec.loads(text_form)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(extra=tensor_trees, model=st.dictionaries(text, tensors(), max_size=4))
def test_trees_round_trip_through_a_saved_checkpoint(extra, model):
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = CheckpointManager(directory, max_checkpoints=None, keep_best=False, save_rng=False)
        manager.save(model=model, epoch=0, metrics={}, extra=extra, config={"tree": extra} if _jsonable(extra) else None)
        loaded = CheckpointManager(directory, max_checkpoints=None).load(epoch=0)
        assert_same_tree(model, loaded["model"])
        assert_same_tree(extra, loaded.get("extra"))
        if _jsonable(extra):
            assert_same_tree({"tree": extra}, loaded["config"])


def _jsonable(tree: Any) -> bool:
    if isinstance(tree, torch.Tensor):
        return False
    if isinstance(tree, dict):
        return all(_jsonable(key) and _jsonable(value) for key, value in tree.items())
    if isinstance(tree, (list, tuple)):
        return all(_jsonable(item) for item in tree)
    return True


class Opaque:
    """Something only pickle could store."""


unsupported = st.sampled_from([Opaque(), lambda: None, 1 + 2j, object(), Ellipsis, torch.nn.Linear(1, 1)])


@st.composite
def trees_with_one_bad_value(draw) -> tuple[Any, list[Any]]:
    """A tree holding one unsupported value somewhere, and the key path that leads to it."""
    bad = draw(unsupported)
    path: list[Any] = []
    depth = draw(st.integers(0, 4))
    leaf: Any = bad
    segments = []
    for _ in range(depth):
        kind = draw(st.sampled_from(["dict", "list", "tuple"]))
        if kind == "dict":
            key = draw(keys)
            siblings = draw(st.dictionaries(keys, json_trees, max_size=2))
            siblings.pop(key, None)
            segments.append(("dict", key, siblings))
        else:
            before = draw(st.lists(json_trees, max_size=2))
            segments.append((kind, len(before), before))
    for kind, key, siblings in reversed(segments):
        if kind == "dict":
            leaf = {**siblings, key: leaf}
        else:
            items = list(siblings) + [leaf]
            leaf = items if kind == "list" else tuple(items)
    path = [key for _, key, _ in segments]
    return leaf, path


@settings(max_examples=200, deadline=None, derandomize=True)
@given(case=trees_with_one_bad_value())
def test_unsupported_values_raise_encoding_error_naming_the_key_path(case):
    tree, path = case
    with pytest.raises(EncodingError) as caught:
        codec.encode(tree, "extra")
    message = str(caught.value)
    assert message.startswith("cannot store") or "extra" in message
    position = message.find("extra")
    assert position >= 0, message
    for key in path:
        found = message.find(repr(key), position)
        assert found >= 0, f"key {key!r} of the path {path!r} is not named in: {message}"
        position = found + len(repr(key))


def test_unsupported_value_error_from_save_names_the_path_and_writes_nothing(tmp_path):
    manager = CheckpointManager(tmp_path, max_checkpoints=None, keep_best=False)
    with pytest.raises(EncodingError, match=r"extra\['callbacks'\]\[1\]\['fn'\]"):
        manager.save(model={"w": torch.zeros(1)}, epoch=0, metrics={},
                     extra={"callbacks": [{"fn": None}, {"fn": print}]})
    with pytest.raises(EncodingError, match=r"config"):
        manager.save(model={"w": torch.zeros(1)}, epoch=0, metrics={}, config={"weights": torch.ones(2)})
    assert list(tmp_path.iterdir()) == []


def test_self_referencing_tree_is_an_encoding_error():
    tree: dict[str, Any] = {"a": []}
    tree["a"].append(tree)
    with pytest.raises(EncodingError, match="itself"):
        codec.encode(tree, "extra")


def test_a_model_key_named_like_the_safetensors_metadata_entry_round_trips(tmp_path):
    manager = CheckpointManager(tmp_path, max_checkpoints=None, keep_best=False)
    state = {"__metadata__": torch.arange(3.0), "weight": torch.ones(2)}
    manager.save(model=state, epoch=0, metrics={})
    assert_same_tree(state, manager.load(epoch=0)["model"])
