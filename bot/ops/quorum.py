"""Whether a cluster lost quorum, on positive evidence only.

"I cannot reach it" is not "it is down": a bot whose client certificate no
longer matches (a rotated CA), or that is cut off from a healthy cluster,
sees what it would see of a dead one, and a restore there throws away every
write since the snapshot. So a voter counts as out of every quorum only on
evidence: the launcher's `status` says it is stopped, or it answers and has
reported no leader for `no_leader_seconds` (an election in a healthy cluster
ends well within that). Quorum holds when a quorum of voters answers with a
leader. It is lost when the voters not shown out are fewer than a quorum,
or when every voter that answers has had no leader that long and the
launcher reports none of the others running: what the members the bot can
reach see. (A member cut off from healthy peers the bot cannot reach either
looks the same; with a launcher that has `status` the peers' state decides,
with the manual launcher the approvers read each member's evidence in the
plan.) Anything else is unproven, and a restore then needs --force.

The verdict is pure and at the top; gathering the evidence (a health check,
the launcher's status of the members that do not answer) is below it.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from bot.etcd.model import EtcdError, Member, MemberStatus
from bot.ops.launcher import MemberState, member_status

if TYPE_CHECKING:  # the verdict stays pure: no gRPC behind the context
    from bot.config import ClusterConfig
    from bot.etcd.health import ClusterHealth
    from bot.ops.context import BotContext

POLL = 0.5


# ---------------------------------------------------------------- pure

class Seen(StrEnum):
    """What the bot knows of one voter."""

    LEADER = "answering, with a leader"
    NO_LEADER = "answering, without a leader"
    STOPPED = "stopped (the launcher's status)"
    RUNNING = "running (the launcher's status), not answering the bot"
    SILENT = "not answering the bot"


class QuorumVerdict(StrEnum):
    LOST = "lost"            # the voters not shown out cannot make a quorum
    HELD = "held"            # a quorum of voters answers with a leader
    UNPROVEN = "unproven"    # neither: the bot cannot tell


@dataclass(frozen=True)
class Voter:
    name: str                # the member's name, or its hex ID when it never started
    seen: Seen
    member_id: int = 0
    leader: int = 0          # the leader it reports (LEADER)


@dataclass(frozen=True)
class QuorumEvidence:
    cluster: str
    voters: tuple[Voter, ...]
    leaderless: frozenset[str] = frozenset()   # NO_LEADER voters without a leader for no_leader_seconds or more
    no_leader_seconds: float = 0.0

    @property
    def voting(self) -> int:
        return len(self.voters)

    @property
    def needed(self) -> int:
        return self.voting // 2 + 1

    def named(self, *seen: Seen) -> list[str]:
        return [v.name for v in self.voters if v.seen in seen]

    @property
    def answering(self) -> int:
        return len(self.named(Seen.LEADER, Seen.NO_LEADER))

    @property
    def out(self) -> list[str]:
        """The voters shown to be in no quorum: stopped, or without a leader for the settle time."""
        return [v.name for v in self.voters
                if v.seen is Seen.STOPPED or (v.seen is Seen.NO_LEADER and v.name in self.leaderless)]

    @property
    def verdict(self) -> QuorumVerdict:
        if not self.voters:
            return QuorumVerdict.UNPROVEN
        if len(self.named(Seen.LEADER)) >= self.needed:
            return QuorumVerdict.HELD
        if self.voting - len(self.out) < self.needed:
            return QuorumVerdict.LOST
        answering = self.named(Seen.LEADER, Seen.NO_LEADER)
        if answering and set(answering) <= self.leaderless and not self.named(Seen.RUNNING):
            return QuorumVerdict.LOST  # every member that answers has had no leader, and none is known to run
        return QuorumVerdict.UNPROVEN

    @property
    def settling(self) -> bool:
        """Whether looking again may settle an unproven verdict: a voter answers and has not been without a
        leader for the settle time (a leader cut off from its quorum steps down, and its followers notice,
        within an election timeout)."""
        return any(v.seen in (Seen.LEADER, Seen.NO_LEADER) and v.name not in self.leaderless for v in self.voters)

    def describe(self) -> str:
        """Each voter as the bot knows it, grouped: "member1, member2: stopped (the launcher's status); ..."."""
        groups: dict[str, list[str]] = {}
        for v in self.voters:
            what = v.seen.value
            if v.seen is Seen.NO_LEADER and v.name in self.leaderless:
                what += f" for {self.no_leader_seconds:g} s"
            groups.setdefault(what, []).append(v.name)
        return "; ".join(f"{', '.join(names)}: {what}" for what, names in groups.items())

    @property
    def reason(self) -> str:
        """One line on the verdict, as a refusal or a changed fact states it."""
        if self.verdict is QuorumVerdict.HELD:
            return (f"{self.cluster} still has quorum ({self.answering} of {self.voting} voting members healthy, "
                    f"{len(self.named(Seen.LEADER))} with a leader)")
        if self.verdict is QuorumVerdict.LOST:
            return f"{self.cluster} lost quorum: {self.describe()}"
        if not self.answering:
            return f"I cannot reach any member of {self.cluster} from here: this is not proof that it lost quorum"
        return f"this is not proof that {self.cluster} lost quorum: {self.describe()}"


# ---------------------------------------------------------------- gathering

def _voter(member: Member, status: MemberStatus | None, launcher: MemberState | None) -> Voter:
    name = member.name or member.hex_id
    if status is not None:
        return Voter(name, Seen.LEADER if status.leader else Seen.NO_LEADER, member.id, status.leader)
    seen = {MemberState.STOPPED: Seen.STOPPED, MemberState.RUNNING: Seen.RUNNING}.get(launcher or MemberState.UNKNOWN,
                                                                                    Seen.SILENT)
    return Voter(name, seen, member.id)


async def weigh(ctx: BotContext, cluster: ClusterConfig,
                known: Sequence[Member]) -> tuple[QuorumEvidence, ClusterHealth | None]:
    """The evidence now, looked at again every POLL while waiting may settle it (at most twice the settle
    time). The launcher is asked once about each voter that does not answer; `known` are the members to ask
    about when no member gives a member list (the recorded membership, or the plan's). Also returns the last
    health check (None: no member answered)."""
    settle = cluster.restore.no_leader_seconds
    launcher: dict[int, MemberState] = {}
    since: dict[str, float] = {}
    began = time.monotonic()
    while True:
        health: ClusterHealth | None
        try:
            health = await ctx.check(cluster)
            seen = [(h.member, h.status) for h in health.members if not h.member.is_learner]
        except EtcdError:
            health, seen = None, [(m, None) for m in known if not m.is_learner]
        ask = [m for m, status in seen if status is None and m.id not in launcher]
        answers = await asyncio.gather(*(member_status(cluster.launcher, m.name, next(iter(m.peer_urls), ""),
                                                       m.client_urls, ctx.secrets()) for m in ask))
        launcher |= {m.id: a.state for m, a in zip(ask, answers, strict=True)}
        now = time.monotonic()
        voters = tuple(_voter(m, status, launcher.get(m.id)) for m, status in seen)
        since = {v.name: since.get(v.name, now) for v in voters if v.seen is Seen.NO_LEADER}
        evidence = QuorumEvidence(cluster.name, voters, frozenset(n for n, t in since.items() if now - t >= settle),
                                  settle)
        if evidence.verdict is not QuorumVerdict.UNPROVEN or not evidence.settling or now - began >= 2 * settle:
            return evidence, health
        await asyncio.sleep(POLL)
