"""etcd's values and errors as plain data: members, statuses, alarms and the
exceptions every layer catches. Pure: no gRPC, so the planner, the quorum
math and the tests load without it."""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- errors

class EtcdError(Exception):
    """An etcd call failed; `message` is etcd's (or the transport's) own words."""

    def __init__(self, message: str, endpoint: str | None = None):
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint

    def __str__(self) -> str:
        return f"{self.endpoint}: {self.message}" if self.endpoint else self.message


class EtcdUnavailable(EtcdError):
    """Nothing answered: the member is down, refused the connection, or TLS failed."""


class EtcdTimeout(EtcdUnavailable):
    """No answer within the deadline (a black-holed host, an overloaded member)."""


class EtcdTLSError(EtcdUnavailable):
    """The TLS handshake failed: missing or wrong client certificate, or untrusted server."""


class EtcdUnusableURL(EtcdError):
    """A URL etcd published that the bot cannot dial (etcd stores what `member add` was given): nothing was sent,
    so it says nothing about whether the member is up."""


class EtcdAuthError(EtcdError):
    """etcd refused our credentials or permissions."""


class EtcdRequestError(EtcdError):
    """etcd understood the request and refused it (its message says why)."""


class MemberNotFound(EtcdRequestError):
    pass


class PeerURLExists(EtcdRequestError):
    pass


class LearnerNotReady(EtcdRequestError):
    """A learner that has not caught up with the leader cannot be promoted yet."""


class UnhealthyCluster(EtcdRequestError):
    pass


class TooManyLearners(EtcdRequestError):
    pass


class NotALearner(EtcdRequestError):
    pass


class LearnerUnsupported(EtcdRequestError):
    """A learner answers only Status and serializable reads: with auth on, not even Authenticate."""


_REQUEST_ERRORS: tuple[tuple[str, type[EtcdRequestError]], ...] = (
    ("member not found", MemberNotFound),
    ("peer urls already exists", PeerURLExists),
    ("can only promote a learner member which is in sync", LearnerNotReady),
    ("learner member which is in sync", LearnerNotReady),
    ("can only promote a learner member", NotALearner),
    ("unhealthy cluster", UnhealthyCluster),
    ("not enough started members", UnhealthyCluster),
    ("too many learner members", TooManyLearners),
    ("rpc not supported for learner", LearnerUnsupported),
)


AUTH_MESSAGES = ("authentication failed", "permission denied", "invalid auth token", "user name is empty",
                  "user name not found", "auth token is expired")


def request_error(details: str, endpoint: str) -> EtcdError:
    low = details.lower()
    if any(m in low for m in AUTH_MESSAGES):
        return EtcdAuthError(details, endpoint)
    for needle, cls in _REQUEST_ERRORS:
        if needle in low:
            return cls(details, endpoint)
    return EtcdRequestError(details, endpoint)


# ---------------------------------------------------------------- values

@dataclass(frozen=True)
class Member:
    """A cluster member as `etcdctl member list` shows it."""

    id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool = False

    @property
    def hex_id(self) -> str:
        return f"{self.id:016x}"

    @property
    def started(self) -> bool:
        """etcd publishes the name once the member process has started."""
        return bool(self.name)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.hex_id, "name": self.name, "peer_urls": list(self.peer_urls),
                "client_urls": list(self.client_urls), "is_learner": self.is_learner}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Member:
        return cls(int(data["id"], 16), data["name"], tuple(data["peer_urls"]), tuple(data["client_urls"]),
                   bool(data["is_learner"]))


@dataclass(frozen=True)
class Alarm:
    member_id: int
    kind: str  # "NOSPACE" | "CORRUPT"


@dataclass(frozen=True)
class MemberStatus:
    """One member's answer to Maintenance.Status.

    etcd reports the cluster's alarms inside `errors`; they are split out
    into `alarms`, because asking the Alarm RPC goes through raft and hangs
    exactly when the cluster is in trouble.
    """

    endpoint: str
    member_id: int
    version: str
    db_size: int
    db_size_in_use: int
    leader: int
    raft_term: int
    raft_index: int
    raft_applied_index: int
    is_learner: bool
    errors: tuple[str, ...]
    alarms: tuple[Alarm, ...] = ()
    cluster_id: int = 0      # from the response header: a restore with a new token gives a new one


@dataclass(frozen=True)
class KVHash:
    """One member's Maintenance.HashKV answer: the hash of its key space up to the
    requested revision, from `compact_revision` on; `revision` is the member's current one."""

    endpoint: str
    member_id: int
    hash: int
    compact_revision: int
    revision: int


_ALARM = re.compile(r"^memberID:(\d+) alarm:([A-Z]+)\s*$")


def split_alarms(errors: Iterable[str]) -> tuple[tuple[str, ...], tuple[Alarm, ...]]:
    """Separate etcd's `memberID:<id> alarm:<KIND>` strings from real errors."""
    plain, alarms = [], []
    for e in errors:
        m = _ALARM.match(e)
        if m:
            alarms.append(Alarm(int(m.group(1)), m.group(2)))
        else:
            plain.append(e)
    return tuple(plain), tuple(alarms)


@dataclass(frozen=True)
class TLSFiles:
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None


