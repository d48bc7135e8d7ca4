"""Nothing is lost or done twice when things break: real clusters, the real bot,
faults injected at precise moments.

To hit a moment exactly, the Slack stand-in holds one chosen progress update
until the test releases it: the executor announces a step (chat.update) before
it runs it, so it waits there, and the test acts in that window.
"""
from __future__ import annotations

import asyncio
import os
import selectors
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from bot.etcd.client import EtcdClient
from bot.etcd.health import check_cluster
from bot.store.base import StoreError
from bot.store.sqlite import SqliteStore
from bot.testing.cluster import free_port
from bot.testing.workspace import CHANNEL, LEAD, BotProcess, cluster_table, write_config
from helpers import (
    APPROVAL,
    OK,
    announcing,
    audit_actions,
    ephemeral,
    hold_at,
    live_markup,
    members_of,
    must,
    open_store,
    plan_row,
    propose,
    replies,
    reply,
    text_of,
    urls,
    wait_done,
)


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
    gate = hold_at(slack, 3)
    peer, client = urls()
    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}")
    row = await plan_row(store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await gate.reached()
    leader = await leader_name(c)
    c.kill(leader)  # the leader dies as the add is about to be sent; its supervisor restarts it
    await asyncio.to_thread(c.restart, leader)
    gate.release()  # the add meets the election the crash caused
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
    assert len(rows) == 1 and rows[0].member != killed


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
        gate = hold_at(slack, 3)
        plan = await propose(slack, f"replace member1 member4 {urls()[0]} --client-url {urls()[1]}")
        await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
        await gate.reached()
        bot.kill()  # SIGKILL: after the remove, before the add (the held call dies with it)
        async with open_store(tmp_path) as store:
            row = await plan_row(store, plan)
            assert row["state"] == "running" and row["current_step"] == 3
            assert (await audit_actions(store, row["id"])).count(("step_done", "remove")) == 1
        assert sorted(h.member.name for h in await members_of(c)) == ["member2", "member3"]

        bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, tmp_path / "bot.log").start)
        slack.bot_url = bot.url
        await slack.wait_for(lambda: any("was interrupted at step 3" in m.text for m in replies(slack, plan)),
                             timeout=20, what="the interruption notice")  # (released at once: SQLite, a dead process)
        assert not [live_markup(m) for m in replies(slack, plan) if live_markup(m)]  # `<reason>` is escaped
        listed = text_of(await reply(slack, "plans"))  # the one line that says why it stopped
        assert f"{row['id']}` INTERRUPTED" in listed and "interrupted at step 3 (add) when the bot stopped" in listed
        await ephemeral(slack, f"resume {row['id']}", user=LEAD)
        await slack.wait_for(lambda: any(f"Plan {row['id']} is done" in m.text for m in replies(slack, plan)),
                             timeout=120, what="the resumed plan to finish")
    finally:
        await asyncio.to_thread(bot.stop)
    async with open_store(tmp_path) as store:
        actions = await audit_actions(store, row["id"])
        final = must(await store.plan(row["id"]))
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
    # The plan is done in the store before its message's last update lands (that update may be retried).
    await slack.wait_for(lambda: "*State:* DONE" in text_of(slack.find_message(CHANNEL, plan.ts)),
                         what="the plan message to say DONE")
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
    actions = [r.action for r in await bot.ctx.store.audit_rows()]
    assert actions == ["command", "command"]  # nothing ran unaudited, no row lost or half-written
    assert await bot.ctx.store.verify_audit() == (2, None)


# ---------------------------------------------------------------- the state database unusable

def corrupt(db: Path) -> None:
    """Garbage where the database (and its WAL) was: a disk error, or the wrong file copied in."""
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if path.exists() or path == db:
            path.write_bytes(b"not sqlite " * 4096)


def foreign_schema(db: Path) -> None:
    """An old or another program's `plans` table, without most of the columns the bot uses."""
    conn = sqlite3.connect(db, isolation_level=None)
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'plans'").fetchone():
        conn.execute("ALTER TABLE plans RENAME TO plans_newer")
    conn.execute("CREATE TABLE plans (id TEXT PRIMARY KEY, cluster TEXT NOT NULL, state TEXT NOT NULL)")
    conn.close()


DAMAGE = [(corrupt, "file is not a database"), (foreign_schema, "table plans does not match this version of the bot")]


