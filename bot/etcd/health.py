"""Cluster health: every member asked in parallel, one deadline for all.

The quorum math is pure and at the top, so the planner and the tests use
it without servers.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from bot.etcd.model import Alarm, EtcdError, Member, MemberStatus
from bot.etcd.race import AllFailed, first_success

if TYPE_CHECKING:  # the client is gRPC; the quorum math above the fan-out stays pure
    from bot.etcd.client import EtcdClient

NO_LEADER = "etcdserver: no leader"


# ---------------------------------------------------------------- pure

@dataclass(frozen=True)
class Quorum:
    """Raft arithmetic over the voting members (learners do not vote)."""

    voting: int
    healthy: int

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


def membership_fingerprint(members: list[Member] | tuple[Member, ...]) -> str:
    """A short digest of who is in the cluster; a plan is only valid for the
    membership it was built on."""
    parts = sorted(f"{m.hex_id}|{m.name}|{','.join(sorted(m.peer_urls))}|{int(m.is_learner)}" for m in members)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MemberHealth:
    member: Member
    status: MemberStatus | None = None
    error: str | None = None           # why it could not be asked, when it could not
    alarms: tuple[str, ...] = ()

    @property
    def reachable(self) -> bool:
        return self.status is not None

    @property
    def errors(self) -> tuple[str, ...]:
        """etcd's own errors for this member, less the transient "no leader"."""
        return tuple(e for e in self.status.errors if e != NO_LEADER) if self.status else ()

    @property
    def healthy(self) -> bool:
        """Answers and reports no error. A voter without a leader still counts
        toward quorum: during an election every member says "no leader"."""
        return self.status is not None and not self.errors

    @property
    def problem(self) -> str | None:
        """One phrase on what is wrong with this member, or None."""
        if self.status is None:
            return self.error or "unreachable"
        if self.errors:
            return "; ".join(self.errors)
        return None


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
        return Quorum(voting=len(voters), healthy=sum(1 for m in voters if m.healthy))

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


# ---------------------------------------------------------------- fan-out

async def _ask_member(client: EtcdClient, member: Member, timeout: float) -> tuple[MemberHealth, list[Alarm]]:
    """Status from the first of the member's client URLs to answer, and the
    cluster's alarms as that member knows them."""
    if not member.client_urls:
        return MemberHealth(member, error=("unstarted: no client URL published yet" if not member.name
                                           else "no client URL")), []

    try:
        _, status = await first_success([client.status(u, timeout) for u in member.client_urls],
                                        fatal=lambda e: not isinstance(e, EtcdError))
    except AllFailed as e:
        reasons = (err.message if isinstance(err, EtcdError) else str(err) for err in e.errors)
        return MemberHealth(member, error="; ".join(dict.fromkeys(reasons))), []
    return MemberHealth(member, status=status), list(status.alarms)


async def check_cluster(client: EtcdClient, cluster: str, timeout: float | None = None) -> ClusterHealth:
    """Member list, then every member's status at once under one deadline.

    Raises EtcdUnavailable when no configured endpoint gives a member list.
    """
    timeout = timeout or client.timeout
    started = time.monotonic()
    endpoint, members = await client.member_list_from(timeout)
    answers = await asyncio.gather(*(_ask_member(client, m, timeout) for m in members))
    alarms = {(a.member_id, a.kind): a for _, found in answers for a in found}
    healths = [replace(h, alarms=tuple(sorted(kind for (mid, kind) in alarms if mid == h.member.id)))
               for h, _ in answers]
    ordered = sorted(healths, key=lambda h: (h.member.name or "~", h.member.id))
    return ClusterHealth(cluster=cluster, members=tuple(ordered), alarms=tuple(alarms.values()), checked_at=time.time(),
                         elapsed=time.monotonic() - started, deadline=timeout,
                         learned_url=None if endpoint in client.endpoints else endpoint)
