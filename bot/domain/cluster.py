"""A cluster as etcd reports it, as plain data: members (and the membership the bot last recorded), their
Status, alarms, KVHash, the health of each member and of the cluster (quorum math), a member's /metrics
figures and a HashKV comparison."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


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
class MembershipRecord:
    """The members of a cluster the bot last recorded (a row of the memberships table), and the last time it
    saw exactly them: where a restarted bot looks for members when the configured endpoints are gone."""

    members: tuple[Member, ...]
    seen_at: float

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> MembershipRecord:
        return cls(tuple(Member.from_json(m) for m in json.loads(row["members"])), row["recorded_at"])


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
    # etcd 3.6 and later (none of them before): the data's storage version, the quota the member enforces,
    # and a downgrade in progress (`etcdctl downgrade enable`) with its target
    storage_version: str = ""
    db_size_quota: int = 0
    downgrade_target: str | None = None


@dataclass(frozen=True)
class KVHash:
    """One member's Maintenance.HashKV answer: the hash of its key space up to the
    requested revision, from `compact_revision` on; `revision` is the member's current one."""

    endpoint: str
    member_id: int
    hash: int
    compact_revision: int
    revision: int
    hash_revision: int = 0   # the revision the hash covers (etcd 3.6 says so; 0 from earlier releases)


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


NO_LEADER = "etcdserver: no leader"
# gRPC's health check: a member defragmenting with StopGRPCServiceOnDefrag says NOT_SERVING, else SERVING
SERVING, NOT_SERVING = "SERVING", "NOT_SERVING"


@dataclass(frozen=True)
class Quorum:
    """Raft arithmetic over the voting members (learners do not vote)."""

    voting: int
    healthy: int
    unknown: int = 0  # voters that answered but not with their Status (they refused the bot, or defragment)

    @property
    def needed(self) -> int:
        return self.voting // 2 + 1

    @property
    def ok(self) -> bool:
        return self.healthy >= self.needed

    @property
    def tolerates(self) -> int:
        """How many more voting members may fail before quorum is lost."""
        return max(0, self.healthy - self.needed)

    @property
    def known(self) -> bool:
        """Whether the bot can tell quorum holds or is lost (the voters that refused it could tip it)."""
        return self.ok or self.healthy + self.unknown < self.needed


def membership_fingerprint(members: list[Member] | tuple[Member, ...]) -> str:
    """A short digest of who is in the cluster; a plan is only valid for the
    membership it was built on."""
    parts = sorted(f"{m.hex_id}|{m.name}|{','.join(sorted(m.peer_urls))}|{int(m.is_learner)}" for m in members)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def member_labels(members: Iterable[tuple[str, str]]) -> dict[str, str]:
    """(hex ID, name) pairs -> how a message names each member: by its name; with the ID too where two
    members share the name; by its ID alone while it has none (it never started)."""
    names = dict(members)   # a member listed twice is one member
    count = Counter(name for name in names.values() if name)
    return {hex_id: (name if count[name] == 1 else f"{name} ({hex_id})") if name else hex_id
            for hex_id, name in names.items()}


@dataclass(frozen=True)
class MemberHealth:
    member: Member
    status: MemberStatus | None = None
    error: str | None = None           # why it could not be asked, when it could not
    alarms: tuple[str, ...] = ()
    refused: bool = False              # it answered, refusing the bot's credentials: it runs, its health is unknown
    defragmenting: bool = False        # it answers gRPC health checks NOT_SERVING while Status waits: a defrag runs
    cut_off: bool = False              # it reports no leader while a quorum of voters follows one (see judge_leaders)

    @property
    def reachable(self) -> bool:
        return self.status is not None

    @property
    def errors(self) -> tuple[str, ...]:
        """etcd's own errors for this member, less the transient "no leader"."""
        return tuple(e for e in self.status.errors if e != NO_LEADER) if self.status else ()

    @property
    def healthy(self) -> bool:
        """Answers, reports no error, and is not cut off from a leader the others follow. A voter without
        a leader while no quorum follows one still counts toward quorum: during an election every member
        says "no leader"."""
        return self.status is not None and not self.errors and not self.cut_off

    @property
    def problem(self) -> str | None:
        """One phrase on what is wrong with this member, or None."""
        if self.status is None:
            return self.error or "unreachable"
        if self.errors:
            return "; ".join(self.errors)
        if self.cut_off:
            return "no leader, while a quorum of the voters follows one: cut off from its peers"
        return None


