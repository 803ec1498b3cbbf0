"""The registry on object storage: versions claimed by conditional creation, production switched by
a conditional replace, history as one object per event; raced by threads against a real S3 API
server (moto over HTTP) and ``memory://``."""

from __future__ import annotations

import json
import threading
import uuid
import warnings
from collections.abc import Iterator

import fsspec
import fuzzing
import pytest
import torch
from core_helpers import assert_same_tree, objects
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ckpt_plugin import (
    ArtifactRegistry,
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    PromotionError,
)
from ckpt_plugin._format import documents
from ckpt_plugin.registry.objects import ObjectStorePlaces
from ckpt_plugin._format.names import format_transaction_id, parse_transaction_name, transaction_name


def parent(url: str) -> str:
    return url.rsplit("/", 1)[0]


def saved_run(url: str, epochs: int = 3) -> tuple[CheckpointManager, list[dict[str, torch.Tensor]]]:
    """A run of ``epochs`` checkpoints whose model weights differ per epoch; returns each epoch's weights."""
    manager = CheckpointManager(url, max_checkpoints=None, metric_for_best="loss")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    weights = []
    for epoch in range(epochs):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.5)
        manager.save(model, epoch=epoch, metrics={"loss": 1.0 / (epoch + 1), "accuracy": 0.5 + epoch / 10})
        weights.append({key: value.clone() for key, value in model.state_dict().items()})
    return manager, weights


def test_validate_promote_rollback_and_history_on_an_object_store(remote_url: str) -> None:
    _, weights = saved_run(remote_url)
    registry = ArtifactRegistry(remote_url)
    assert registry.validated_dir == f"{parent(remote_url)}/validated"
    record = registry.validate(0, "1.0.0", checks={"accurate": lambda ckpt: ckpt["metrics"]["accuracy"] >= 0.5})
    assert record["version"] == "1.0.0" and record["checks"] == [{"name": "accurate", "passed": True, "detail": None}]
    assert registry.validate(2, bump="minor")["version"] == "1.1.0"
    assert registry.versions() == ["1.0.0", "1.1.0"]
    parent_url, _, entry = str(registry.version_dir("1.0.0")).rpartition("/")
    assert parent_url == registry.validated_dir and parse_transaction_name(entry).name == "v1.0.0"
    assert_same_tree(registry.load("1.1.0")["model"], weights[2])

    assert registry.production() is None and registry.load_production() is None
    assert registry.promote("1.0.0")["version"] == "1.0.0"
    assert_same_tree(registry.load_production()["model"], weights[0])
    production = registry.promote("1.1.0")
    assert production["version"] == "1.1.0" and production["previous_versions"] == ["1.0.0"]
    assert_same_tree(ArtifactRegistry(remote_url).load_production()["model"], weights[2])
    assert registry.promote("1.1.0")["promoted_at"] == production["promoted_at"]  # already there: nothing changes

    assert registry.rollback()["version"] == "1.0.0"
    assert_same_tree(registry.load_production()["model"], weights[0])
    with pytest.raises(PromotionError, match="nothing to roll back"):
        registry.rollback()
    events = [(event["event"], event["version"]) for event in registry.history()]
    assert events == [("validate", "1.0.0"), ("validate", "1.1.0"), ("promote", "1.0.0"), ("promote", "1.1.0"), ("rollback", "1.0.0")]

    production_objects = objects(registry.production_dir)
    assert "model.json" in production_objects
    assert len([name for name in production_objects if name.endswith(".safetensors")]) == 1  # replaced weights are removed


def test_a_failed_check_validates_nothing(remote_url: str) -> None:
    saved_run(remote_url, epochs=1)
    registry = ArtifactRegistry(remote_url)
    with pytest.raises(PromotionError, match="failed 1 of 1 checks"):
        registry.validate(0, "1.0.0", checks=[lambda ckpt: False])
    assert registry.versions() == [] and objects(registry.validated_dir) == []


