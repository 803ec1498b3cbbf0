"""S3 requests whose response is lost after the server acted on them, so the client sends them
again: what a connection reset at the wrong moment does to a request that botocore retries."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest


@contextmanager
def lost_responses(method: str, *, times: int = 1,
                   only: Callable[[dict[str, Any]], bool] = lambda kwargs: True) -> Iterator[list[Any]]:
    """Within the block, send the first ``times`` ``method`` requests (those ``only`` accepts)
    twice, handing the caller only the second answer; yields the list of lost answers.

    Both forms of s3fs's request method are replaced: ``call_s3``, the blocking one, holds the
    original coroutine function itself.
    """
    import s3fs
    from fsspec.asyn import sync_wrapper

    real = s3fs.S3FileSystem._call_s3
    lost: list[Any] = []

    async def call_s3(fs: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
        if name == method and len(lost) < times and only(kwargs):
            lost.append(await real(fs, name, *args, **kwargs))  # the server acts; the answer never arrives
        return await real(fs, name, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(s3fs.S3FileSystem, "_call_s3", call_s3)
        patch.setattr(s3fs.S3FileSystem, "call_s3", sync_wrapper(call_s3))
        yield lost
