"""Do the members hold the same data? HashKV on every member at one revision.

etcd's own corruption check does this: every member hashes its key space up
to the same revision R; members that have not applied R yet say "future
revision" and are asked again; hashes compare only between members with the
same compaction point. A member whose hash differs from the majority's holds
different data, and is replaced rather than repaired.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from bot.domain.cluster import Consistency, KVHash, MemberHash
from bot.domain.errors import EtcdError

if TYPE_CHECKING:  # the fan-out calls the gRPC client; the verdict below stays pure
    from bot.domain.cluster import ClusterHealth
    from bot.etcd.client import EtcdClient

LAG_RETRY = 0.2  # seconds between asks of a member that has not reached the revision yet


async def check_consistency(client: EtcdClient, health: ClusterHealth, timeout: float | None = None,
                            revision: int | None = None) -> Consistency:
    """HashKV at `revision` (by default the leader's current one) on every reachable
    member, each asked again (within the deadline) while it has not applied it."""
    timeout = timeout or client.timeout
    if revision is None:
        leader = next((h for h in health.members if h.member.id == health.leader_id and h.status), None)
        source = leader or next((h for h in health.members if h.status), None)
        if source is None or source.status is None:
            raise EtcdError("no member answered; nothing to compare")
        revision = await client.revision(source.status.endpoint, timeout)

    async def one(endpoint: str) -> KVHash:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await client.hash_kv(endpoint, revision, timeout)
            except EtcdError as e:
                if "future revision" not in e.message or time.monotonic() + LAG_RETRY >= deadline:
                    raise
            await asyncio.sleep(LAG_RETRY)

    async def member(name: str, member_id: int, endpoint: str | None) -> MemberHash:
        if endpoint is None:
            return MemberHash(name, member_id, None, "unreachable")
        try:
            return MemberHash(name, member_id, await one(endpoint))
        except EtcdError as e:
            return MemberHash(name, member_id, None, e.message)

    hashes = await asyncio.gather(*(member(h.member.name or h.member.hex_id, h.member.id,
                                           h.status.endpoint if h.status else None) for h in health.members))
    return Consistency(cluster=health.cluster, revision=revision, members=tuple(hashes))
