"""`/etcd alarms`, `perf` and `consistency`: read-only checks, on healthy clusters and on
unhealthy ones (a member killed, the NOSPACE alarm raised), through the real bot and the Slack stand-in."""
from __future__ import annotations

import asyncio
import re

from bot.domain.cluster import Consistency, KVHash, Member, MemberHash, MemberHealth, MemberMetrics
from bot.domain.errors import EtcdError
from bot.etcd.client import EtcdClient
from bot.etcd.consistency import check_consistency
from bot.etcd.health import check_cluster
from bot.output.model import perf_view
from bot.output.text import consistency_text, perf_text
from bot.testing.workspace import cluster_table
from helpers import QUOTA_ARGS, cluster_health, eventually, fill_until_nospace, member_status, reply, text_of


async def test_a_healthy_cluster_has_no_alarms_good_figures_and_agreeing_members(cluster, slack, start_bot):
    await start_bot([cluster_table("prod", cluster)])
    assert "cluster prod: no alarms" in text_of(await reply(slack, "alarms"))
    perf = text_of(await reply(slack, "perf prod"))
    # a loaded test machine may well miss the disk guidance: the verdict says which figure, on which member
    verdict = perf.splitlines()[0]
    assert verdict == "cluster prod perf: OK: all figures within etcd's guidance" or (
        verdict.startswith("cluster prod perf: BAD: member") and perf.count(" BAD |") >= 1)
    assert "slowest: member" in perf  # named, even when every member is within the guidance
    for row in ("WAL fsync p99 (&lt; 10 ms)", "backend commit p99 (&lt; 25 ms)", "leader changes", "slow applies",
                "proposals pending", "proposals failed", "raft index - applied"):
        assert row in perf
    assert perf.count(" ok |") + perf.count(" BAD |") + perf.count(" ? |") == 3 * 7  # each figure judged
    consistency = text_of(await reply(slack, "consistency"))
    assert "cluster prod: CONSISTENT: 3 members agree at revision" in consistency
    assert consistency.count(" same |") == 3


async def test_a_killed_member_is_named_by_perf_and_consistency(make_cluster, slack, start_bot):
    c = make_cluster(3)
    await start_bot([cluster_table("prod", c)])
    c.kill("member2")
    perf = text_of(await reply(slack, "perf"))
    assert "cluster prod perf: BAD" in perf and "member2: connection refused" in perf
    assert re.search(r"\| +not read \|", perf)
    consistency = text_of(await reply(slack, "consistency"))
    assert "cluster prod: NOT CHECKED at revision" in consistency and "member2: " in consistency


async def test_nospace_is_listed_with_the_defrag_to_run(make_cluster, slack, start_bot):
    c = make_cluster(3, extra_args=QUOTA_ARGS)
    await fill_until_nospace(c)
    await start_bot([cluster_table("prod", c)])
    text = text_of(await reply(slack, "alarms"))
    assert re.search(r"cluster prod: \d alarms?\n", text) and "ALARM NOSPACE on member" in text
    assert "NEXT: NOSPACE" in text and "run /etcd defrag prod" in text
    assert "CONSISTENT" in text_of(await reply(slack, "consistency"))  # reads still work under NOSPACE


def test_the_member_whose_hash_differs_is_named_with_its_replacement() -> None:
    def m(name: str, member_id: int, h: int) -> MemberHash:
        return MemberHash(name, member_id, KVHash(f"http://{name}:2379", member_id, h, 5, 40))
    c = Consistency("prod", 40, (m("a", 1, 0xAB), m("b", 2, 0xCD), m("c", 3, 0xAB)))
    assert not c.agree and [d.name for d in c.differing] == ["b"]
    text = consistency_text(c)
    assert text.startswith("cluster prod: INCONSISTENT at revision 40: b differs from the majority; stop etcd on it "
                           "(one at a time), then replace it: /etcd replace b <new-name> <new-peer-url>")
    assert text.count(" same |") == 2 and text.count(" DIFFERS |") == 1 and "000000cd" in text


def test_a_slow_disk_is_bad_and_its_member_the_slowest() -> None:
    fast = MemberMetrics(None, 0.002, 0.004, 1, 0, 0, 0)
    slow = MemberMetrics(None, 0.031, 0.004, 4, 2, 0, 1)
    health = cluster_health(*(MemberHealth(Member(i, f"m{i}", (), (f"http://10.0.0.{i}:2379",)),
                                           member_status(member_id=i, raft_index=9000, raft_applied_index=9000 - lag))
                              for i, lag in ((1, 0), (2, 6000))))
    view = perf_view(health, {1: fast, 2: slow})
    assert not view.all_ok and view.slowest is not None and view.slowest.label == "m2"
    assert [f.name.split(" (")[0] for f in view.members[1].bad] == [
        "WAL fsync p99", "leader changes", "slow applies", "proposals failed", "raft index - applied"]
    text = perf_text(view)
    assert text.startswith("cluster prod perf: BAD: m2: WAL fsync p99 (< 10 ms) 31.0 ms, leader changes (<= 2) 4")
    assert "slowest: m2 (disk p99 at 310 % of etcd's limit)" in text


async def test_metrics_are_read_over_tls_with_the_client_certificate(make_cluster, slack, start_bot):
    c = make_cluster(3, tls=True, extra_args=QUOTA_ARGS)
    await start_bot([cluster_table("prod", c)])
    status = text_of(await reply(slack, "status"))
    assert status.count("of 17 MB quota") == 3 and "quota unknown" not in status  # 16 MiB, from each /metrics
    perf = text_of(await reply(slack, "perf"))
    assert "not read" not in perf and perf.count(" ok |") + perf.count(" BAD |") + perf.count(" ? |") == 3 * 7


async def test_consistency_asks_a_member_again_until_it_has_applied_the_revision(make_cluster):
    """A member that has not applied the revision yet answers "future revision"; it is asked again
    within the deadline instead of being reported unchecked. Here every member is behind at first:
    the revision is three writes ahead, and the writes come 0.5 s after the check began."""
    c = make_cluster(3)
    async with EtcdClient(c.endpoints, timeout=3.0) as client:
        health = await check_cluster(client, "prod")
        ahead = await client.put(b"/before", b"x") + 3
        refused: list[EtcdError] = []
        client.on_error = refused.append

        async def write_later() -> None:
            await eventually(lambda: any("future revision" in e.message for e in refused), 5,
                             "the check to be told of a future revision")   # it waits on it now
            for i in range(3):
                await client.put(f"/later/{i}".encode(), b"x")

        writer = asyncio.create_task(write_later())
        result = await check_consistency(client, health, revision=ahead)
        await writer
    assert result.revision == ahead and result.agree, result
    assert len({m.hash.hash for m in result.members if m.hash}) == 1
