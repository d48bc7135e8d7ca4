"""The small JSON document stored next to each off-site snapshot: what the
object is (cluster, file, sha256, size), what etcd's data in it is
(etcdutl-style status), who it is encrypted to, and where it came from. A
fetch checks the object against it.

Anyone who can write to the bucket can write a manifest, so the bot signs
its own: an HMAC-SHA256 over the manifest's content (canonical JSON) with
the manifest key, checked on every read (`authenticate`). A manifest that
fails the check describes an object the bot cannot call its own: *foreign*.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from hmac import compare_digest
from hmac import new as new_hmac
from typing import Any

MANIFEST_SUFFIX = ".manifest.json"
VERSION = 2                  # 2: signed (hmac, key_id); 1: unsigned, written before manifests were signed
CLOCK_SKEW = 300.0           # seconds a manifest may be dated ahead of the bot's clock (Slack's own window)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_UNSIGNED = ("hmac", "key_id")   # the fields the HMAC does not cover (they are the HMAC)


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
    hmac: str = ""              # HMAC-SHA256 of `content()` with the manifest key, hex; "" unsigned
    key_id: str = ""            # which key signed it (key_id()), to tell "another key" from "changed"

    def to_json(self) -> str:
        data = asdict(self)
        data["recipients"] = list(self.recipients)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def content(self) -> bytes:
        """What the HMAC covers: every other field, as canonical JSON (sorted keys, no spaces), so
        the layout of the stored file (indentation, key order) does not matter, only its values."""
        data = {k: v for k, v in asdict(self).items() if k not in _UNSIGNED}
        data |= {"recipients": list(self.recipients), "created_at": float(self.created_at)}
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def signed(self, key: str) -> Manifest:
        """This manifest as the bot writes it: version 2, with its HMAC under `key`."""
        m = replace(self, version=VERSION)
        return replace(m, hmac=_mac(key, m.content()), key_id=key_id(key))

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
                                 "created_at": (int, float), "encrypted": bool, "recipients": list, "version": int,
                                 "hmac": str, "key_id": str}
        missing = [k for k in types if k not in data and k not in ("encrypted", "recipients", "version", *_UNSIGNED)]
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
        if not math.isfinite(self.created_at) or not 0 <= self.created_at < 1e11:   # (before the year 5138)
            raise ManifestError("the manifest's created_at is not a time")
        if "/" in self.file_name or not self.file_name:
            raise ManifestError(f"the manifest's file name {self.file_name!r} is not a file name")
        if self.encrypted != bool(self.recipients):
            raise ManifestError("the manifest's encryption flag and recipients disagree")
        if (self.hmac or self.key_id) and not (_SHA256.fullmatch(self.hmac) and _KEY_ID.fullmatch(self.key_id)):
            raise ManifestError("the manifest's hmac is not 64 hex digits with a 16-digit key_id")


def key_id(key: str) -> str:
    """A short name of a manifest key, stored in each manifest: reveals nothing of the key."""
    return new_hmac(key.encode(), b"etcd-chatops manifest key id", hashlib.sha256).hexdigest()[:16]


def _mac(key: str, content: bytes) -> str:
    # The prefix keeps these HMACs apart from the audit chain's when the audit key doubles as the manifest key.
    return new_hmac(key.encode(), b"etcd-chatops manifest\n" + content, hashlib.sha256).hexdigest()


def authenticate(m: Manifest, key: str | None, now: float) -> str:
    """Why `m` is not a manifest this bot wrote, in a few words ("" when it is): signed with `key`
    over its content, and not dated beyond CLOCK_SKEW ahead of `now`."""
    if key is None:
        return "no manifest key is configured, so no manifest can be checked"
    if not m.hmac:
        return "its manifest is not signed (written by someone without the key, or by a bot before version 2)"
    if m.key_id != key_id(key):
        return "its manifest is signed with another key"
    if not compare_digest(m.hmac, _mac(key, m.content())):
        return "its manifest does not match its HMAC: changed after it was signed"
    if m.created_at > now + CLOCK_SKEW:
        when = dt.datetime.fromtimestamp(m.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        return f"its manifest is dated in the future ({when})"
    return ""


def recipient_fingerprint(recipient: str) -> str:
    """A short, stable name of an age public key: sha256 of it, 16 hex digits."""
    return "sha256:" + hashlib.sha256(recipient.encode()).hexdigest()[:16]
