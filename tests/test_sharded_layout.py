"""The sharding document and the DCP storage pair in one process: no pickle, every document checked."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from ckpt_plugin import ConfigurationError, CorruptCheckpointError, EncodingError, IncompatibleCheckpointError
from ckpt_plugin._distributed import (
    BackendShardFiles,
    JsonLoadPlanner,
    JsonSavePlanner,
    LocalShardFiles,
    SafetensorsReader,
    SafetensorsWriter,
    Sharding,
    read_full,
    read_sharding,
)
from ckpt_plugin._distributed.layout import CHECKSUM_KEY, _checksum
from ckpt_plugin._storage import backend_of

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def state() -> dict:
    torch.manual_seed(0)
    return {
        "model": {"w": torch.randn(4, 3), "b": torch.arange(3, dtype=torch.int64)},
        "optimizer": {"param_groups": [{"lr": 0.5, "betas": (0.9, 0.99), "params": ["w", "b"], "nan": float("nan")}]},
    }


@pytest.fixture
def saved(tmp_path):
    dcp.save(state(), storage_writer=SafetensorsWriter(tmp_path), planner=JsonSavePlanner())
    return tmp_path


def test_the_storage_pair_takes_a_url_and_checks_every_byte_read():
    import uuid

    import fsspec

    url = f"memory://sharded-{uuid.uuid4().hex[:12]}/ckpt"
    dcp.save(state(), storage_writer=SafetensorsWriter(url), planner=JsonSavePlanner())
    fs, path = fsspec.core.url_to_fs(url)
    assert sorted(name.rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)) == ["model-r0-of-1.safetensors", "sharding.json"]
    target = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(3, dtype=torch.int64)},
              "optimizer": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "params": [], "nan": 0.0}]}}
    dcp.load(target, storage_reader=SafetensorsReader(url), planner=JsonLoadPlanner())
    assert torch.equal(target["model"]["w"], state()["model"]["w"]) and target["optimizer"]["param_groups"][0]["lr"] == 0.5
    shard = f"{path}/model-r0-of-1.safetensors"
    data = bytearray(fs.cat_file(shard))
    data[-1] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    with pytest.raises(BaseException, match="model-r0-of-1.safetensors does not match its recorded checksum"):
        dcp.load(target, storage_reader=SafetensorsReader(url), planner=JsonLoadPlanner())
    files = BackendShardFiles(url, backend_of(url))
    with pytest.raises(CorruptCheckpointError, match="model-r0-of-1.safetensors"):
        read_full(files, read_sharding(files))


def test_round_trip_keeps_tuples_nan_and_dtypes_without_pickle(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["model-r0-of-1.safetensors", "sharding.json"]
    document = json.loads((saved / "sharding.json").read_text())
    assert document["objects"]["optimizer.param_groups.0.betas"] == {"__tuple__": [0.9, 0.99]}
    full = read_full(LocalShardFiles(saved), read_sharding(LocalShardFiles(saved)))
    group = full["optimizer"]["param_groups"][0]
    assert group["betas"] == (0.9, 0.99) and group["params"] == ["w", "b"] and group["nan"] != group["nan"]
    assert torch.equal(full["model"]["w"], state()["model"]["w"]) and full["model"]["b"].dtype == torch.int64
    target = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(3, dtype=torch.int64)},
              "optimizer": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "params": [], "nan": 0.0}]}}
    dcp.load(target, storage_reader=SafetensorsReader(saved), planner=JsonLoadPlanner())
    assert torch.equal(target["model"]["w"], state()["model"]["w"])
    assert target["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)


def test_the_stock_planner_which_would_unpickle_is_refused(saved):
    target = copy.deepcopy(state())
    with pytest.raises(BaseException, match="JsonLoadPlanner"):
        dcp.load(target, storage_reader=SafetensorsReader(saved), planner=DefaultLoadPlanner())


def test_a_value_json_cannot_hold_fails_before_anything_is_written(tmp_path):
    bad = {"model": {"w": torch.ones(2)}, "extra": {"handle": object()}}
    with pytest.raises(BaseException, match="extra.handle"):
        dcp.save(bad, storage_writer=SafetensorsWriter(tmp_path), planner=JsonSavePlanner())
    assert list(tmp_path.iterdir()) == []
    assert issubclass(EncodingError, TypeError)


def test_a_shape_that_cannot_be_resharded_names_the_tensor(saved):
    target = {"model": {"w": torch.zeros(5, 3), "b": torch.zeros(3, dtype=torch.int64)}}
    with pytest.raises(BaseException, match="model.w") as caught:
        dcp.load(target, storage_reader=SafetensorsReader(saved), planner=JsonLoadPlanner(allow_partial_load=True))
    assert "IncompatibleCheckpointError" in str(caught.value)
    assert issubclass(IncompatibleCheckpointError, Exception)


def test_damaged_shard_is_named(saved, tmp_path):
    copy_dir = tmp_path / "copy"
    shutil.copytree(saved, copy_dir)
    data = bytearray((copy_dir / "model-r0-of-1.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy_dir / "model-r0-of-1.safetensors").write_bytes(bytes(data))
    files = LocalShardFiles(copy_dir)
    with pytest.raises(CorruptCheckpointError, match="model-r0-of-1.safetensors"):
        read_full(files, read_sharding(files))


def rewrite(document: dict) -> dict:
    document = copy.deepcopy(document)
    document[CHECKSUM_KEY] = _checksum(document)
    return document


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d["files"].__setitem__("../escape.safetensors", {"size": 1, "checksum": "x"}), "plain file name"),
        (lambda d: d["tensors"]["model.w"]["chunks"][0].__setitem__("file", "../x"), "not listed"),
        (lambda d: d["tensors"]["model.w"]["chunks"].append(dict(d["tensors"]["model.w"]["chunks"][0])), "overlap"),
        (lambda d: d["tensors"]["model.w"]["chunks"][0].__setitem__("sizes", [2, 3]), "cover"),
        (lambda d: d["tensors"]["model.w"]["chunks"][0].__setitem__("offsets", [3, 0]), "outside"),
        (lambda d: d["tensors"]["model.w"].__setitem__("dtype", "object"), "dtype"),
        (lambda d: d["paths"].__setitem__("model.w", ["model", 10**9]), "paths"),
        (lambda d: d.__setitem__("world_size", 0), "world_size"),
    ],
)
def test_every_malformed_document_is_rejected(saved, damage, message):
    document = json.loads((saved / "sharding.json").read_text())
    damage(document)
    with pytest.raises(CorruptCheckpointError, match=message):
        Sharding.from_json(rewrite(document), "sharding.json")


def test_a_document_edited_without_its_checksum_is_rejected(saved):
    document = json.loads((saved / "sharding.json").read_text())
    document["world_size"] = 3
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        Sharding.from_json(document, "sharding.json")
    assert issubclass(ConfigurationError, ValueError)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _nodes(tree, path=()):
    yield path
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _nodes(value, path + (key,))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _nodes(value, path + (index,))


@settings(max_examples=100, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_documents_are_read_or_refused_cleanly(saved, data):
    """Any mutation of a valid sharding.json (re-sealed with a valid checksum) is either a valid
    document whose reading stays inside the checkpoint, or a CorruptCheckpointError."""
    document = json.loads((saved / "sharding.json").read_text())
    paths = [path for path in _nodes(document) if path and path[0] != CHECKSUM_KEY]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = document
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = data.draw(json_values)
        paths = [p for p in _nodes(document) if p and p[0] != CHECKSUM_KEY]
    try:
        sharding = Sharding.from_json(rewrite(document), "sharding.json")
    except CorruptCheckpointError:
        return
    try:
        read_full(LocalShardFiles(saved), sharding)
    except CorruptCheckpointError:
        pass
