"""etcd's mixin's conditions in the watch, on the multi-host bed (each member a host of its own, faults on
real links), through the real bot and the Slack stand-in: a member cut off from its peers while the bot
still reaches it opens *no leader*; 300 ms on one member's peer link opens *peer round trip*; a small
quota filled to 96 % opens *quota* at critical.

etcd observes a peer's round trip once every 30 s (rafthttp's status monitor; the first at 5 s), as a
smoothed mean of probes sent every 4 s, so a 300 ms link shows as over 150 ms from the observation about
35 s after it slowed, not before: the quota and the cut run meanwhile, in the same test.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from conftest import StartBot

from bot.etcd.client import EtcdClient
from bot.testing.cluster import QUOTA, QUOTA_ARGS
from bot.testing.netbed import Link, NetnsCluster
from bot.testing.slack import Message, SlackStandIn
from bot.testing.workspace import CHANNEL, cluster_table
from helpers import eventually, text_of

KiB = 1024


def headline(slack: SlackStandIn, words: str) -> Message | None:
    """The watch's top-level message whose headline has `words` (e.g. NO LEADER)."""
    return next((m for m in slack.channel_messages(CHANNEL, include_threads=False, include_ephemeral=False)
                 if m.source == "chat.postMessage" and words in m.text), None)


async def fill_to(c: NetnsCluster, leader_url: str, share: float) -> float:
    """Write through the leader until a member's database is over `share` of QUOTA; the share reached. Each
    key is new (an overwritten one frees pages the next write reuses: the size would stall), each write a
    eighth of what is left to go (32 to 512 KiB), and from 60 % on one write per backend commit (etcd
    commits its batch every 100 ms), so the size read is that of every write so far. The fill stops at the
    first size over `share`: the write that would be refused (NOSPACE) is never sent."""
    async with EtcdClient([leader_url], timeout=5.0) as client:
        n = 0
        while True:
            size = max([(await client.status(url, 2.0)).db_size for url in c.endpoints])
            if size > share * QUOTA:
                return size / QUOTA
            await client.put(b"fill/%d" % n, b"x" * max(32 * KiB, min(512 * KiB, int(share * QUOTA - size) // 8)))
            n += 1
            if size >= 0.6 * QUOTA:
                await asyncio.sleep(0.15)   # the load's own pace: one write per batch commit, as above


async def test_a_cut_member_has_no_leader_a_slow_peer_link_is_slow_and_a_full_quota_is_critical(
        make_bed: Callable[..., NetnsCluster], slack: SlackStandIn, start_bot: StartBot) -> None:
    c = make_bed(3, extra_args=QUOTA_ARGS)
    async with EtcdClient(c.endpoints, timeout=2.0) as client:
        leader = (await client.status(c.endpoints[0], 2.0)).leader
        members = {m.id: m.name for m in await client.member_list()}
    slow, cut = sorted(name for mid, name in members.items() if mid != leader)   # two followers
    c.impair(slow, Link.PEER, delay=0.3)   # at once: the round trips etcd will observe are slow from here
    impaired = time.monotonic()
    await start_bot([cluster_table("prod", c, watch={"interval": "1s", "grace": "1s", "window": "1m"},
                                   timeout_seconds=1.0)])

    # A small quota filled to 96 %: the quota condition, critical (the mixin's 95 %), before any NOSPACE.
    reached = await fill_to(c, c.member(members[leader]).client_url, 0.96)
    assert reached > 0.96, reached
    # bbolt may grow past the quota in one commit (copy-on-write of a leaf of large values needs a contiguous
    # run of pages); no NOSPACE is raised until a write is refused, and the fill stops before one.
    async with EtcdClient(c.endpoints, timeout=2.0) as client:
        assert not [s.alarms for s in [await client.status(u, 2.0) for u in c.endpoints] if s.alarms]
    quota = await eventually(lambda: headline(slack, "QUOTA"), 15, "the quota message")
    await eventually(lambda: "CRITICAL" in text_of(quota), 10, "the quota message at critical")
    assert "above 95 % of the quota" in quota.text and "`/etcd defrag prod`" in text_of(quota)
    assert headline(slack, "ALARM NOSPACE") is None

    # A follower cut from its peers, reachable by the bot: no leader, it is cut off from its peers.
    c.cut_from_peers(cut)
    no_leader = await eventually(lambda: headline(slack, "NO LEADER"), 20, "the no-leader message")
    assert f"{cut} has no leader while the others follow" in no_leader.text, no_leader.text
    assert "cut off from its peers" in no_leader.text and "CRITICAL" in text_of(no_leader)
    c.heal(cut)

    # 300 ms on the other follower's peer link: peer round trips over the mixin's 150 ms, naming it.
    rtt = await eventually(lambda: headline(slack, "PEER ROUND TRIP"), 75, "the peer round-trip message")
    took = time.monotonic() - impaired
    assert slow in text_of(rtt) and "over 150 ms" in text_of(rtt) and "`/etcd perf prod`" in text_of(rtt)
    for words in ("QUOTA", "NO LEADER", "PEER ROUND TRIP"):   # each one message
        assert sum(words in m.text for m in slack.channel_messages(CHANNEL, include_threads=False)
                   if m.source == "chat.postMessage" and m.text.startswith("cluster prod: ")) == 1, words
    print(f"peer link slowed to the peer round-trip message: {took:.0f} s")
