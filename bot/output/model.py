"""One model per answer, computed once (as etcdctl's commands build plain
data and hand it to the printer `--write-out` picks, printer.go).

The verdict, the quorum line, each member's state and facts, the list of
members down: all are decided here and nowhere else. The plain-text, table
and JSON printers (text.py) and the Block Kit printer (bot/output/blocks.py)
only lay these values out, so the CLI and Slack never disagree.

May import: the etcd layer's data models only (no gRPC, no Slack).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from bot.etcd.bbolt import SnapshotStatus, status_table
from bot.etcd.health import ClusterHealth, MemberHealth, Quorum
from bot.etcd.model import Alarm, Member, MemberStatus
from bot.output.units import humanize_bytes, humanize_duration

if TYPE_CHECKING:  # bot.etcd.snapshots streams over gRPC; only its result type is needed here
    from bot.etcd.snapshots import SavedSnapshot


# ---------------------------------------------------------------- status

class Verdict(StrEnum):
    """The words an SRE reads first."""

    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"
    NO_LEADER = "NO LEADER"
    QUORUM_LOST = "QUORUM LOST"


def verdict(health: ClusterHealth) -> Verdict:
    q = health.quorum
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
            else "the cluster cannot accept writes")
    return f"{q.healthy} of {q.voting} voting members healthy, quorum needs {q.needed}, {tail}"


LEADERLESS = ("no leader", "learner, no leader")


def member_state(h: MemberHealth, health: ClusterHealth) -> str:
    """DOWN, UNHEALTHY, leader, follower, learner; without quorum or a leader
    there is no follower: a survivor then says "no leader" (one of LEADERLESS)."""
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
    state: str                     # member_state(): leader, follower, learner, no leader, DOWN or UNHEALTHY
    problem: str | None            # why it is DOWN or UNHEALTHY, in etcd's words
    is_leader: bool
    healthy: bool
    error: str | None
    alarms: tuple[str, ...]

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
        facts = [f"v{s.version}", f"DB {humanize_bytes(s.db_size)} ({humanize_bytes(s.db_size_in_use)} in use)",
                 f"raft index {s.raft_index}", f"term {s.raft_term}"] if s else []
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


    @property
    def down(self) -> list[str]:
        return [m.label for m in self.members if not m.reachable]

    @property
    def checked(self) -> str:
        return f"checked in {humanize_duration(self.elapsed)}, deadline {self.deadline:g}s per member"


def status_view(health: ClusterHealth) -> StatusView:
    leader = health.leader_id
    members = tuple(MemberView(member=h.member, status=h.status, state=member_state(h, health), problem=h.problem,
                               is_leader=h.member.id == leader, healthy=h.healthy, error=h.error, alarms=h.alarms)
                    for h in health.members)
    return StatusView(cluster=health.cluster, verdict=verdict(health), quorum=health.quorum,
                      quorum_line=quorum_line(health), leader_id=leader, members=members, alarms=health.alarms,
                      elapsed=health.elapsed, deadline=health.deadline, all_healthy=health.all_healthy,
                      learned_url=health.learned_url, learned=learned_line(health))


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
                        pruned=saved.pruned)
