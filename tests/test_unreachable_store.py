"""An object store that cannot be reached fails at once, with one message that names the endpoint
and the setting that chose it, before any warning and before any training time is spent."""

from __future__ import annotations

import socket
import time
import warnings

import pytest

from ckpt_plugin import ArtifactRegistry, CheckpointManager
from ckpt_plugin.errors import StorageError


def _closed_port_url() -> str:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{listener.getsockname()[1]}"


def _fails_fast(build) -> StorageError:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no misleading warning comes first
        with pytest.raises(StorageError) as caught:
            build()
    assert time.monotonic() - started < 30, "the client retried an unreachable endpoint instead of failing"
    return caught.value


def test_an_endpoint_from_storage_options_that_refuses_connections_fails_at_once(s3_env: str) -> None:
    endpoint = _closed_port_url()
    error = _fails_fast(lambda: CheckpointManager("s3://bucket/run", storage_options={"endpoint_url": endpoint}))
    message = str(error)
    assert endpoint in message and "storage_options['endpoint_url']" in message and "s3://bucket/run" in message
    assert "clean up" not in message


def test_an_endpoint_from_the_environment_names_the_variable(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = _closed_port_url()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    error = _fails_fast(lambda: CheckpointManager("s3://bucket/run"))
    assert endpoint in str(error) and "AWS_ENDPOINT_URL" in str(error)


def test_a_registry_on_an_unreachable_store_fails_at_once(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", _closed_port_url())
    error = _fails_fast(lambda: ArtifactRegistry("s3://bucket/run").versions())
    assert "AWS_ENDPOINT_URL" in str(error)


def test_a_reachable_store_with_a_missing_bucket_is_not_called_unreachable(s3_env: str) -> None:
    manager = CheckpointManager("s3://no-such-bucket-for-reach/run")
    with pytest.raises(StorageError, match="bucket") as caught:
        manager.save({"w": __import__("torch").zeros(2)}, epoch=0, metrics={"loss": 1.0})
    assert "cannot reach" not in str(caught.value)
