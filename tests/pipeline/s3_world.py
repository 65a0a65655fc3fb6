"""A real S3 API for tests: moto's server mode (an HTTP S3 endpoint on 127.0.0.1), started by the
fixtures themselves, so that the suite needs nothing else (issue 20). Not a mock of the client:
s3fs, zarr's FsspecStore and every subprocess talk HTTP to it as to any S3-compatible service.

    def test_x(s3):                       # a fresh bucket per test
        url = s3.url("store.zarr")        # s3://<bucket>/store.zarr
        s3.cli_options                    # ["--storage-option", "endpoint_url=http://127.0.0.1:PORT"]
        s3.storage_options                # {"endpoint_url": ...} for zarr.open_group / s3fs
        s3.snapshot("store.zarr")         # every object under the prefix: relative key -> bytes

Credentials are set in the environment (AWS_ACCESS_KEY_ID, ...), the way s3fs/botocore read them,
and so reach subprocesses; the endpoint is not (AWS_ENDPOINT_URL unset): commands get it through
`--storage-option endpoint_url=...`, as a user of an S3-compatible service would.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from dataclasses import dataclass

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "mtkd-test", "AWS_SECRET_ACCESS_KEY": "mtkd-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
_buckets = itertools.count()


@dataclass
class S3World:
    endpoint: str
    bucket: str

    @property
    def storage_options(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint}

    @property
    def cli_options(self) -> list[str]:
        return ["--storage-option", f"endpoint_url={self.endpoint}"]

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    @property
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, use_listings_cache=False, skip_instance_cache=True)

    def snapshot(self, key: str) -> dict[str, bytes]:
        """Every object under s3://bucket/key (relative key -> bytes), like conftest.snapshot of a folder."""
        fs, root = self.fs, f"{self.bucket}/{key}"
        return {k[len(root) + 1 :]: fs.cat_file(k) for k in sorted(fs.find(root))}

    def keys(self, key: str) -> list[str]:
        root = f"{self.bucket}/{key}"
        return [k[len(root) + 1 :] for k in sorted(self.fs.find(root))]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free port of 127.0.0.1 for the session, with credentials in the environment."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed (the dev extra)")
    pytest.importorskip("s3fs", reason="s3fs is not installed (the cloud extra)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDENTIALS.items():
            mp.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(key, raising=False)
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3(s3_endpoint) -> S3World:
    """A fresh, empty bucket on the session's S3 server."""
    import boto3

    bucket = f"mtkd-{os.getpid()}-{next(_buckets)}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return S3World(s3_endpoint, bucket)


@contextlib.contextmanager
def checking_credentials_server():
    """moto's S3 server in a process of its own that checks every request's credentials
    (INITIAL_NO_AUTH_ACTION_COUNT=0: an access key it does not know is refused, 403); yields its endpoint."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()
