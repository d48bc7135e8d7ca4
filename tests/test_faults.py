"""Nothing is lost or done twice when things break: real clusters, the real bot,
faults injected at precise moments.

To hit a moment exactly, the Slack stand-in answers one chosen progress update
with 429 + Retry-After: the executor announces a step (chat.update) before it
runs it, so it waits there, and the test acts in that window.
"""
from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

from bot.etcd.client import EtcdClient
from bot.etcd.health import check_cluster
from bot.testing.workspace import CHANNEL, LEAD, BotProcess, cluster_table, write_config
from helpers import (
    APPROVAL,
    OK,
    audit_actions,
    ephemeral,
    members_of,
    open_store,
    plan_row,
    propose,
    replies,
    reply,
    text_of,
    urls,
    wait_done,
)


def announcing(step: int):
    """Matches the chat.update that marks `step` running on the plan message."""
    return lambda args: f":hourglass_flowing_sand: {step}." in str(args.get("blocks"))


async def _health(cluster):
    async with EtcdClient(cluster.endpoints) as client:
        return await check_cluster(client, "check")


async def leader_name(cluster) -> str:
    health = await _health(cluster)
    return next(h.member.name for h in health.members if h.member.id == health.leader_id)


async def test_the_leader_crashes_during_the_add_step(make_cluster, slack, start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c, catch_up_seconds=60)], approval=APPROVAL)
    store = bot.ctx.store
    c.kill("member1")
    slack.fail_next("chat.update", status=429, retry_after=2, match=announcing(3))
    peer, client = urls()
    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}")
    row = await plan_row(store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await slack.wait_for(lambda: any(call.status == 429 for call in slack.calls_to("chat.update")), timeout=60,
                         what="step 3 (add) to be announced")
    leader = await leader_name(c)
    c.kill(leader)  # the leader dies as the add is about to be sent; its supervisor restarts it
    await asyncio.to_thread(c.restart, leader)
    done = await wait_done(store, row["id"])
    members = await members_of(c)
    assert (sorted(h.member.name for h in members) == ["member2", "member3", "member4"]
            and all(h.healthy for h in members))
    actions = await audit_actions(store, row["id"])
    assert actions.count(("step_done", "remove")) == 1 and actions.count(("step_done", "add")) == 1
    assert [h.member.hex_id for h in members if h.member.name == "member4"] == [done["new_member_id"]]


async def test_a_snapshot_source_killed_mid_stream_fails_over(make_cluster, slack, start_bot, tmp_path):
    c = make_cluster(3)
    async with EtcdClient(c.endpoints) as client:  # ~120 MB, so the stream lasts long enough to be cut
        for batch in range(0, 120, 8):
            await asyncio.gather(*(client.put(f"/registry/blob/{i}".encode(), bytes([i % 251]) * 1_000_000, timeout=30)
                                   for i in range(batch, batch + 8)))
    bot = await start_bot([cluster_table("prod", c)])
    snapshot_dir = bot.ctx.config.snapshot_dir / "prod"
    start = len(slack.messages)
    task = asyncio.ensure_future(slack.send_command("snapshot", user_id="U0ONCALL01", channel_id=CHANNEL))

    def part_growing() -> str | None:
        parts = list(snapshot_dir.glob("*.part")) if snapshot_dir.exists() else []
        return parts[0].name if parts and parts[0].stat().st_size > 1_000_000 else None

    await slack.wait_for(part_growing, timeout=30, what="the snapshot stream to start")
    killed = await source_of_stream(bot, c)
    c.kill(killed)
    await task
    msg = await slack.wait_for_message(lambda m: m.source == "chat.postMessage", after=start, timeout=60)
    text = text_of(msg)
    assert "verified" in text and f"{killed} stopped answering mid-stream" in text
    assert not list(snapshot_dir.glob("*.part"))
    files = list(snapshot_dir.glob("*.db"))
    assert len(files) == 1 and files[0].name in text
    rows = await bot.ctx.store.snapshots("prod")
    assert len(rows) == 1 and rows[0]["member"] != killed


async def source_of_stream(bot, cluster) -> str:
    """The member whose Snapshot stream is open: the bot picks as snapshot_source does."""
    return (await _health(cluster)).snapshot_source().member.name


async def test_the_bot_killed_between_remove_and_add_resumes_without_repeating(make_cluster, slack, creds, tmp_path):
    c = make_cluster(3)
    config = write_config(tmp_path, [cluster_table("prod", c)], approval=APPROVAL)
    bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, tmp_path / "bot.log").start)
    try:
        slack.bot_url = bot.url
        c.kill("member1")
        slack.fail_next("chat.update", status=429, retry_after=30, match=announcing(3))
        plan = await propose(slack, f"replace member1 member4 {urls()[0]} --client-url {urls()[1]}")
        await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
        await slack.wait_for(lambda: any(call.status == 429 for call in slack.calls_to("chat.update")), timeout=60,
                             what="step 3 (add) to be announced")
        bot.kill()  # SIGKILL: after the remove, before the add
        async with open_store(tmp_path) as store:
            row = await plan_row(store, plan)
            assert row["state"] == "running" and row["current_step"] == 3
            assert (await audit_actions(store, row["id"])).count(("step_done", "remove")) == 1
        assert sorted(h.member.name for h in await members_of(c)) == ["member2", "member3"]

        bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, tmp_path / "bot.log").start)
        slack.bot_url = bot.url
        await slack.wait_for(lambda: any("was interrupted at step 3" in m.text for m in replies(slack, plan)),
                             what="the interruption notice")
        await ephemeral(slack, f"resume {row['id']}", user=LEAD)
        await slack.wait_for(lambda: any(f"Plan {row['id']} is done" in m.text for m in replies(slack, plan)),
                             timeout=120, what="the resumed plan to finish")
    finally:
        await asyncio.to_thread(bot.stop)
    async with open_store(tmp_path) as store:
        actions = await audit_actions(store, row["id"])
        final = await store.plan(row["id"])
    assert actions.count(("step_done", "remove")) == 1 and actions.count(("step_done", "add")) == 1
    members = await members_of(c)
    assert sorted(h.member.name for h in members) == ["member2", "member3", "member4"]
    assert [h.member.hex_id for h in members if h.member.name == "member4"] == [final["new_member_id"]]