def test_a_version_is_written_once_even_when_validations_race(remote_url: str) -> None:
    saved_run(remote_url)
    registries = [ArtifactRegistry(remote_url) for _ in range(3)]
    start = threading.Barrier(3)
    outcomes: list[object] = [None] * 3

    def validate(index: int) -> None:
        start.wait(timeout=30)
        try:
            outcomes[index] = registries[index].validate(index, "2.0.0")["source"]["epoch"]
        except PromotionError as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=validate, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    winners = [outcome for outcome in outcomes if isinstance(outcome, int)]
    assert len(winners) == 1, outcomes
    assert all("already validated" in str(outcome) for outcome in outcomes if not isinstance(outcome, int))
    registry = ArtifactRegistry(remote_url)
    assert registry.versions() == ["2.0.0"] and registry.validation("2.0.0")["source"]["epoch"] == winners[0]
    assert registry.load("2.0.0")["epoch"] == winners[0]
    assert len([name for name in objects(registry.validated_dir) if name.endswith("/validation.json")]) == 1


def test_racing_bumps_each_get_a_version_of_their_own(remote_url: str) -> None:
    saved_run(remote_url)
    start = threading.Barrier(3)
    versions: list[str] = []

    def validate(epoch: int) -> None:
        start.wait(timeout=30)
        versions.append(ArtifactRegistry(remote_url).validate(epoch, bump="patch")["version"])

    threads = [threading.Thread(target=validate, args=(epoch,)) for epoch in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(versions) == ["0.0.1", "0.0.2", "0.0.3"]
    registry = ArtifactRegistry(remote_url)
    assert registry.versions() == ["0.0.1", "0.0.2", "0.0.3"]
    assert sorted(registry.validation(version)["source"]["epoch"] for version in versions) == [0, 1, 2]


def test_racing_promotions_serialize_and_none_is_lost(remote_url: str) -> None:
    _, weights = saved_run(remote_url)
    registry = ArtifactRegistry(remote_url)
    for epoch in range(3):
        registry.validate(epoch, f"1.{epoch}.0")
    start = threading.Barrier(3)
    errors: list[BaseException] = []

    def promote(version: str) -> None:
        start.wait(timeout=30)
        try:
            ArtifactRegistry(remote_url).promote(version)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(f"1.{epoch}.0",)) for epoch in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    production = registry.production()
    order = [*production["previous_versions"], production["version"]]
    assert sorted(order) == ["1.0.0", "1.1.0", "1.2.0"]  # every promotion took effect, one after another
    promotions = [event for event in registry.history() if event["event"] == "promote"]
    assert [event["version"] for event in promotions] == order
    assert [event["previous"] for event in promotions] == [None, *order[:-1]]
    assert_same_tree(registry.load_production()["model"], weights[int(order[-1].split(".")[1])])
    assert len([name for name in objects(registry.production_dir) if name.endswith(".safetensors")]) == 1


