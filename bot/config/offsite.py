"""`[snapshots.store]`: where snapshots go off-site, and the checks of its URLs (pure: obstore is loaded
only by bot.backup, which uses this configuration)."""
from __future__ import annotations

import re
from dataclasses import field
from pathlib import Path
from typing import Annotated, Self
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from bot.config.table import Check, Problem, Table, bounds, hmac_key, path, table

SCHEMES = {"s3": "S3 (or an S3-compatible service)", "gs": "Google Cloud Storage", "az": "Azure Blob Storage",
           "file": "a mounted directory"}
CREDENTIAL = re.compile(r"(?i)key|secret|token|password|credential")


def check_store_url(url: str) -> str:
    """The URL, normalised (no trailing slash); ValueError with one line otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{url!r}: the scheme must be one of " + ", ".join(f"{s}://" for s in SCHEMES))
    if parts.query or parts.fragment:
        raise ValueError(f"{parts.scheme}:// URL: no query or fragment (credentials come from the environment)")
    if "@" in parts.netloc or parts.password is not None:
        raise ValueError(f"{parts.scheme}:// URL: no user or password in it (credentials come from the environment)")
    if parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError(f"{url!r}: a file URL names an absolute path, like file:///mnt/backups")
    elif not parts.netloc:
        raise ValueError(f"{url!r}: no bucket or container (like {parts.scheme}://etcd-backups/prod)")
    if any(seg in (".", "..") for seg in parts.path.split("/")):
        raise ValueError(f"{url!r}: no . or .. in the path")
    return url.rstrip("/") if parts.path.strip("/") or parts.scheme != "file" else url


def check_endpoint(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{endpoint!r} is not an http:// or https:// URL")
    if parts.username or parts.password or parts.query:
        raise ValueError(f"{endpoint!r}: no user, password or query in it (credentials come from the environment)")
    return endpoint.rstrip("/")


@table
class StoreConfig(Table):
    """Where snapshots are uploaded while they are saved. Credentials come from the environment (AWS_*,
    GOOGLE_APPLICATION_CREDENTIALS, AZURE_*) or workload identity, never from this file."""

    url: Annotated[str, Check(check_store_url)] = Field(examples=["s3://etcd-backups/prod", "file:///mnt/backups"])
    """s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or file:///absolute/dir."""
    endpoint: Annotated[str, Check(check_endpoint)] | None = None
    """An S3-compatible service (MinIO, Ceph...); http:// allows plain HTTP to it. s3:// only."""
    region: str | None = None
    """The S3 region (default: from the environment)."""
    keep_local: Annotated[int, bounds(ge=0, says="must be 0 or more")] | None = None
    """Of the snapshots verified off-site, only the newest N keep their local file (default: local retention)."""
    manifest_key_env: str | None = None
    """The environment variable holding the key (32+ characters) that signs and checks the manifests."""
    manifest_key_file: Annotated[Path, path(existing=True)] | None = None
    """Or the file holding it. Without either, the audit key does both."""
    # signs the manifests the bot writes and checks those it reads (manifest_key, else the audit key);
    # None: nothing in the store can be told from an object someone else put there
    manifest_key: Annotated[str | None, hmac_key("the manifest key")] = field(default=None, repr=False)

    @classmethod
    def unknown(cls, key: str) -> str:
        if key == "manifest_key":
            return "never inline; give manifest_key_env or manifest_key_file"
        if CREDENTIAL.search(key):
            return ("credentials never go in the file; the bot reads them from the environment "
                    "(AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_*) or workload identity")
        return super().unknown(key)

    @model_validator(mode="after")
    def _endpoint_for_s3(self) -> Self:
        if self.endpoint is not None and not self.url.startswith("s3://"):
            raise Problem("only an s3:// store takes an endpoint", "endpoint")
        return self

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme
