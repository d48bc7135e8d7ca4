"""`[snapshots.store]`: where snapshots go off-site, and the checks of its URLs (pure: obstore is loaded
only by bot.backup, which uses this configuration)."""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

SCHEMES = {"s3": "S3 (or an S3-compatible service)", "gs": "Google Cloud Storage", "az": "Azure Blob Storage",
           "file": "a mounted directory"}


@dataclass(frozen=True)
class StoreConfig:
    """`[snapshots.store]`: where snapshots go off-site (credentials: the environment, never here)."""

    url: str                          # s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///dir
    endpoint: str | None = None       # an S3-compatible service; http:// allows plain HTTP to it
    region: str | None = None
    keep_local: int | None = None     # local copies kept once a newer one is verified off-site; None: local retention
    # signs the manifests the bot writes and checks those it reads (manifest_key, else the audit key);
    # None: nothing in the store can be told from an object someone else put there
    manifest_key: str | None = field(default=None, repr=False)

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme


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
