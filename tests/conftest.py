"""Fixtures shared by the storage tests: an S3 API server (moto, over HTTP on a free port) and
fresh object-store URLs on it and on fsspec's in-memory file system; and which tests are slow.

``-m "not slow"`` is the day-to-day subset. Besides the tests marked ``slow`` one by one, every
test that talks to the S3 server and every test of a module whose tests start ranks, training
processes or a kill harness of their own is slow."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator

import pytest


PROCESS_MODULES = {
    "test_async_exit", "test_cli_startup", "test_concurrent_saves", "test_crash", "test_crash_certificate",
    "test_docs_site", "test_examples", "test_exactly_once", "test_exactly_once_ddp", "test_install", "test_registry_crash", "test_remote_uploads", "test_sharded",
    "test_sharded_lightning", "test_sharded_remote", "test_sharded_tiered", "test_tiered_crash",
}
"""Modules whose every test starts processes of its own (spawned ranks, training runs, killed savers)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = pytest.mark.slow
    for item in items:
        module = getattr(item, "module", None)
        name = module.__name__.rpartition(".")[2] if module is not None else ""
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_s3 = "s3_endpoint" in getattr(item, "fixturenames", ()) or params.get("remote_url") == "s3"
        if name in PROCESS_MODULES or on_s3:
            item.add_marker(slow)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a real S3 API server (moto's ``ThreadedMotoServer``) for the whole session."""
    server_module = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = _free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The standard AWS environment pointing at the test server; returns the endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A new, empty bucket on the test server."""
    import boto3

    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["s3", "memory"])
def remote_url(request: pytest.FixtureRequest) -> str:
    """A fresh checkpoint URL on S3 (the moto server) and on ``memory://``."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return f"s3://{bucket}/run/checkpoints"
    return f"memory://ckpt-{uuid.uuid4().hex[:12]}/run/checkpoints"