@pytest.mark.parametrize("damage, problem", DAMAGE)
def test_run_and_audit_verify_refuse_an_unusable_database_in_one_line(tmp_path, damage, problem):
    config = write_config(tmp_path, [{"name": "prod", "endpoints": ["http://127.0.0.1:1"], "channels": [CHANNEL]}])
    db = tmp_path / "etcd-chatops.db"
    damage(db)
    before = db.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLACK_")}
    env.update(SLACK_BOT_TOKEN="xoxb-x", SLACK_SIGNING_SECRET="s", SLACK_API_URL=f"http://127.0.0.1:{free_port()}")
    for argv in (["run", "--http", "--host", "127.0.0.1", "--port", str(free_port())], ["audit", "verify"]):
        proc = subprocess.run([sys.executable, "-m", "bot", *argv, "--config", str(config)], capture_output=True,
                              text=True, env=env, timeout=60)
        assert proc.returncode == 1, (argv, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and str(db) in proc.stderr and problem in proc.stderr, (argv, proc.stderr)
    assert db.read_bytes() == before  # refused, not "repaired" by creating the bot's tables in it


async def test_a_directory_in_place_of_the_database_is_named(tmp_path):
    (tmp_path / "state.db").mkdir()
    store = SqliteStore(tmp_path / "state.db")
    try:
        with pytest.raises(StoreError, match=r"state.db: is a directory, not a database file"):
            await store.open()
    finally:
        await store.close()


@pytest.mark.parametrize("damage, problem", DAMAGE)
async def test_a_database_that_breaks_while_serving(cluster, slack, start_bot, tmp_path, caplog, damage, problem):
    """The bot keeps serving: each command that needs the store says it is unavailable, and /readyz fails."""
    bot = await start_bot([cluster_table("prod", cluster)])
    assert "HEALTHY" in text_of(await reply(slack, "status"))
    damage(tmp_path / "etcd-chatops.db")
    for text in ("status", "plans"):
        msg = await ephemeral(slack, text)  # HTTP 200: acknowledged (it was a 404 after 3 s)
        assert f"/etcd {text} did not run: the bot's state store is unavailable: database " in text_of(msg)
        assert problem in text_of(msg)
    assert "This channel speaks for: prod" in text_of(await ephemeral(slack, "help"))  # needs no store
    assert "unknown subcommand" in text_of(await ephemeral(slack, "frobnicate"))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{bot.base_url}/readyz") as r:
            body = await r.json()
        assert r.status == 503 and not body["ready"] and problem in body["checks"]["database"]
        async with http.get(f"{bot.base_url}/healthz") as r:
            assert r.status == 200
        async with http.get(f"{bot.base_url}/metrics") as r:  # it answered 500
            assert r.status == 200 and "etcd_chatops_commands_total" in await r.text()
    posted = [m for m in slack.messages if m.source == "chat.postMessage"]
    start = len(slack.messages)
    await slack.react(user=LEAD, channel=CHANNEL, ts=posted[0].ts, reaction=OK)  # it logged a traceback
    told = await slack.wait_for_message(lambda m: m.ephemeral_to == LEAD, after=start, what="the reaction's answer")
    assert "reaction was not acted on: the bot's state store is unavailable" in text_of(told)
    assert len([m for m in slack.messages if m.source == "chat.postMessage"]) == 1
    assert not [r for r in caplog.records if r.exc_info or "ack()" in r.getMessage()]


def _connected_at_once(port: int, count: int, within: float = 0.5) -> int:
    """How many of `count` connections to 127.0.0.1:`port`, all begun at once, the kernel completes within
    `within` seconds. Called on the event loop, it blocks it: nothing is accepted meanwhile, as when the loop
    is busy, so what completes is what the listen queue holds. A SYN the kernel drops is retried after 1 s."""
    socks: list[socket.socket] = []
    with selectors.DefaultSelector() as sel:
        try:
            for _ in range(count):
                sock = socket.socket()
                socks.append(sock)
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                sel.register(sock, selectors.EVENT_WRITE)
            done, deadline = 0, time.monotonic() + within
            while done < count and (left := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(left):
                    sel.unregister(key.fileobj)
                    done += 1
            return done
        finally:
            for sock in socks:
                sock.close()


@pytest.mark.parametrize("listener", ["bot", "slack"])
async def test_a_burst_of_connections_while_the_loop_is_busy_waits_for_no_retransmission(
        make_cluster, slack, start_bot, listener):
    """Slack delivers a burst to the bot, and the bot opens one connection per Web API call (a fresh bot's
    burst of 200 commands asked auth.test 100 times, before the test below made it one).
    With aiohttp's default listen queue (128), 129 of 300 connections completed at once and the others
    waited out TCP's 1 s retransmission. Likely the cause of the load test's slowest acknowledgements at
    3.03 s (1 s + 2 s) beside a busy CPU: the kernel counted overflows of a Python listener's full queue."""
    bot = await start_bot([cluster_table("prod", make_cluster(1))])
    port = bot.port if listener == "bot" else int(slack.url.rsplit(":", 1)[1])
    assert _connected_at_once(port, 300) == 300


async def test_a_fresh_bot_asks_auth_test_once_for_a_burst_and_again_after_a_failure(make_cluster, slack, start_bot):
    """bolt asks auth.test on every request until an answer is cached: a fresh bot handed 200 commands at once
    asked 100 times before acknowledging them (the load test below). The bot asks once and the burst waits
    for that one answer; a failed answer is not kept, so the next request asks again."""
    await start_bot([cluster_table("prod", make_cluster(1))])
    asked = len(slack.calls_to("auth.test"))
    slack.fail_next("auth.test", status=200, error="invalid_auth")
    refused = await slack.send_command("status", user_id="U0ONCALL01", channel_id=CHANNEL)
    assert refused.status == 200 and "reinstall this app" in refused.body   # bolt's words to the person
    gate = slack.hold("auth.test")
    burst = asyncio.gather(*(slack.send_command("status", user_id="U0ONCALL01", channel_id=CHANNEL)
                             for _ in range(20)))
    await gate.reached()
    gate.release()
    deliveries = await burst
    assert [d.status for d in deliveries] == [200] * 20 and not any(d.body for d in deliveries)
    assert len(slack.calls_to("auth.test")) - asked == 2   # the failed one, then the one the burst shared
    await slack.wait_for(lambda: len(slack.calls_to("chat.postMessage")) >= 20, what="20 status replies")


async def test_load_200_commands_and_50_racing_approvals(make_cluster, slack, start_bot, warm_cluster):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    # Slack's 3 s is timed here: the next test's cluster, started in a thread of this process, is up first.
    # (A run beside a busy CPU once acknowledged the slowest 5 of 200 in 3.03 s; alone beside three, 0.34 s.
    # CI once took 6.02 s, when the burst still asked auth.test 100 times: see the test above.)
    await asyncio.to_thread(warm_cluster.settle)
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
