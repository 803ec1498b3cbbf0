"""Fail fast when an object store's endpoint cannot be reached.

The S3 client retries a refused or silent connection many times with growing pauses (that is
right for a store that throttles, wrong for an endpoint that is not there): a mistyped
``endpoint_url`` used to mean two minutes of silence and then a misleading warning. Before the
first request to an endpoint, one cheap listing goes out with a short connect timeout and one
retry; if the endpoint cannot be reached, :class:`StorageError` says so at once, naming the
endpoint and the setting that chose it. Reachable endpoints are remembered for the process.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Mapping
from typing import Any

from ..errors import StorageError

CONNECT_TIMEOUT_SECONDS = 5
"""Connect timeout of the reachability check (and the default of S3 clients)."""
CHECK_ATTEMPTS = 2
"""Attempts of the check: a refused endpoint fails at once, a silent one within two timeouts."""
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

_CONNECTION_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ProxyConnectionError",
    "ClientConnectorError", "ServerTimeoutError", "ServerDisconnectedError", "TimeoutError",
    "ConnectionRefusedError", "ConnectionResetError", "gaierror",
}
_reached: set[tuple[str, str]] = set()
_lock = threading.Lock()


def endpoint_setting(options: Mapping[str, Any]) -> tuple[str | None, str]:
    """The endpoint URL that ``options`` and the environment choose, and the setting that chose it."""
    given = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    if given:
        return str(given), "storage_options['endpoint_url']"
    for variable in ENDPOINT_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable], f"the environment variable {variable}"
    return None, "AWS's default endpoint for the region (set AWS_ENDPOINT_URL or storage_options['endpoint_url'] for another store)"


def _is_connection_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if any(kind.__name__ in _CONNECTION_ERRORS for kind in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def check_s3(filesystem_type: type, options: Mapping[str, Any], root: str, path: str) -> None:
    """Raise :class:`StorageError` at once if the S3 endpoint for ``root`` cannot be reached.

    Any answer from the store (a listing, a missing bucket, refused credentials) counts as reached:
    those errors are reported, with their own advice, by the request that meets them.
    """
    endpoint, setting = endpoint_setting(options)
    key = (endpoint or "", str(sorted((k, repr(v)) for k, v in options.items())))
    with _lock:
        if key in _reached:
            return
    config = dict(options.get("config_kwargs") or {})
    config.update(
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=CONNECT_TIMEOUT_SECONDS * 2,
        retries={"total_max_attempts": CHECK_ATTEMPTS, "mode": "standard"},
    )
    probe = filesystem_type(**{**options, "config_kwargs": config, "skip_instance_cache": True})
    probe.retries = 1  # s3fs's own retry loop, around the client's
    bucket = path.split("/", 1)[0]
    try:
        probe.ls(bucket, detail=False)
    except Exception as exc:  # noqa: BLE001 - only connection failures are this check's business
        if _is_connection_error(exc):
            shown = endpoint or "AWS's default endpoint"
            error = StorageError(
                errno.EHOSTUNREACH,
                f"cannot reach the object store at {shown} for {root} ({type(exc).__name__}: {exc}). The endpoint "
                f"comes from {setting}; fix it there, or check the network and any proxy settings",
            )
            error.filename = root
            raise error from exc
    with _lock:
        _reached.add(key)