def judge_leaders(members: Iterable[MemberHealth]) -> tuple[MemberHealth, ...]:
    """Mark the members cut off from their leader: those answering with leader 0 while a quorum of the
    voters reports one and the same leader. A member cut from its peers still answers clients, and its
    own Status says only that it has no leader; during an election, or without quorum, nobody follows
    a leader and no member is marked."""
    members = tuple(members)
    voters = [h for h in members if not h.member.is_learner]
    followed = Counter(h.status.leader for h in voters if h.status is not None and h.status.leader)
    if not followed or followed.most_common(1)[0][1] < len(voters) // 2 + 1:
        return members
    return tuple(replace(h, cut_off=True) if h.status is not None and not h.status.leader else h for h in members)


@dataclass(frozen=True)
class ClusterHealth:
    cluster: str
    members: tuple[MemberHealth, ...]
    alarms: tuple[Alarm, ...]
    checked_at: float                  # time.time() of the check
    elapsed: float                     # seconds the check took
    deadline: float                    # the per-member deadline used
    learned_url: str | None = None     # reached only through this URL learned from a member list, not configured

    @property
    def quorum(self) -> Quorum:
        voters = [m for m in self.members if not m.member.is_learner]
        return Quorum(voting=len(voters), healthy=sum(1 for m in voters if m.healthy),
                      unknown=sum(1 for m in voters if m.refused or m.defragmenting))

    @property
    def leader_id(self) -> int | None:
        """The leader the highest-term answers agree on."""
        answers = [m.status for m in self.members if m.status and m.status.leader]
        if not answers:
            return None
        top = max(s.raft_term for s in answers)
        votes: dict[int, int] = {}
        for s in answers:
            if s.raft_term == top:
                votes[s.leader] = votes.get(s.leader, 0) + 1
        return max(votes, key=votes.__getitem__)

    @property
    def fingerprint(self) -> str:
        return membership_fingerprint([m.member for m in self.members])

    @property
    def unhealthy(self) -> list[MemberHealth]:
        return [m for m in self.members if not m.healthy]

    @property
    def all_healthy(self) -> bool:
        return all(m.healthy for m in self.members) and not self.alarms and self.leader_id is not None

    def snapshot_source(self) -> MemberHealth | None:
        """A healthy member to snapshot, preferring a follower to spare the leader."""
        healthy = [h for h in self.members if h.healthy and h.member.client_urls]
        followers = [h for h in healthy if h.member.id != self.leader_id and not h.member.is_learner]
        return next(iter(followers or healthy), None)

    def linearizable_through(self, m: MemberHealth) -> bool:
        """Whether a linearizable read through `m` can answer now: a voter that names a leader this check
        found healthy, in a cluster with a quorum. Otherwise it would fail ("leader changed") or wait out its
        deadline (until the survivors elect another, they still name the dead leader; after a quorum loss
        they never do), or be refused (a learner)."""
        if m.status is None or m.status.is_learner or m.member.is_learner or not self.quorum.ok:
            return False
        return any(h.member.id == m.status.leader and h.healthy for h in self.members)

    def find(self, ref: str) -> MemberHealth | None:
        """A member by name or hex ID (as `member list` prints it)."""
        ref = ref.strip().lower()
        for m in self.members:
            if m.member.name.lower() == ref and m.member.name:
                return m
        try:
            wanted = int(ref, 16)
        except ValueError:
            return None
        return next((m for m in self.members if m.member.id == wanted), None)


