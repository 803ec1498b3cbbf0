"""Bounded work for bounded input: what a hostile checkpoint declares never decides what is
allocated, parsers stay linear, and numbers too large for a float never stop ranking or saving.

Each probe builds the hostile document itself and expects a ``CorruptCheckpointError`` naming the
file (and the key), or, for metrics, a checkpoint that is never the best and saves that go on.
Time is not asserted here; ``benchmarks/header_parse.py`` measures it.
"""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ckpt_plugin import CheckpointManager, ConfigurationError, CorruptCheckpointError
from ckpt_plugin._checkpoint import METADATA_CHECKSUM_KEY, METADATA_FILE, metadata_checksum
from ckpt_plugin._distributed import LocalShardFiles, SafetensorsWriter, Sharding, JsonSavePlanner, read_full, read_sharding
from ckpt_plugin._distributed.layout import CHECKSUM_KEY, FORMAT_NAME, FORMAT_VERSION, _checksum
from ckpt_plugin._format import tensorformat

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

HUGE = 10**400


# ---------------------------------------------------------------------- sharding.json


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A real one-rank sharded checkpoint: ``model.w`` (4x3 float32), ``model.b``, and a list."""
    torch.manual_seed(0)
    state = {"model": {"w": torch.randn(4, 3), "b": torch.arange(3, dtype=torch.int64)}, "extra": {"l": [1.5, 2.5]}}
    dcp.save(state, storage_writer=SafetensorsWriter(tmp_path), planner=JsonSavePlanner())
    return tmp_path


def document(directory: Path) -> dict:
    return json.loads((directory / "sharding.json").read_text())


def store(directory: Path, changed: dict) -> None:
    """Write ``changed`` back with its checksum recomputed, as someone who can write the directory would."""
    changed = copy.deepcopy(changed)
    changed[CHECKSUM_KEY] = _checksum(changed)
    (directory / "sharding.json").write_text(json.dumps(changed))


def read(directory: Path) -> dict:
    files = LocalShardFiles(directory)
    return read_full(files, read_sharding(files, where=str(directory / "sharding.json")), where=str(directory / "sharding.json"))


def refused(directory: Path, *names: str) -> str:
    """Read the checkpoint; it must be refused with a ``CorruptCheckpointError`` naming the file at
    fault (``sharding.json`` unless a shard file is named) and each of ``names``. Returns the message."""
    with pytest.raises(CorruptCheckpointError) as caught:
        read(directory)
    message = str(caught.value)
    assert "sharding.json" in message or ".safetensors" in " ".join(names)
    for name in names:
        assert name in message
    return message


@pytest.mark.parametrize("length", [2**40, 2**70])
def test_a_declared_shape_larger_than_the_files_is_refused_before_anything_is_allocated(saved: Path, length: int) -> None:
    changed = document(saved)
    weight = changed["tensors"]["model.w"]
    weight["shape"] = [length]
    weight["chunks"] = [{**weight["chunks"][0], "offsets": [0], "sizes": [length]}]
    store(saved, changed)
    refused(saved, "model.w")


def test_a_file_recorded_larger_than_it_is_cannot_make_room_for_a_declared_shape(saved: Path) -> None:
    changed = document(saved)
    weight = changed["tensors"]["model.w"]
    weight["shape"] = [2**40]
    weight["chunks"] = [{**weight["chunks"][0], "offsets": [0], "sizes": [2**40]}]
    changed["files"][weight["chunks"][0]["file"]]["size"] = 2**45
    store(saved, changed)
    refused(saved, weight["chunks"][0]["file"])


def test_a_chunk_that_its_file_does_not_hold_is_refused_before_allocation(saved: Path) -> None:
    changed = document(saved)
    changed["tensors"]["model.w"]["chunks"][0]["key"] = "model.w@0,1"  # no such stored chunk
    store(saved, changed)
    refused(saved, "model.w", "model.w@0,1")


def test_a_chunk_stored_with_another_shape_is_refused_before_allocation(saved: Path) -> None:
    changed = document(saved)
    changed["tensors"]["model.w"]["chunks"][0]["key"] = "model.b@0"
    changed["tensors"]["model.b"]["chunks"][0]["key"] = "model.w@0,0"
    store(saved, changed)
    refused(saved, "model.w", "model.b@0")


def test_two_chunks_naming_one_stored_chunk_are_refused(saved: Path) -> None:
    changed = document(saved)
    weight = changed["tensors"]["model.w"]
    first = weight["chunks"][0]
    weight["chunks"] = [{**first, "offsets": [0, 0], "sizes": [2, 3]}, {**first, "offsets": [2, 0], "sizes": [2, 3]}]
    store(saved, changed)
    refused(saved, "model.w", first["key"])


def test_a_sparse_list_index_in_a_path_is_refused(saved: Path) -> None:
    changed = document(saved)
    changed["paths"]["model.b"] = ["model", "layers", 1048575]
    store(saved, changed)
    refused(saved, "layers", "1048575")


def test_a_path_never_addresses_into_a_tensor(saved: Path) -> None:
    changed = document(saved)
    changed["paths"]["model.b"] = ["model", "w", 0]  # would overwrite row 0 of model.w
    store(saved, changed)
    refused(saved, "model")


def test_a_path_never_addresses_into_a_stored_value(saved: Path) -> None:
    changed = document(saved)
    changed["objects"]["extra.d"] = {"kept": 1}
    changed["paths"]["extra.d"] = ["extra", "d"]
    changed["paths"]["model.b"] = ["extra", "d", "kept"]
    store(saved, changed)
    refused(saved, "extra")


def test_two_keys_with_one_path_are_refused(saved: Path) -> None:
    changed = document(saved)
    changed["paths"]["model.b"] = list(changed["paths"].get("model.w", ["model", "w"]))
    store(saved, changed)
    refused(saved, "model")


def test_the_valid_layout_still_reads_back_exactly(saved: Path) -> None:
    state = read(saved)
    torch.manual_seed(0)
    assert torch.equal(state["model"]["w"], torch.randn(4, 3))
    assert state["extra"]["l"] == [1.5, 2.5]


def tiles(shape: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """The brute-force answer: every element of ``shape`` is covered by exactly one chunk."""
    counts = torch.zeros(shape, dtype=torch.int64)
    for offsets, sizes in chunks:
        view = counts
        for dim, (start, length) in enumerate(zip(offsets, sizes)):
            view = view.narrow(dim, start, length)
        view += 1
    return bool((counts == 1).all())


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """A small shape and chunks inside it: a grid tiling, sometimes disturbed, or arbitrary boxes."""
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    if draw(st.booleans()):
        cuts = [sorted(set(draw(st.lists(st.integers(1, max(1, d - 1)), max_size=2))) | {0, d}) for d in shape]
        chunks = [((), ())]
        for bounds in cuts:
            chunks = [(o + (a,), s + (b - a,)) for o, s in chunks for a, b in zip(bounds, bounds[1:])]
        if draw(st.booleans()) and chunks:
            index = draw(st.integers(0, len(chunks) - 1))
            offsets, sizes = chunks[index]
            dim = draw(st.integers(0, len(shape) - 1))
            moved = max(0, min(shape[dim] - sizes[dim], offsets[dim] + draw(st.sampled_from([-1, 1]))))
            chunks[index] = (offsets[:dim] + (moved,) + offsets[dim + 1 :], sizes)
        if draw(st.booleans()):
            chunks.append(draw(st.sampled_from(chunks)))
        return shape, chunks
    boxes = []
    for _ in range(draw(st.integers(0, 6))):
        offsets = tuple(draw(st.integers(0, d)) for d in shape)
        sizes = tuple(draw(st.integers(0, d - o)) for o, d in zip(offsets, shape))
        boxes.append((offsets, sizes))
    return shape, boxes


def layout_document(shape: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> dict:
    changed = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "world_size": 1,
        "tensors": {"model.w": {"dtype": "U8", "shape": list(shape), "chunks": [
            {"offsets": list(o), "sizes": list(s), "file": "model-r0-of-1.safetensors", "key": f"model.w@{i}"}
            for i, (o, s) in enumerate(chunks)
        ]}},
        "objects": {},
        "paths": {"model.w": ["model", "w"]},
        "files": {"model-r0-of-1.safetensors": {"size": 10**6, "checksum": "xxh3_64:0"}},
    }
    changed[CHECKSUM_KEY] = _checksum(changed)
    return changed


@settings(max_examples=400, derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts())
def test_the_linear_overlap_check_agrees_with_brute_force(layout) -> None:
    shape, chunks = layout
    try:
        Sharding.from_json(layout_document(shape, chunks), "sharding.json")
        accepted = True
    except CorruptCheckpointError as exc:
        assert "model.w" in str(exc)
        accepted = False
    assert accepted == tiles(shape, chunks), (shape, chunks)


# ---------------------------------------------------------------------- safetensors headers

HEADER_CHILD = r"""
import resource, sys
from pathlib import Path
import torch
from ckpt_plugin._io.files import read_header
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_, specs, _ = read_header(sys.argv[1], None)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(specs), (after - before) * 1024)
"""


def empty_tensors_file(path: Path, count: int) -> None:
    body = ",".join(f'"t{index:09d}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for index in range(count))
    encoded = ("{" + body + "}").encode()
    encoded += b" " * (-(8 + len(encoded)) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded)


def test_a_header_of_many_empty_tensors_costs_a_small_object_each(tmp_path: Path) -> None:
    """Parsing keeps one small object per tensor: no dict of dicts, no copies of the header."""
    count = 200_000
    path = tmp_path / "empty.safetensors"
    empty_tensors_file(path, count)
    result = subprocess.run([sys.executable, "-c", HEADER_CHILD, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    parsed, grown = map(int, result.stdout.split())
    assert parsed == count
    assert grown / count < 400, f"{grown / count:.0f} bytes per tensor"


def test_an_empty_tensor_must_sit_between_two_others(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
        "e": {"dtype": "F32", "shape": [0], "data_offsets": [1, 1]},
        "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]},
    }
    encoded = json.dumps(header).encode()
    data = struct.pack("<Q", len(encoded)) + encoded + b"\x00" * 4
    with pytest.raises(CorruptCheckpointError, match="'e'"):
        tensorformat.parse(data, len(data), "x.safetensors")
    header["e"]["data_offsets"] = [2, 2]
    encoded = json.dumps(header).encode()
    data = struct.pack("<Q", len(encoded)) + encoded + b"\x00" * 4
    specs, _ = tensorformat.parse(data, len(data), "x.safetensors")
    assert specs["e"].start == specs["b"].start and specs["e"].nbytes == 0


@pytest.mark.parametrize("number", [b"1" + b"0" * 400, b"-1" + b"0" * 400, b"1e999", b"1" + b"0" * 5000, b"[" * 100000])
def test_overflowing_numbers_in_a_header_are_refused_naming_the_file(tmp_path: Path, number: bytes) -> None:
    encoded = b'{"__metadata__":{"format":"pt"},"w":{"dtype":"U8","shape":[' + number + b'],"data_offsets":[0,1]}}'
    data = struct.pack("<Q", len(encoded)) + encoded + b"\x00"
    with pytest.raises(CorruptCheckpointError, match="x.safetensors"):
        tensorformat.parse(data, len(data), "x.safetensors")


# ---------------------------------------------------------------------- metrics


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(2, 2)


def plant_metric(checkpoint: Path, value: int) -> None:
    """Set the loss recorded in ``checkpoint`` to ``value``, with its checksum recomputed."""
    path = checkpoint / METADATA_FILE
    document = json.loads(path.read_text())
    document["metrics"]["loss"] = value
    document[METADATA_CHECKSUM_KEY] = metadata_checksum(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("planted", [HUGE, -HUGE], ids=["10**400", "-10**400"])
@pytest.mark.parametrize("options", [{"keep_best": True}, {"keep_top_k": 2}])
def test_a_sibling_with_an_overflowing_metric_is_never_best_and_never_stops_a_save(tmp_path: Path, planted: int, options: dict) -> None:
    manager = CheckpointManager(tmp_path, max_checkpoints=1, metric_for_best="loss", mode="min", **options)
    model = tiny()
    manager.save(model, epoch=0, metrics={"loss": 0.5})
    manager.save(model, epoch=1, metrics={"loss": 0.9})
    plant_metric(tmp_path / "epoch_0", planted)
    fresh = CheckpointManager(tmp_path, max_checkpoints=1, metric_for_best="loss", mode="min", **options)
    assert fresh.best().epoch == 1
    assert fresh.load_best()["epoch"] == 1
    for epoch in (2, 3, 4):
        fresh.save(model, epoch=epoch, metrics={"loss": 1.0 - epoch / 10})
    assert fresh.best().epoch == 4
    assert fresh.latest().epoch == 4


def test_an_overflowing_metric_passed_to_save_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, max_checkpoints=2, keep_best=True, metric_for_best="loss")
    for value in (HUGE, -HUGE):
        with pytest.raises(ConfigurationError, match="loss"):
            manager.save(tiny(), epoch=0, metrics={"loss": value})
        with pytest.raises(ConfigurationError, match="acc"):
            manager.save(tiny(), epoch=0, metrics={"loss": 0.1, "acc": value})
    assert manager.checkpoints() == []
    assert not any(path.name.startswith("epoch_") for path in tmp_path.iterdir())
