"""The small JSON document stored next to each off-site snapshot: what the
object is (cluster, file, sha256, size), what etcd's data in it is
(etcdutl-style status), who it is encrypted to, and where it came from. A
fetch checks the object against it; a restore trusts nothing else."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_SUFFIX = ".manifest.json"
VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A manifest that cannot be trusted; one line saying why."""


@dataclass(frozen=True)
class Manifest:
    cluster: str
    file_name: str
    sha256: str                 # of the object as stored (the ciphertext when encrypted)
    size: int                   # bytes of the object as stored
    hash: str                   # etcdutl's hash (CRC-32C, %x) of the database
    revision: int
    total_keys: int
    total_size: int
    member: str                 # the member the snapshot was streamed from
    created_at: float           # unix seconds
    encrypted: bool = False
    recipients: tuple[str, ...] = field(default=())  # sha256 fingerprints of the age recipients (never keys)
    version: int = VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["recipients"] = list(self.recipients)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"the manifest is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise ManifestError("the manifest is not a JSON object")
        types: dict[str, Any] = {"cluster": str, "file_name": str, "sha256": str, "size": int, "hash": str,
                                 "revision": int, "total_keys": int, "total_size": int, "member": str,
                                 "created_at": (int, float), "encrypted": bool, "recipients": list, "version": int}
        missing = [k for k in types if k not in data and k not in ("encrypted", "recipients", "version")]
        if missing:
            raise ManifestError(f"the manifest has no {missing[0]}")
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise ManifestError(f"the manifest has an unknown key {unknown[0]!r}")
        for key, typ in types.items():
            if key in data and (not isinstance(data[key], typ) or (typ is int and isinstance(data[key], bool))):
                raise ManifestError(f"the manifest's {key} has the wrong type ({type(data[key]).__name__})")
        if data.get("version", VERSION) > VERSION:
            raise ManifestError(f"the manifest is version {data['version']}; this bot reads up to {VERSION}")
        manifest = cls(**{**data, "created_at": float(data["created_at"]),
                          "recipients": tuple(str(r) for r in data.get("recipients", ()))})
        manifest.validate()
        return manifest

    def validate(self) -> None:
        if not _SHA256.fullmatch(self.sha256):
            raise ManifestError("the manifest's sha256 is not 64 lowercase hex digits")
        if min(self.size, self.revision, self.total_keys, self.total_size) < 0:
            raise ManifestError("the manifest holds a negative size, revision or key count")
        if "/" in self.file_name or not self.file_name:
            raise ManifestError(f"the manifest's file name {self.file_name!r} is not a file name")
        if self.encrypted != bool(self.recipients):
            raise ManifestError("the manifest's encryption flag and recipients disagree")


def recipient_fingerprint(recipient: str) -> str:
    """A short, stable name of an age public key: sha256 of it, 16 hex digits."""
    import hashlib
    return "sha256:" + hashlib.sha256(recipient.encode()).hexdigest()[:16]