@dataclass(frozen=True)
class MemberHash:
    name: str
    member_id: int
    hash: KVHash | None
    error: str | None = None


@dataclass(frozen=True)
class Consistency:
    """The hashes at `revision`, and the verdict on them (decided here, printed elsewhere)."""

    cluster: str
    revision: int
    members: tuple[MemberHash, ...]

    @property
    def compared(self) -> list[MemberHash]:
        """The members hashed from the most common compaction point (others cannot be compared)."""
        answered = [m for m in self.members if m.hash is not None]
        if not answered:
            return []
        point = Counter(m.hash.compact_revision for m in answered if m.hash).most_common(1)[0][0]
        return [m for m in answered if m.hash is not None and m.hash.compact_revision == point]

    @property
    def majority_hash(self) -> int | None:
        counts = Counter(m.hash.hash for m in self.compared if m.hash)
        return counts.most_common(1)[0][0] if counts else None

    @property
    def differing(self) -> list[MemberHash]:
        return [m for m in self.compared if m.hash is not None and m.hash.hash != self.majority_hash]

    @property
    def unchecked(self) -> list[MemberHash]:
        compared = {m.member_id for m in self.compared}
        return [m for m in self.members if m.member_id not in compared]

    @property
    def agree(self) -> bool:
        return not self.differing and not self.unchecked and bool(self.compared)


DEFAULT_QUOTA = 2 * 1024 ** 3  # etcd's --quota-backend-bytes when unset (0 means this default)


def backend_quota(status: MemberStatus | None, found: MemberMetrics | str | None) -> tuple[int | None, str | None]:
    """The backend quota a member enforces, and why it had to be assumed when it was. etcd 3.6 says it in
    Status (dbSizeQuota); earlier releases only in /metrics (`found`: its figures, or why they could not be
    read), where 0 means etcd's default. (None, None) when neither says anything."""
    if status is not None and status.db_size_quota > 0:
        return status.db_size_quota, None
    if found is None:
        return None, None
    if isinstance(found, str):
        return DEFAULT_QUOTA, found
    if found.quota_bytes is None:
        return DEFAULT_QUOTA, "etcd_server_quota_backend_bytes missing from /metrics"
    return found.quota_bytes or DEFAULT_QUOTA, None


WAL_FSYNC_P99_OK = 0.010       # etcd's tuning guide: seconds


BACKEND_COMMIT_P99_OK = 0.025


Buckets = tuple[tuple[float, float], ...]   # a histogram's cumulative (upper bound, count), in order


@dataclass(frozen=True)
class MemberMetrics:
    """The figures of one member's /metrics; None where the member does not export one."""

    quota_bytes: int | None
    wal_fsync_p99: float | None          # seconds, since the member started; None without observations
    backend_commit_p99: float | None
    leader_changes: int | None
    slow_applies: int | None
    proposals_pending: int | None
    proposals_failed: int | None
    # etcd 3.6's feature gate StopGRPCServiceOnDefrag (etcd_server_feature_enabled): while it defragments, the member
    # tells gRPC health checks NOT_SERVING, so clients that check move to the others. None: no such metric (3.5).
    stops_serving_on_defrag: bool | None = None
    # The raw series the watch takes rates and percentiles of, between two readings (bot/watch/readings.py).
    # A histogram is its cumulative buckets, (upper bound, count) in order; a series the member does not
    # export (a counter before its first event, gRPC latency without --metrics=extensive) is absent.
    peer_send_failures: Mapping[str, float] = field(default_factory=dict)    # by peer (To)
    peer_rtt: Mapping[str, Buckets] = field(default_factory=dict)            # by peer (To)
    grpc_requests: Mapping[str, float] = field(default_factory=dict)         # unary and streams, by method
    grpc_failures: Mapping[str, float] = field(default_factory=dict)         # the mixin's failure codes, by method
    grpc_latency: Mapping[str, Buckets] = field(default_factory=dict)        # unary but Defragment, by method
    wal_fsync: Buckets = ()
    backend_commit: Buckets = ()
