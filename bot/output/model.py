"""One model per answer, computed once (as etcdctl's commands build plain
data and hand it to the printer `--write-out` picks, printer.go).

The verdict, the quorum line, each member's state and facts, the list of
members down: all are decided here and nowhere else. The plain-text, table
and JSON printers (text.py) and the Block Kit printer (bot/output/blocks.py)
only lay these values out, so the CLI and Slack never disagree.

May import: the etcd layer's data models only (no gRPC, no Slack).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from bot.domain.cluster import (
    BACKEND_COMMIT_P99_OK,
    WAL_FSYNC_P99_OK,
    Alarm,
    ClusterHealth,
    Member,
    MemberHealth,
    MemberMetrics,
    MemberStatus,
    Quorum,
    backend_quota,
)
from bot.domain.snapshot import CatalogEntry, RemoteState, SnapshotRecord, SnapshotStatus, catalog_entry
from bot.output.tables import status_table
from bot.output.units import humanize_bytes, humanize_duration

if TYPE_CHECKING:  # bot.etcd.snapshot_stream streams over gRPC; only its result type is needed here
    from bot.domain.snapshot import SavedSnapshot


# ---------------------------------------------------------------- status

class Verdict(StrEnum):
    """The words an SRE reads first."""

    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"
    NO_LEADER = "NO LEADER"
    QUORUM_LOST = "QUORUM LOST"
    UNKNOWN = "UNKNOWN"        # members that refused the bot's credentials could make or break the quorum


def verdict(health: ClusterHealth) -> Verdict:
    q = health.quorum
    if not q.known:
        return Verdict.UNKNOWN
    if not q.ok:
        return Verdict.QUORUM_LOST
    if health.leader_id is None:
        return Verdict.NO_LEADER
    if health.unhealthy or health.alarms:
        return Verdict.DEGRADED
    return Verdict.HEALTHY


def quorum_line(health: ClusterHealth) -> str:
    q = health.quorum
    tail = (f"tolerates {q.tolerates} more failure{'s' if q.tolerates != 1 else ''}" if q.ok
            else "the cluster cannot accept writes" if q.known
            else f"{q.unknown} answer without their Status (refusing the bot, or defragmenting), so whether quorum "
                 "holds is unknown")
    return f"{q.healthy} of {q.voting} voting members healthy, quorum needs {q.needed}, {tail}"


LEADERLESS = ("no leader", "learner, no leader")


def member_state(h: MemberHealth, health: ClusterHealth) -> str:
    """DOWN, REFUSED (it answers, refusing the bot's credentials), DEFRAGMENTING, UNHEALTHY, leader, follower, learner;
    without quorum or a leader there is no follower: a survivor then says "no leader" (one of LEADERLESS)."""
    if h.refused:
        return "REFUSED"
    if h.defragmenting:
        return "DEFRAGMENTING"
    if not h.reachable:
        return "DOWN"
    if h.problem:
        return "UNHEALTHY"
    leader = health.leader_id if health.quorum.ok else None
    if leader is None:
        return LEADERLESS[h.member.is_learner]
    return "leader" if h.member.id == leader else ("learner" if h.member.is_learner else "follower")


def learned_line(health: ClusterHealth) -> str | None:
    """Said when no configured endpoint answered and a learned client URL did."""
    if health.learned_url is None:
        return None
    return (f"reached only through {health.learned_url}, a client URL learned from the member list: no configured "
            f"endpoint answered; update this cluster's endpoints in the bot's configuration")


@dataclass(frozen=True)
class MemberView:
    """One member as every printer shows it."""

    member: Member
    status: MemberStatus | None
    state: str                     # member_state(): leader, follower, learner, no leader, DOWN, REFUSED,
    #                                DEFRAGMENTING or UNHEALTHY
    problem: str | None            # why it is DOWN, REFUSED, DEFRAGMENTING or UNHEALTHY, in etcd's words
    is_leader: bool
    healthy: bool
    error: str | None
    alarms: tuple[str, ...]
    quota_bytes: int | None = None       # from the member's /metrics, or etcd's default when quota_error says why
    quota_error: str | None = None       # why /metrics could not be read (the default quota is assumed)

    @property
    def quota_usage(self) -> float | None:
        """DB size over the quota (etcd compares the whole file, free pages included)."""
        if self.status is None or not self.quota_bytes:
            return None
        return self.status.db_size / self.quota_bytes

    @property
    def quota_share(self) -> str | None:
        """`1 % of 2.1 GB`: how full the member is against its quota."""
        usage = self.quota_usage
        if usage is None or self.quota_bytes is None:
            return None
        return f"{usage * 100:.0f} % of {humanize_bytes(self.quota_bytes)}"

    @property
    def db_line(self) -> str | None:
        """The member's database in one phrase, each figure once: `DB 2.1 GB (1.0 GB in use, 100 % of 2.1 GB
        quota)`, and when the quota was assumed, why."""
        s = self.status
        if s is None:
            return None
        share = f", {self.quota_share} quota" if self.quota_share else ""
        assumed = f"; quota unknown ({self.quota_error}), etcd's default assumed" if share and self.quota_error else ""
        return f"DB {humanize_bytes(s.db_size)} ({humanize_bytes(s.db_size_in_use)} in use{share}){assumed}"

    @property
    def reachable(self) -> bool:
        return self.status is not None

    @property
    def label(self) -> str:
        """The name, or the hex ID of a member that never started."""
        return self.member.name or self.member.hex_id

    @property
    def facts(self) -> list[str]:
        """Version, sizes and raft position, then what is special about the member."""
        s, m = self.status, self.member
        facts = [f"v{s.version}", self.db_line or "", f"raft index {s.raft_index}", f"term {s.raft_term}"] if s else []
        if s and s.storage_version:
            facts.insert(1, f"storage v{s.storage_version}")
        if s and s.downgrade_target:
            facts.insert(0, f"DOWNGRADE to v{s.downgrade_target} enabled")
        return facts + (["learner"] if m.is_learner else []) + ([] if m.started else ["unstarted"])


@dataclass(frozen=True)
class StatusView:
    """`status` and `members`: one cluster check, decided once."""

    cluster: str
    verdict: Verdict
    quorum: Quorum
    quorum_line: str
    leader_id: int | None
    members: tuple[MemberView, ...]
    alarms: tuple[Alarm, ...]
    elapsed: float
    deadline: float
    all_healthy: bool
    learned_url: str | None        # reached only through a client URL learned from a member list
    learned: str | None            # learned_line(): the note that says so
    advice: tuple[str, ...] = ()   # advice_lines(): the alarms' and the quota's next command


    @property
    def down(self) -> list[str]:
        return [m.label for m in self.members if m.state == "DOWN"]

    @property
    def checked(self) -> str:
        return f"checked in {humanize_duration(self.elapsed)}, deadline {self.deadline:g}s per member"


QUOTA_WARN = 0.8  # status suggests a defragmentation above this share of the quota


def _quota(h: MemberHealth, metrics: Mapping[int, MemberMetrics | str] | None) -> tuple[int | None, str | None]:
    return backend_quota(h.status, metrics.get(h.member.id) if metrics is not None and h.status is not None else None)


def advice_lines(cluster: str, alarms: tuple[Alarm, ...], members: tuple[MemberView, ...]) -> tuple[str, ...]:
    """The next command for each active alarm, and for a member close to its quota."""
    kinds = {a.kind for a in alarms}
    lines = []
    if "NOSPACE" in kinds:
        lines.append(f"NOSPACE: the database reached its quota and etcd refuses writes; run /etcd defrag {cluster} "
                     "(compact, defragment every member, disarm)")
    if "CORRUPT" in kinds:
        lines.append(f"CORRUPT: a member's data differs from the others'; run /etcd consistency {cluster} to name it, "
                     "then stop etcd on it and replace it")
    full = [f"{m.label} {m.quota_usage * 100:.0f} %" for m in members
            if m.quota_usage is not None and m.quota_usage > QUOTA_WARN]
    if full and "NOSPACE" not in kinds:
        lines.append(f"quota use above {QUOTA_WARN * 100:.0f} % ({', '.join(full)}); run /etcd defrag {cluster} "
                     "before etcd raises NOSPACE")
    return tuple(lines)


def status_view(health: ClusterHealth, metrics: Mapping[int, MemberMetrics | str] | None = None) -> StatusView:
    """`metrics` (cluster_metrics(), by member ID) adds each member's quota and the advice on it."""
    leader = health.leader_id
    members = tuple(MemberView(member=h.member, status=h.status, state=member_state(h, health), problem=h.problem,
                               is_leader=h.member.id == leader, healthy=h.healthy, error=h.error, alarms=h.alarms,
                               quota_bytes=_quota(h, metrics)[0], quota_error=_quota(h, metrics)[1])
                    for h in health.members)
    return StatusView(cluster=health.cluster, verdict=verdict(health), quorum=health.quorum,
                      quorum_line=quorum_line(health), leader_id=leader, members=members, alarms=health.alarms,
                      elapsed=health.elapsed, deadline=health.deadline, all_healthy=health.all_healthy,
                      learned_url=health.learned_url, learned=learned_line(health),
                      advice=advice_lines(health.cluster, health.alarms, members))


# ---------------------------------------------------------------- snapshots

@dataclass(frozen=True)
class SnapshotView:
    """A saved, verified snapshot: what the channel and the terminal are told."""

    cluster: str
    path: Path
    encrypted: bool
    file_size: int
    sha256: str
    member: str
    endpoint: str
    duration: float
    throughput: float              # bytes per second over the whole save
    status: SnapshotStatus
    failed_over_from: str | None
    pruned: tuple[str, ...]
    remote_url: str | None = None       # the off-site copy (no credentials)
    remote_verified: bool = False       # read back there: size and sha256 equal
    upload_error: str | None = None     # why the off-site copy failed

    @property
    def offsite(self) -> str | None:
        """"stored at s3://…/prod-…db · verified remotely", or why the upload failed; None without a store."""
        if self.remote_verified and self.remote_url:
            return f"stored at {self.remote_url} · verified remotely"
        if self.upload_error:
            return f"off-site upload FAILED: {self.upload_error}; the local snapshot is kept"
        return None

    @property
    def file_name(self) -> str:
        return self.path.name

    @property
    def size(self) -> str:
        return humanize_bytes(self.file_size)

    @property
    def took(self) -> str:
        """Duration and speed: "1.2 s (3.4 MiB/s)"."""
        return f"{humanize_duration(self.duration)} ({self.throughput / (1 << 20):.1f} MiB/s)"

    @property
    def table(self) -> str:
        """etcdutl's status table, byte for byte."""
        return status_table(self.status)

    @property
    def summary(self) -> str:
        """etcdutl's four numbers in one line."""
        st = self.status
        return (f"hash {st.hash_hex}, revision {st.revision}, {st.total_keys} keys, "
                f"{humanize_bytes(st.total_size)}")


def snapshot_view(saved: SavedSnapshot) -> SnapshotView:
    return SnapshotView(cluster=saved.cluster, path=saved.path, encrypted=saved.encrypted, file_size=saved.file_size,
                        sha256=saved.sha256, member=saved.member, endpoint=saved.endpoint, duration=saved.duration,
                        throughput=saved.throughput, status=saved.status, failed_over_from=saved.failed_over_from,
                        pruned=saved.pruned, remote_url=saved.remote_url, remote_verified=saved.remote_verified,
                        upload_error=saved.upload_error)


# ---------------------------------------------------------------- perf, alarms, consistency

# etcd's guidance (tuning guide, hardware recommendations): the disk histograms' p99s, and the
# gap between committed and applied entries past which etcd refuses requests ("too many requests").
APPLY_LAG_MAX = 5000
LEADER_CHANGES_MAX = 2     # since the member started: its first election, and one more
PROPOSALS_PENDING_MAX = 5  # a sample: more queued proposals means the leader cannot keep up


@dataclass(frozen=True)
class Figure:
    """One judged figure: what it is, its value as printed, and ok / bad / unknown (None)."""

    name: str
    value: str
    ok: bool | None


@dataclass(frozen=True)
class PerfMember:
    label: str
    figures: tuple[Figure, ...]
    error: str | None
    slowness: float            # the worse disk p99 as a share of its limit (0 when unknown)

    @property
    def bad(self) -> list[Figure]:
        return [f for f in self.figures if f.ok is False]


@dataclass(frozen=True)
class PerfView:
    cluster: str
    members: tuple[PerfMember, ...]

    @property
    def slowest(self) -> PerfMember | None:
        """The member with the slowest disk, when any member's disk figures are known."""
        known = [m for m in self.members if m.slowness > 0]
        return max(known, key=lambda m: m.slowness) if known else None

    @property
    def all_ok(self) -> bool:
        return all(not m.error and not m.bad for m in self.members)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def perf_member(h: MemberHealth, found: MemberMetrics | str | None) -> PerfMember:
    label = h.member.name or h.member.hex_id
    if h.status is None:
        return PerfMember(label, (), h.problem, 0.0)
    if not isinstance(found, MemberMetrics):
        return PerfMember(label, (), found or "no /metrics", 0.0)
    m, s = found, h.status

    def under(value: float | int | None, limit: float) -> bool | None:
        return None if value is None else value <= limit
    lag = s.raft_index - s.raft_applied_index
    figures = (
        Figure(f"WAL fsync p99 (< {WAL_FSYNC_P99_OK * 1000:g} ms)", _ms(m.wal_fsync_p99),
               under(m.wal_fsync_p99, WAL_FSYNC_P99_OK)),
        Figure(f"backend commit p99 (< {BACKEND_COMMIT_P99_OK * 1000:g} ms)", _ms(m.backend_commit_p99),
               under(m.backend_commit_p99, BACKEND_COMMIT_P99_OK)),
        Figure(f"leader changes (<= {LEADER_CHANGES_MAX})", str(m.leader_changes), under(m.leader_changes,
                                                                                         LEADER_CHANGES_MAX)),
        Figure("slow applies (0)", str(m.slow_applies), under(m.slow_applies, 0)),
        Figure(f"proposals pending (<= {PROPOSALS_PENDING_MAX})", str(m.proposals_pending),
               under(m.proposals_pending, PROPOSALS_PENDING_MAX)),
        Figure("proposals failed (0)", str(m.proposals_failed), under(m.proposals_failed, 0)),
        Figure(f"raft index - applied (<= {APPLY_LAG_MAX})", f"{s.raft_index} - {s.raft_applied_index} = {lag}",
               lag <= APPLY_LAG_MAX),
    )
    slowness = max((m.wal_fsync_p99 or 0) / WAL_FSYNC_P99_OK, (m.backend_commit_p99 or 0) / BACKEND_COMMIT_P99_OK)
    return PerfMember(label, figures, None, slowness)


def perf_view(health: ClusterHealth, metrics: Mapping[int, MemberMetrics | str]) -> PerfView:
    return PerfView(health.cluster, tuple(perf_member(h, metrics.get(h.member.id)) for h in health.members))


# ---------------------------------------------------------------- watch alerts

@dataclass(frozen=True)
class AlertView:
    """One watched condition as its message shows it (bot/watch decides; this lays out)."""

    cluster: str
    condition: str                             # its kind: member_down, quorum_lost, ...
    title: str                                 # "member down"
    subject: str                               # what it is about: a member, an alarm, the cluster
    summary: str                               # one line on what is wrong
    figures: tuple[tuple[str, str], ...]       # (name, value) as measured in the last round
    suggestions: tuple[str, ...]               # the next commands, ready to paste
    opened_at: float
    now: float
    resolved_at: float | None = None
    flaps: int = 0                             # times it came back within the flap window
    flapping: bool = False
    held: str = ""                             # why the watch holds it back, unposted (muted, the bot's plan, grace)
    severity: str = ""                         # warning, critical, or "" (a condition without levels)
    sources: tuple[str, ...] = ()              # who sees it: "watch", "alertmanager:<alert name>"
    links: tuple[tuple[str, str], ...] = ()    # (text, http(s) URL): Alertmanager's runbook links
    offers: tuple[str, ...] = ()               # the way out it offers as a button: "replace" (its member), "restore"
    runbook_url: str | None = None             # a runbook for it (a button links there)

    @property
    def resolved(self) -> bool:
        return self.resolved_at is not None

    @property
    def lasted(self) -> float:
        return max(0.0, (self.resolved_at if self.resolved_at is not None else self.now) - self.opened_at)


def short_duration(seconds: float) -> str:
    """"4m 12s", "1h 3m", "12s": how long a condition lasted."""
    s = int(max(0.0, seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (s, "s")]
    shown = [f"{n}{u}" for n, u in parts if n][:2]
    return " ".join(shown) or "0s"
# ---------------------------------------------------------------- the catalog: local and remote copies


@dataclass(frozen=True)
class CatalogView:
    """`/etcd snapshots` and `snapshot list`: both places, newest first, and why the store was not listed."""

    cluster: str
    entries: tuple[CatalogEntry, ...]
    store_url: str | None = None       # the store's address, when one is configured
    store_error: str | None = None     # one line: the store could not be listed (the local part still shows)


def catalog_view(cluster: str, rows: list[SnapshotRecord], listed: Mapping[str, CatalogEntry | None] | None,
                 store_url: str | None = None, store_error: str | None = None, limit: int = 15) -> CatalogView:
    """Merge the catalog's rows with the store's listing (`listed`: every object's file name, with an entry
    from its manifest for those no row knows; None when there is no store or it could not be listed): a row's
    object missing from a listing is said, an object no row knows shows from its manifest. Rows with neither
    copy left are not shown."""
    entries: dict[str, CatalogEntry] = {}
    for row in rows:
        e = catalog_entry(row)
        if listed is not None and e.remote_state == RemoteState.VERIFIED and e.name not in listed:
            e = replace(e, remote_state=RemoteState.MISSING)
        if e.local_path or e.remote_state not in (RemoteState.NONE, RemoteState.FAILED):
            entries.setdefault(e.name, e)
    for name, found in (listed or {}).items():
        known = entries.get(name)
        if known is None:
            if found is not None:
                entries[name] = found
        elif known.remote_state == RemoteState.NONE:  # there, though this catalog never uploaded it
            entries[name] = replace(known, remote_state=RemoteState.LISTED,
                                    remote_url=found.remote_url if found is not None else known.remote_url)
    newest = sorted(entries.values(), key=lambda e: (e.created_at, e.snapshot_id or 0), reverse=True)
    return CatalogView(cluster, tuple(newest[:limit]), store_url, store_error)
