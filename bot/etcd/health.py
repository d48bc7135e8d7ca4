"""Cluster health: every member asked in parallel, one deadline for all.

The quorum math is pure and at the top, so the planner and the tests use
it without servers.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from bot.domain.cluster import NOT_SERVING, Alarm, ClusterHealth, Member, MemberHealth, judge_leaders
from bot.domain.errors import EtcdAuthError, EtcdError
from bot.etcd.race import AllFailed, first_success

if TYPE_CHECKING:  # the client is gRPC; the quorum math above the fan-out stays pure
    from bot.etcd.client import EtcdClient



# ---------------------------------------------------------------- pure


# ---------------------------------------------------------------- fan-out

async def _ask_member(client: EtcdClient, member: Member, timeout: float) -> tuple[MemberHealth, list[Alarm]]:
    """Status from the first of the member's client URLs to answer, and the
    cluster's alarms as that member knows them. gRPC's health check goes
    alongside: a member defragmenting with StopGRPCServiceOnDefrag answers it
    NOT_SERVING at once while its Status waits, and is no dead member."""
    if not member.client_urls:
        return MemberHealth(member, error=("unstarted: no client URL published yet" if not member.name
                                           else "no client URL")), []

    serving = asyncio.ensure_future(first_success([client.serving(u, timeout) for u in member.client_urls],
                                                  fatal=lambda e: not isinstance(e, EtcdError)))
    try:
        _, status = await first_success([client.status(u, timeout) for u in member.client_urls],
                                        fatal=lambda e: not isinstance(e, EtcdError))
    except AllFailed as e:
        reasons = (err.message if isinstance(err, EtcdError) else str(err) for err in e.errors)
        refused = any(isinstance(err, EtcdAuthError) for err in e.errors)  # it answered: not down
        busy = serving.done() and not serving.cancelled() and serving.exception() is None \
            and serving.result()[1] == NOT_SERVING
        if busy:
            return MemberHealth(member, error=DEFRAGMENTING, defragmenting=True), []
        return MemberHealth(member, error="; ".join(dict.fromkeys(reasons)), refused=refused), []
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    return MemberHealth(member, status=status), list(status.alarms)


DEFRAGMENTING = ("defragmenting: it serves no client until done (StopGRPCServiceOnDefrag: clients that check its "
                 "health use the other members meanwhile)")


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
    ordered = sorted(judge_leaders(healths), key=lambda h: (h.member.name or "~", h.member.id))
    return ClusterHealth(cluster=cluster, members=tuple(ordered), alarms=tuple(alarms.values()), checked_at=time.time(),
                         elapsed=time.monotonic() - started, deadline=timeout,
                         learned_url=None if endpoint in client.endpoints else endpoint)