def test_a_promotion_that_loses_the_race_retries_on_top_of_the_winner(remote_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    saved_run(remote_url)
    registry = ArtifactRegistry(remote_url)
    for epoch in range(3):
        registry.validate(epoch, f"1.{epoch}.0")
    registry.promote("1.0.0")
    switch = ObjectStorePlaces.switch
    interleaved = []

    def switch_after_a_rival(self: ObjectStorePlaces, staged: object, document: bytes, expected: object) -> None:
        if not interleaved:
            interleaved.append(True)
            ArtifactRegistry(remote_url).promote("1.1.0")  # lands between our read and our write
        switch(self, staged, document, expected)

    monkeypatch.setattr(ObjectStorePlaces, "switch", switch_after_a_rival)
    production = registry.promote("1.2.0")
    assert production["version"] == "1.2.0" and production["previous_versions"] == ["1.0.0", "1.1.0"]

    interleaved.clear()
    with pytest.raises(PromotionError, match="changed while rolling back"):
        registry.rollback()  # would undo the rival's promotion, not ours: refused
    monkeypatch.setattr(ObjectStorePlaces, "switch", switch)
    assert registry.production()["version"] == "1.1.0"
    assert registry.rollback()["version"] == "1.2.0"


def test_an_interrupted_validation_leaves_no_version_and_is_cleaned_up(remote_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    saved_run(remote_url, epochs=1)
    registry = ArtifactRegistry(remote_url)

    def die(*args: object, **kwargs: object) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(ObjectStorePlaces, "claim", die)
    with pytest.raises(KeyboardInterrupt):
        registry.validate(0, "1.0.0")
    monkeypatch.undo()
    assert registry.versions() == [] and objects(registry.validated_dir) == []

    # A writer killed before it could clean up: its prefix stays invisible and goes after the grace period.
    fs, path = fsspec.core.url_to_fs(registry.validated_dir)
    dead = transaction_name("v1.0.0", format_transaction_id(0, "000000000000dead"))
    fs.pipe_file(f"{path}/{dead}/model.safetensors", b"partial")
    assert registry.versions() == []
    registry.validate(0, "1.0.0")
    assert registry.versions() == ["1.0.0"]
    registry._places.grace_seconds = -1
    registry.promote("1.0.0")
    assert not [name for name in objects(registry.validated_dir) if "dead" in name]


def test_tampered_claims_records_and_weights_are_refused(remote_url: str) -> None:
    _, weights = saved_run(remote_url, epochs=2)
    registry = ArtifactRegistry(remote_url)
    registry.validate(0, "1.0.0")
    registry.validate(1, "2.0.0")
    registry.promote("2.0.0")
    fs, validated = fsspec.core.url_to_fs(registry.validated_dir)
    fs.pipe_file(f"{validated}/v2.0.0.json", fs.cat_file(f"{validated}/v1.0.0.json"))  # point 2.0.0 at 1.0.0's files
    with pytest.raises(CorruptCheckpointError, match="altered"):
        registry.load("2.0.0")

    _, production = fsspec.core.url_to_fs(registry.production_dir)
    [name] = [name for name in objects(registry.production_dir) if name.endswith(".safetensors")]
    data = bytearray(fs.cat_file(f"{production}/{name}"))
    data[-1] ^= 0x01
    fs.pipe_file(f"{production}/{name}", bytes(data))
    with pytest.raises(CorruptCheckpointError, match=name):
        registry.load_production()
    assert torch.equal(registry.load_production(verify=False)["model"]["0.weight"], weights[1]["0.weight"])


def test_places_need_a_parent_and_conditional_writes(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="no parent prefix"):
        ArtifactRegistry("memory://bucketonly")
    with pytest.raises(ConfigurationError, match="same store"):
        ArtifactRegistry("memory://b/run/checkpoints", validated_dir=str(tmp_path / "validated"))
    url = f"file://{tmp_path}/run/checkpoints"
    saved_run(url, epochs=1)
    registry = ArtifactRegistry(url)
    with pytest.raises(ConfigurationError, match="conditional writes"):
        registry.validate(0, "1.0.0")
    assert registry.versions() == [] and registry.production() is None
    with pytest.raises(CheckpointNotFoundError):
        registry.load("1.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.history() == []


def test_an_interrupted_promotion_leaves_production_as_it_was(remote_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, weights = saved_run(remote_url, epochs=2)
    registry = ArtifactRegistry(remote_url)
    registry.validate(0, "1.0.0")
    registry.validate(1, "2.0.0")
    registry.promote("1.0.0")
    before = objects(registry.production_dir)

    def die(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ObjectStorePlaces, "switch", die)
    with pytest.raises(KeyboardInterrupt):
        registry.promote("2.0.0")
    monkeypatch.undo()
    assert registry.production()["version"] == "1.0.0"
    assert_same_tree(registry.load_production()["model"], weights[0])
    assert objects(registry.production_dir) == before  # the uploaded weights were removed
    assert [event["event"] for event in registry.history()] == ["validate", "validate", "promote"]


def test_changes_whose_conditional_write_was_answered_late_take_effect_once(s3_bucket: str) -> None:
    """A claim or a switch of production whose answer is lost is sent again and refused (412: the
    object is no longer what the condition names, because the first one succeeded). That is the
    change taking effect, not a race lost: the version stays validated with its files, production
    keeps its weights, and the history records each change."""
    from lost_responses import lost_responses

    url = f"s3://{s3_bucket}/run/checkpoints"
    _, weights = saved_run(url)
    registry = ArtifactRegistry(url)
    registry.validate(0, "1.0.0")
    registry.promote("1.0.0")
    conditional = lambda kwargs: "IfMatch" in kwargs or ("IfNoneMatch" in kwargs and kwargs["Key"].endswith("v1.0.1.json"))  # noqa: E731
    with lost_responses("put_object", times=3, only=conditional) as lost:
        assert registry.validate(1, "1.0.1")["version"] == "1.0.1"
        assert registry.promote("1.0.1")["version"] == "1.0.1"
        assert registry.rollback()["version"] == "1.0.0"
    assert len(lost) == 3, "not every change was answered late"
    assert_same_tree(registry.load("1.0.1")["model"], weights[1])
    assert_same_tree(registry.load_production()["model"], weights[0])
    history = [(event["event"], event["version"]) for event in ArtifactRegistry(url).history()]
    assert history == [("validate", "1.0.0"), ("promote", "1.0.0"), ("validate", "1.0.1"), ("promote", "1.0.1"),
                       ("rollback", "1.0.0")]
    assert registry.promote("1.0.1")["version"] == "1.0.1"
    assert_same_tree(registry.load_production()["model"], weights[1])


# ---------------------------------------------------------------------- hostile registry objects

_HOSTILE_TARGETS = ["validated/v1.0.0.json", "validated/history/{first}", "production/model.json"]


@pytest.fixture(scope="module")
def hostile_run() -> Iterator[str]:
    url = f"memory://hostile-{uuid.uuid4().hex[:8]}/run/checkpoints"
    saved_run(url, epochs=1)
    registry = ArtifactRegistry(url)
    registry.validate(0, "1.0.0")
    registry.promote("1.0.0")
    yield url
    fsspec.filesystem("memory").rm(url.split("://", 1)[1].rsplit("/", 2)[0], recursive=True)


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=st.sampled_from(_HOSTILE_TARGETS),
    document=fuzzing.json_values,
    raw=st.binary(max_size=64),
    how=st.sampled_from(["raw", "json", "edit"]),
    key_index=st.integers(min_value=0, max_value=100),
)
def test_hostile_claims_pointers_and_history_objects_only_raise_checkpoint_errors(
    hostile_run: str, target: str, document: object, raw: bytes, how: str, key_index: int
) -> None:
    """Whatever an attacker writes into the registry's own objects (garbage, any JSON, or the real
    document with one key replaced and its self-checksum recomputed), every reader returns plain
    data or raises a CheckpointError, and nothing is written."""
    fs = fsspec.filesystem("memory")
    run = hostile_run.split("://", 1)[1].rsplit("/", 1)[0]
    if "{first}" in target:
        target = target.format(first=sorted(fs.ls(f"{run}/validated/history", detail=False))[0].rsplit("/", 1)[-1])
    key = f"{run}/{target}"
    original = fs.cat_file(key)
    before = objects(f"memory://{run}")
    if how == "edit":
        edited = json.loads(original)
        field = sorted(edited)[key_index % len(edited)]
        edited[field] = document
        if documents.SEAL_KEY in edited:
            edited = documents.seal(edited)
        fs.pipe_file(key, json.dumps(edited).encode())
    else:
        fs.pipe_file(key, json.dumps(document).encode() if how == "json" else raw)
    try:
        registry = ArtifactRegistry(hostile_run)
        for name, read in [
            ("versions", registry.versions),
            ("load", lambda: registry.load("1.0.0")),
            ("production", registry.production),
            ("load_production", registry.load_production),
            ("history", registry.history),
        ]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                try:
                    value = read()
                except CheckpointError:
                    continue
            assert fuzzing.non_data(value) is None, name
        assert objects(f"memory://{run}") == before
    finally:
        fs.pipe_file(key, original)
