"""``Location``: a path or URL with its storage options, decided once and shared."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from ckpt_plugin.errors import ConfigurationError
from ckpt_plugin._storage import LOCAL, Location


def test_a_local_path_is_a_directory_and_refuses_storage_options(tmp_path: Path) -> None:
    place = Location.of(tmp_path / "run")
    assert not place.remote
    assert place.path == tmp_path / "run"
    assert place.backend() is LOCAL
    assert place.sibling("validated").path == tmp_path / "validated"
    assert place.child("a", "b").path == tmp_path / "run" / "a" / "b"
    with pytest.raises(ConfigurationError, match="only apply to URLs"):
        Location.of(tmp_path, {"anon": True})


def test_a_url_opens_one_backend_that_its_neighbours_share() -> None:
    place = Location.of("memory://bucket/run/checkpoints/")
    assert place.remote and str(place) == "memory://bucket/run/checkpoints"
    backend = place.backend()
    assert place.backend() is backend
    validated = place.sibling("validated")
    assert str(validated) == "memory://bucket/run/validated"
    assert validated.backend() is backend
    assert validated.commit_store().root == "memory://bucket/run/validated"
    assert place.commit_store().root == "memory://bucket/run/checkpoints"
    with pytest.raises(ConfigurationError, match="is a URL"):
        place.path


def test_a_location_passes_through_and_refuses_options_given_twice() -> None:
    place = Location.of("memory://bucket/run", {"skip_instance_cache": True})
    assert Location.of(place) is place
    assert Location.of(place, {"skip_instance_cache": True}) is place
    with pytest.raises(ConfigurationError, match="already carries"):
        Location.of(place, {"other": 1})


def test_a_location_travels_to_another_process_with_its_options() -> None:
    place = Location.of("memory://bucket/run", {"skip_instance_cache": True})
    place.backend()
    copy = pickle.loads(pickle.dumps(place))
    assert copy == place and copy.storage_options == {"skip_instance_cache": True}
    assert copy.backend().root == "memory://bucket/run"


def test_a_location_says_whether_another_is_on_its_store_and_what_dates_it(tmp_path: Path) -> None:
    bucket = Location.of("s3://bucket/run/checkpoints")
    assert bucket.same_store(Location.of("s3://bucket/run/validated"))
    assert not bucket.same_store(Location.of("memory://bucket/run/validated"))
    assert not bucket.same_store(Location.of(tmp_path))
    assert Location.of(tmp_path).same_store(Location.of(tmp_path / "other"))
    assert bucket.dated_by("metadata.json") == "s3://bucket/run/checkpoints/metadata.json"
    assert Location.of(tmp_path / "epoch_1").dated_by("metadata.json") == str(tmp_path / "epoch_1")
