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
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.etcd.model import EtcdError, KVHash

if TYPE_CHECKING:  # the fan-out calls the gRPC client; the verdict below stays pure
    from bot.etcd.client import EtcdClient
    from bot.etcd.health import ClusterHealth

LAG_RETRY = 0.2  # seconds between asks of a member that has not reached the revision yet


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
