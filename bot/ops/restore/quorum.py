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
from typing import TYPE_CHECKING

from bot.domain.cluster import Member
from bot.domain.errors import EtcdError
from bot.domain.quorum import MemberState, QuorumEvidence, QuorumVerdict, Seen, _voter
from bot.ops.launcher import member_status

if TYPE_CHECKING:  # the verdict stays pure: no gRPC behind the context
    from bot.config import ClusterConfig
    from bot.domain.cluster import ClusterHealth
    from bot.ops.context import BotContext

POLL = 0.5


# ---------------------------------------------------------------- pure


# ---------------------------------------------------------------- gathering


async def weigh(ctx: BotContext, cluster: ClusterConfig,
                known: Sequence[Member]) -> tuple[QuorumEvidence, ClusterHealth | None]:
    """The evidence now, looked at again every POLL while waiting may settle it (at most twice the settle
    time after the first look: that look may take longer than the settle time itself, when the launcher's
    status is slow, as over SSH). The launcher is asked once about each voter that does not answer; `known`
    are the members to ask about when no member gives a member list (the recorded membership, or the plan's).
    Also returns the last health check (None: no member answered)."""
    settle = cluster.restore.no_leader_seconds
    launcher: dict[int, MemberState] = {}
    since: dict[str, float] = {}
    began: float | None = None
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
        began = now if began is None else began
        voters = tuple(_voter(m, status, launcher.get(m.id)) for m, status in seen)
        since = {v.name: since.get(v.name, now) for v in voters if v.seen is Seen.NO_LEADER}
        evidence = QuorumEvidence(cluster.name, voters, frozenset(n for n, t in since.items() if now - t >= settle),
                                  settle)
        if evidence.verdict is not QuorumVerdict.UNPROVEN or not evidence.settling or now - began >= 2 * settle:
            return evidence, health
        await asyncio.sleep(POLL)
