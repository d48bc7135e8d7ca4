"""A real S3-protocol server on loopback for the off-site tests and benches:
moto's standalone server (`ThreadedMotoServer`) on a free port, with one
bucket and throw-away credentials.

The credentials are random each run and go only where the bot reads them (its
environment, or a RemoteStore's options); `ISSUED` lets the suite-wide secret
check prove none reached a log, a message or an audit row.
"""
from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from bot.testing.cluster import free_port

ISSUED: list[str] = []   # every fake S3 credential handed out in this process
REGION = "us-east-1"
# moto keeps an object's bytes in memory up to this size and spills the rest to a temporary file; its default
# (5 MiB - 1 KiB) spilled every 5 MiB part of a multipart upload to disk: a fifth of the server's samples in a
# profiled suite run.
KEY_BUFFER = 64 << 20


@dataclass
class MotoS3:
    """`start()`, use `endpoint`/`env`/`url(prefix)`, `stop()`; `stop()` then `start()` again is
    "the server was down" (moto keeps its buckets in-process, and the port is kept)."""

    bucket: str = field(default_factory=lambda: f"etcd-backups-{secrets.token_hex(4)}")  # moto's state is per process
    port: int = field(default_factory=free_port)
    # (repr=False: a failing test prints its fixtures, and the credentials never appear in test output)
    access_key: str = field(default_factory=lambda: "AKIA" + secrets.token_hex(8).upper(), repr=False)
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30), repr=False)
    _server: Any = None

    def __post_init__(self) -> None:
        ISSUED.extend([self.access_key, self.secret_key])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What the bot's environment needs (the AWS SDKs' variables)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    @property
    def options(self) -> dict[str, str]:
        """The same credentials as obstore options (for a RemoteStore built without the environment)."""
        return {"access_key_id": self.access_key, "secret_access_key": self.secret_key}

    def url(self, prefix: str = "prod") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def store_table(self, prefix: str = "prod", **extra: Any) -> dict[str, Any]:
        """A `[snapshots.store]` table for this server."""
        return {"url": self.url(prefix), "endpoint": self.endpoint, "region": REGION, **extra}

    def start(self) -> MotoS3:
        from moto.server import ThreadedMotoServer
        os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(KEY_BUFFER))  # read by moto at each object
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        client = self.client()
        if self.bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self) -> Any:
        """A boto3 client of this server (what the tests inspect the bucket with)."""
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def keys(self, prefix: str = "") -> dict[str, int]:
        """Visible objects: key -> size."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def unfinished_uploads(self, prefix: str = "") -> list[str]:
        """Keys of multipart uploads started and neither completed nor aborted."""
        page = self.client().list_multipart_uploads(Bucket=self.bucket, Prefix=prefix)
        return [u["Key"] for u in page.get("Uploads", [])]

    def read(self, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