async def test_slack_failing_during_a_plan(make_cluster, slack, start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]} --client-url {urls()[1]}")
    row = await plan_row(bot.ctx.store, plan)
    slack.fail_next("chat.update", status=500, count=2, match=announcing(4))        # retried: idempotent
    slack.fail_next("chat.postMessage", status=500, match=lambda a: "Step 1 (snapshot)" in str(a.get("text")))
    slack.fail_next("chat.postMessage", status=429, retry_after=1,
                    match=lambda a: "Step 2 (remove)" in str(a.get("text")))        # retried: not processed
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await wait_done(bot.ctx.store, row["id"])
    notes = [m.text for m in replies(slack, plan)]
    assert len(notes) == len(set(notes)), "a thread note was posted twice"
    assert sum("Step 2 (remove)" in n for n in notes) == 1
    assert not any("Step 1 (snapshot)" in n for n in notes)  # a 500 may have posted: never sent twice
    step4 = [call.status for call in slack.calls_to("chat.update") if announcing(4)(call.args)]
    assert step4 == [500, 500, 200]
    assert "*State:* DONE" in text_of(slack.find_message(CHANNEL, plan.ts))


async def test_a_locked_database_is_waited_for_then_refused_clearly(cluster, slack, start_bot, tmp_path):
    bot = await start_bot([cluster_table("prod", cluster)], database_timeout_seconds=0.3)
    db = sqlite3.connect(tmp_path / "etcd-chatops.db", isolation_level=None, check_same_thread=False)

    db.execute("BEGIN EXCLUSIVE")  # another writer, briefly: within the bounded retry
    threading.Timer(0.5, lambda: db.execute("COMMIT")).start()
    assert "HEALTHY" in text_of(await reply(slack, "status"))

    db.execute("BEGIN EXCLUSIVE")  # another writer, for longer than the bound
    try:
        msg = await ephemeral(slack, "status")
        assert "/etcd status did not run" in text_of(msg) and "locked by another writer" in text_of(msg)
    finally:
        db.execute("COMMIT")
        db.close()
    assert len([m for m in slack.messages if m.source == "chat.postMessage"]) == 1
    assert "HEALTHY" in text_of(await reply(slack, "status"))
    actions = [r["action"] for r in await bot.ctx.store.audit_rows()]
    assert actions == ["command", "command"]  # nothing ran unaudited, no row lost or half-written
    assert await bot.ctx.store.verify_audit() == (2, None)


async def test_load_200_commands_and_50_racing_approvals(make_cluster, slack, start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    deliveries = await asyncio.gather(*(slack.send_command("status", user_id="U0ONCALL01", channel_id=CHANNEL)
                                        for _ in range(200)))
    assert all(d.status == 200 for d in deliveries)
    assert max(d.elapsed for d in deliveries) < 3.0, sorted(d.elapsed for d in deliveries)[-5:]
    await slack.wait_for(lambda: len(slack.calls_to("chat.postMessage")) >= 200, timeout=60, what="200 replies")

    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]} --client-url {urls()[1]}")
    row = await plan_row(bot.ctx.store, plan)
    started = time.monotonic()
    approvals = await asyncio.gather(*(slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
                                       for _ in range(50)))
    assert all(d.status == 200 and d.elapsed < 3.0 for d in approvals)
    assert time.monotonic() - started < 30
    await wait_done(bot.ctx.store, row["id"])
    actions = await audit_actions(bot.ctx.store, row["id"])
    assert actions.count(("plan_approved", "")) == 1 and actions.count(("step_done", "add")) == 1
    assert sum("Approved by" in m.text for m in replies(slack, plan)) == 1
