"""Whether a cluster lost quorum, on positive evidence only (the verdict; gathering the evidence is
bot.ops.restore.quorum's). "I cannot reach it" is not "it is down"."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from bot.domain.cluster import Member, MemberStatus


class MemberState(StrEnum):
    """What the launcher's `status` action says of one member."""

    RUNNING = "running"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


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


def _voter(member: Member, status: MemberStatus | None, launcher: MemberState | None) -> Voter:
    name = member.name or member.hex_id
    if status is not None:
        return Voter(name, Seen.LEADER if status.leader else Seen.NO_LEADER, member.id, status.leader)
    seen = {MemberState.STOPPED: Seen.STOPPED, MemberState.RUNNING: Seen.RUNNING}.get(launcher or MemberState.UNKNOWN,
                                                                                    Seen.SILENT)
    return Voter(name, seen, member.id)
