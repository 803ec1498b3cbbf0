"""Fuzzing every reader with structured mutations of a real run (see ``tests/fuzzing.py``).

The suite runs a derandomized few hundred cases; ``benchmarks/fuzz.py --cases N`` runs as many as asked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

import fuzzing

CASES = 250


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    fuzzing.build_golden(root)
    return root


def test_the_unmutated_run_loads_through_every_reader(golden: Path, tmp_path: Path) -> None:
    work = tmp_path / "case"
    import shutil

    shutil.copytree(golden, work)
    fuzzing.write_listing_cache(work / "checkpoints")
    for name, read in fuzzing.readers(work):
        assert fuzzing.non_data(read()) is None, name


@pytest.mark.slow
@settings(max_examples=CASES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutation=fuzzing.mutations)
def test_every_mutation_ends_in_a_correct_load_or_a_checkpoint_error(golden: Path, tmp_path: Path, mutation) -> None:
    failures = fuzzing.run_case(golden, tmp_path / "case", mutation)
    assert not failures, f"{mutation.describe()}: {failures}"


@pytest.mark.parametrize("target", sorted(fuzzing.DATA_STATE_PATHS))
@pytest.mark.parametrize("kind", ["replace", "delete", "deep", "overflow", "flip", "truncate"])
def test_mutations_of_a_data_loaders_position_end_in_a_load_or_a_checkpoint_error(golden: Path, tmp_path: Path, target: str, kind: str) -> None:
    """The loader's position (JSON in state.json, its generator a tensor in state.safetensors) is
    read like the rest of the checkpoint: by ``load``, ``ckpt show`` and a resume that hands it back."""
    failures = {}
    for where in (0, 2, 5, 11):
        for value in (None, "x", [1, {"__tensor__": "../../outside/canary.bin"}], {"__numpy__": "object", "value": 1}):
            mutation = fuzzing.Mutation(target, kind, where, value, 129, where + 1, fuzzing.DATA_STATE_PATHS[target])
            problems = fuzzing.run_case(golden, tmp_path / "case", mutation)
            if problems:
                failures[mutation.describe()] = problems
            if kind in ("flip", "truncate", "deep", "overflow"):
                break  # the value plays no part
    assert not failures, failures


def test_the_golden_run_holds_a_data_loaders_position_that_show_summarizes(golden: Path) -> None:
    from ckpt_plugin import CheckpointManager
    from ckpt_plugin.summary import data_loader_state

    info = CheckpointManager(golden / "checkpoints", max_checkpoints=None).checkpoints()[-1]
    summary = data_loader_state(info)
    assert summary is not None and summary["saved_by"] == "hf" and summary["world_size"] == 1
    assert summary["loaders"][0]["batches"] == 3


@pytest.mark.parametrize("target", fuzzing.TARGETS)
def test_overflowing_numbers_in_every_document_end_in_a_load_or_a_checkpoint_error(golden: Path, tmp_path: Path, target: str) -> None:
    """The overflow class, in every document the harness covers: 10**400, -10**400, 1e999, -1e999,
    a 5,000-digit integer and deeply nested arrays, each in place of a number of the document."""
    for index, _ in enumerate(fuzzing.OVERFLOW_TEXTS):
        for where in (0, 3, 11):
            mutation = fuzzing.Mutation(target=target, kind="overflow", where=where, value=None, depth=2, byte=index)
            failures = fuzzing.run_case(golden, tmp_path / "case", mutation)
            assert not failures, f"{mutation.describe()}: {failures}"


@pytest.mark.timeout(600)  # a reader that blocks on a FIFO fails here instead of hanging the suite
@pytest.mark.parametrize("kind", fuzzing.SPECIAL_KINDS)
def test_every_reader_refuses_or_skips_special_files_and_links_in_every_place(golden: Path, tmp_path: Path, kind: str) -> None:
    failures = {}
    for target in fuzzing.TARGETS:
        mutation = fuzzing.Mutation(target, kind, 0, None, 2, 1)
        problems = fuzzing.run_case(golden, tmp_path / "case", mutation)
        if problems:
            failures[target] = problems
    assert not failures, f"{kind}: {failures}"
