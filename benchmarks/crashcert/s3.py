"""The S3 side of the certificate: a moto server in this process, a fault-injecting TCP proxy in
front of it (``tests/tcp_proxy.py``) through which the workers reach it, and direct bucket access
(never through the proxy) for templates, clean-up and the checkers."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

BUCKET = "crash-certificate"
MIN_PART_BYTES = 64 * 1024
"""The server's smallest multipart part, so that the workers' small parts are accepted."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Harness:
    """A moto S3 server and a :class:`FaultyProxy` in front of it, with one bucket."""

    def __init__(self, *, reset_probability: float, stall_probability: float, stall_seconds: float, seed: int) -> None:
        os.environ["S3_UPLOAD_PART_MIN_SIZE"] = str(MIN_PART_BYTES)  # read when moto is imported
        import boto3
        from moto.server import ThreadedMotoServer
        from tcp_proxy import FaultyProxy

        port = _free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proxy = FaultyProxy("127.0.0.1", port, reset_probability=reset_probability,
                                 stall_probability=stall_probability, stall_seconds=stall_seconds, seed=seed).start()
        self.client = boto3.client("s3", endpoint_url=self.endpoint)
        self.client.create_bucket(Bucket=BUCKET)

    @property
    def proxy_endpoint(self) -> str:
        return self.proxy.url

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def keys(self, prefix: str) -> list[str]:
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return found

    def copy_prefix(self, source: str, target: str) -> None:
        """Copy every object under ``source`` to ``target`` on the server."""
        for key in self.keys(source):
            self.client.copy_object(Bucket=BUCKET, Key=f"{target}/{key[len(source) + 1:]}",
                                    CopySource={"Bucket": BUCKET, "Key": key})

    def remove_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` and abort every multipart upload open there."""
        keys = self.keys(prefix)
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": key} for key in keys[start:start + 1000]]})
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
            for upload in page.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])

    def faults(self) -> dict[str, Any]:
        return {"connections": self.proxy.connections, "resets": self.proxy.resets, "stalls": self.proxy.stalls}

    def close(self) -> None:
        self.proxy.close()
        self._server.stop()
