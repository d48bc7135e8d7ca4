"""Several replicas on one PostgreSQL: every replica serves Slack, exactly
one (the lease holder) executes, and a new leader takes over a dead one's plan.

Two real bot processes (`etcd-chatops run --http`, each on its own port) share
one database; the Slack stand-in sends each request to the replica a test names,
as a Service or Socket Mode would to either.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import psycopg
import pytest
from test_snapshots import fill

from bot.config import ReplicasConfig, load_config
from bot.domain.snapshot import SnapshotRecord
from bot.ops.leadership import LEASE
from bot.ops.snapshots import lease_name, take_snapshot
from bot.runtime.schedule import SCHEDULER, Scheduler
from bot.server import BotServer
from bot.settings import SlackSettings
from bot.store.backends import open_store
from bot.store.base import Store
from bot.testing.clock import ManualClock
from bot.testing.postgres import PASSWORD_ENV, LocalPostgres
from bot.testing.workspace import CHANNEL, LEAD, LEAD2, ONCALL, STRANGER, BotProcess, cluster_table, write_config
from helpers import (
    APPROVAL,
    OK,
    advance_until,
    audit_actions,
    command,
    depose,
    ephemeral,
    eventually,
    hold_at,
    members_of,
    plan_row,
    propose,
    replies,
    reply,
    text_of,
    thread,
    urls,
    wait_done,
)

LEASE_SECONDS = 3  # the shortest the config allows: a dead leader is replaced within 4 s, not the default's 13 s


class Replicas:
    """Bot processes sharing one database, and the test's own connection to it."""

    def __init__(self, config: Path, bots: list[BotProcess], store: Store, spawn: Callable[[int], BotProcess]):
        self.config, self.bots, self.store, self._spawn = config, bots, store, spawn

    async def add(self) -> BotProcess:
        """One more replica on the same database, started now (a scale-up, or a replica restarted)."""
        bot = self._spawn(len(self.bots))
        await asyncio.to_thread(bot.start)
        self.bots.append(bot)
        return bot

    def replica_id(self, bot: BotProcess) -> str:
        assert bot.proc is not None
        return f"{socket.gethostname()}-{bot.proc.pid}"  # the default replica_id: hostname-pid

    async def leader(self, timeout: float = 15.0, among: list[BotProcess] | None = None) -> BotProcess:
        """The replica holding the executor lease (waiting for one to take it)."""
        by_id = {self.replica_id(b): b for b in among or self.bots}

        async def holder() -> BotProcess | None:
            lease = await self.store.lease(LEASE)
            return by_id.get(lease.holder) if lease else None
        return await eventually(holder, timeout, "a replica to hold the executor lease", interval=0.05)

    async def follower(self) -> BotProcess:
        leader = await self.leader()
        return next(b for b in self.bots if b is not leader)


@pytest.fixture
async def replicas(postgres: LocalPostgres, slack, creds, tmp_path,
                   monkeypatch) -> AsyncIterator[Callable[..., Awaitable[Replicas]]]:
    """Start `n` bot processes on one fresh PostgreSQL database, stopped (and the store closed) after the test."""
    started: list[BotProcess] = []
    stores: list[Store] = []

    async def start(clusters: list[dict], n: int = 2, pg: LocalPostgres | None = None,
                    lease_seconds: float = LEASE_SECONDS, **top) -> Replicas:
        pg = pg or postgres
        config = write_config(tmp_path, clusters, database=pg.create_database(), database_password_env=PASSWORD_ENV,
                              replicas={"lease_seconds": lease_seconds}, **top)
        env = pg.env()

        def spawn(i: int) -> BotProcess:
            bot = BotProcess(config, slack.api_url, creds, tmp_path / f"bot-{i}.log", env=env)
            started.append(bot)
            return bot
        bots = [spawn(i) for i in range(n)]
        await asyncio.gather(*(asyncio.to_thread(b.start) for b in bots))
        slack.bot_url = None  # every request names its replica
        for name, value in pg.env().items():  # the test reads the bots' config as they do
            monkeypatch.setenv(name, value)
        store = await open_store(load_config(config))
        stores.append(store)
        return Replicas(config, bots, store, spawn)

    yield start
    await asyncio.gather(*(asyncio.to_thread(b.stop) for b in started))
    for store in stores:
        await store.close()


@pytest.fixture
def own_postgres() -> Iterator[LocalPostgres]:
    """A PostgreSQL of the test's own, to restart without disturbing the others' (torn down after `replicas`)."""
    with LocalPostgres() as pg:
        yield pg


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, await r.text()


# ---------------------------------------------------------------- every replica serves Slack

async def test_both_replicas_answer_commands_and_are_ready_while_one_leads(cluster, slack, replicas):
    group = await replicas([cluster_table("prod", cluster)])
    for bot in group.bots:
        assert "HEALTHY" in text_of(await reply(slack, "status", to=bot.url))
        assert "unknown subcommand" in text_of(await ephemeral(slack, "frobnicate", to=bot.url))
    leader = await group.leader()
    roles, leading = {}, 0.0
    for bot in group.bots:
        status, body = await _get(f"{bot.base_url}/readyz")
        ready = json.loads(body)
        assert status == 200 and ready["ready"], ready  # a follower is ready: it serves Slack
        roles[bot.port] = ready["checks"]["role"]
        _, metrics = await _get(f"{bot.base_url}/metrics")
        leading += float(next(line.split()[-1] for line in metrics.splitlines()
                              if line.startswith("etcd_chatops_leader ")))
        assert 'etcd_chatops_lease_renewals_total{outcome=' in metrics
    assert leading == 1.0
    assert sorted(roles.values()) == ["follower", "leader"] and roles[leader.port] == "leader"


async def test_a_redelivered_event_is_dropped_by_the_other_replica(make_cluster, slack, replicas):
    c = make_cluster(3)
    group = await replicas([cluster_table("prod", c)], approval=APPROVAL)
    c.kill("member1")
    a, b = group.bots
    plan = await propose(slack, f"replace member1 member4 {urls()[0]}", to=a.url)
    row = await plan_row(group.store, plan)
    first = await slack.react(user=STRANGER, channel=CHANNEL, ts=plan.ts, reaction=OK, to=a.url)
    await slack.wait_for(lambda: "is not an approver" in thread(slack, plan), what="the refusal")
    again = await slack.react(user=STRANGER, channel=CHANNEL, ts=plan.ts, reaction=OK, to=b.url,
                              event_id=first.event_id, retry_num=1, retry_reason="http_timeout")
    assert again.status == 200
    # A new reaction (a new event) through B is acted on: so B had the chance to act on the redelivery too.
    await slack.react(user=STRANGER, channel=CHANNEL, ts=plan.ts, reaction="x", to=b.url)
    await slack.wait_for(lambda: "not rejected" in thread(slack, plan), what="the second refusal")
    refusals = [a for a, _ in await audit_actions(group.store, row["id"]) if a == "approve_refused"]
    assert refusals == ["approve_refused"]
    assert not any(m.ephemeral_to == STRANGER and "not an approver" in text_of(m) for m in slack.messages)


async def test_a_click_redelivered_to_the_other_replica_counts_once(make_cluster, slack, replicas):
    """Slack may deliver a click twice, each time to any replica: the trigger_id keys it in the shared store, so
    the approval counts once and nobody is told they approved twice."""
    c = make_cluster(3)
    group = await replicas([cluster_table("prod", c)], approval={**APPROVAL, "replace": {"approvals_needed": 2}})
    c.kill("member1")
    a, b = group.bots
    plan = await propose(slack, f"replace member1 member4 {urls()[0]}", to=a.url)
    row = await plan_row(group.store, plan)
    first = await slack.click(LEAD, plan, "plan_approve", to=a.url)
    again = await slack.deliver_interaction(slack.interactions[-1], to=b.url)
    assert (first.status, again.status) == (200, 200) and max(first.elapsed, again.elapsed) < 3
    await slack.wait_for(lambda: "Approval 1 of 2" in thread(slack, plan), what="the approval")
    # A new click through B is acted on: so B had the chance to act on the redelivery too.
    await slack.click(STRANGER, plan, "plan_approve", to=b.url)
    await slack.wait_for(lambda: any(m.ephemeral_to == STRANGER and "is not an approver" in text_of(m)
                                     for m in slack.messages), what="B's refusal")
    assert (await group.store.plan(row["id"])).approvals == (LEAD,)
    assert not any(m.ephemeral_to == LEAD for m in slack.messages), "a redelivery is not a double click"


async def test_a_socket_mode_envelope_redelivered_to_the_other_connection_is_dropped(cluster, postgres, slack, creds,
                                                                                    tmp_path, monkeypatch):
    """Two replicas in Socket Mode (in-process), each with its own connection; Slack redelivers an
    unacknowledged-looking envelope to the other one, which drops it by its envelope_id."""
    monkeypatch.setenv(PASSWORD_ENV, postgres.password)
    config = load_config(write_config(tmp_path, [cluster_table("prod", cluster)], database=postgres.create_database(),
                                      database_password_env=PASSWORD_ENV))
    settings = SlackSettings(bot_token=creds.bot_token, signing_secret=None, app_token=creds.app_token,
                             api_url=slack.api_url)
    bots = [BotServer(replace(config, replicas=ReplicasConfig(replica_id=name)), settings, socket_mode=True)
            for name in ("replica-a", "replica-b")]  # one process: hostname-pid would name both alike
    try:
        for bot in bots:
            await bot.start()
        await eventually(lambda: len([s for s in slack._sockets if not s.closed]) == 2, 10, "two connections")
        start = len(slack.messages)
        first = await slack.send_command("status", user_id=LEAD, channel_id=CHANNEL, to=0)
        again = await slack.send_command("status", user_id=LEAD, channel_id=CHANNEL, to=1,
                                         envelope_id=first.envelope_id)
        assert first.status == again.status == 200 and again.envelope_id == first.envelope_id
        await slack.wait_for_message(lambda m: m.source == "chat.postMessage", after=start, timeout=20)
        other = await slack.send_command("members", user_id=LEAD, channel_id=CHANNEL, to=1)  # B does answer
        await slack.wait_for(lambda: len([m for m in slack.messages[start:] if m.source == "chat.postMessage"]) == 2,
                             timeout=20, what="the answer to the second, new command")
        assert other.status == 200
        posted = [text_of(m) for m in slack.messages[start:] if m.source == "chat.postMessage"]
        assert [t.startswith("cluster prod: HEALTHY") for t in posted] == [True, False], posted
    finally:
        for bot in bots:
            await bot.stop()


# ---------------------------------------------------------------- exactly one replica executes

async def test_a_plan_proposed_through_one_replica_and_approved_through_the_other_runs_once_on_the_leader(
        make_cluster, slack, replicas):
    c = make_cluster(3)
    group = await replicas([cluster_table("prod", c)], approval=APPROVAL)
    c.kill("member1")
    leader, follower = await group.leader(), await group.follower()
    peer, client = urls()
    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}", to=leader.url)
    row = await plan_row(group.store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK, to=follower.url)
    done = await wait_done(group.store, row["id"])
    assert done["decided_by"] == LEAD
    rows = [json.loads(r.detail) for r in await group.store.audit_rows() if r.action == "step_done"]
    assert {r["replica"] for r in rows if r["plan"] == row["id"]} == {group.replica_id(leader)}
    actions = await audit_actions(group.store, row["id"])
    assert actions.count(("step_done", "remove")) == 1 and actions.count(("step_done", "add")) == 1
    assert sorted(h.member.name for h in await members_of(c)) == ["member2", "member3", "member4"]
    assert sum("Approved by" in m.text for m in replies(slack, plan)) == 1


@pytest.mark.slow
async def test_racing_approvals_run_once_and_a_killed_leader_is_replaced_mid_plan(make_cluster, slack, replicas):
    """Approvals race through both replicas: one execution. The leader is SIGKILLed
    between the remove and the add: the other replica takes over within 15 s and
    finishes with exactly one remove and one add; the audit chain verifies."""
    c = make_cluster(3)
    group = await replicas([cluster_table("prod", c)], approval=APPROVAL)
    c.kill("member1")
    leader, follower = await group.leader(), await group.follower()
    gate = hold_at(slack, 3)  # holds the leader before the add (the new leader's announcement passes)
    peer, client = urls()
    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}", to=follower.url)
    row = await plan_row(group.store, plan)
    await asyncio.gather(slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK, to=follower.url),
                         slack.react(user=LEAD2, channel=CHANNEL, ts=plan.ts, reaction=OK, to=leader.url))
    await gate.reached(timeout=90)
    assert sum("Approved by" in m.text for m in replies(slack, plan)) == 1
    assert "changes nothing" in thread(slack, plan)

    killed_at = time.monotonic()
    leader.kill()
    new = await group.leader(timeout=15, among=[follower])
    took_over = await eventually(lambda: any("took over plan" in m.text for m in replies(slack, plan)), 15,
                                 "the takeover note")
    assert took_over and time.monotonic() - killed_at < 15
    assert new is follower
    done = await wait_done(group.store, row["id"])
    members = await members_of(c)
    assert sorted(h.member.name for h in members) == ["member2", "member3", "member4"]
    assert all(h.healthy for h in members)
    assert [h.member.hex_id for h in members if h.member.name == "member4"] == [done["new_member_id"]]
    actions = await audit_actions(group.store, row["id"])
    assert actions.count(("step_done", "remove")) == 1 and actions.count(("step_done", "add")) == 1
    assert actions.count(("plan_approved", "")) == 1 and ("plan_taken_over", "add") in actions
    count, problem = await group.store.verify_audit()
    assert problem is None and count > 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLACK_")}  # with the bots' database password
    verified = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bot", "audit", "verify", "--config", str(group.config)],
        capture_output=True, text=True, timeout=60, env=env)
    assert verified.returncode == 0 and "intact" in verified.stdout, verified.stdout + verified.stderr


# ---------------------------------------------------------------- the database restarted

async def test_postgresql_restarted_while_idle_both_replicas_reconnect_and_answer(cluster, slack, own_postgres,
                                                                                    replicas):
    group = await replicas([cluster_table("prod", cluster)], pg=own_postgres)
    for bot in group.bots:
        assert "HEALTHY" in text_of(await reply(slack, "status", to=bot.url))
    await asyncio.to_thread(own_postgres.restart)
    # Every command gets an answer: the status, or a clear refusal while the pool reconnects.
    for bot in group.bots:
        start = len(slack.messages)
        delivery = await slack.send_command("status", user_id=LEAD, channel_id=CHANNEL, to=bot.url)
        assert delivery.status == 200
        answer = await slack.wait_for_message(lambda m: m.source == "chat.postMessage" or m.ephemeral_to == LEAD,
                                              after=start, timeout=20, what="an answer after the restart")
        assert "HEALTHY" in text_of(answer) or "state store is unavailable" in text_of(answer), text_of(answer)
    for bot in group.bots:  # and both are back to normal
        assert "HEALTHY" in text_of(await reply(slack, "status", to=bot.url))
    assert await group.leader() in group.bots


async def test_postgresql_down_while_a_plan_runs_the_leader_takes_it_up_again(make_cluster, slack, own_postgres,
                                                                               replicas):
    """PostgreSQL goes away between two steps of a replacement, for less than the lease: the leader's run cannot
    record its progress, so the leader steps down and its next tenure takes the plan over, re-checking the step in
    flight; the plan ends done. Before, the run died with the database's error and the plan stayed running with
    the leader still leading, which takes plans over only at a new tenure: stuck for good."""
    c = make_cluster(3)
    group = await replicas([cluster_table("prod", c)], n=1, pg=own_postgres, lease_seconds=12,
                           approval=APPROVAL, database_timeout_seconds=0.5)
    c.kill("member1")
    gate = hold_at(slack, 3)  # holds the run before the add
    peer, client = urls()
    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}", to=group.bots[0].url)
    row = await plan_row(group.store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK, to=group.bots[0].url)
    await gate.reached()
    await asyncio.to_thread(own_postgres.stop)
    gate.release()   # the run goes on to record the add, with the database gone
    log = group.bots[0].log_file
    await eventually(lambda: "background task failed" in log.read_text() or "stepped down" in log.read_text(), 30,
                     "the run to meet the stopped database")
    await asyncio.to_thread(own_postgres.start)
    done = await wait_done(group.store, row["id"], timeout=45)
    members = await members_of(c)
    assert sorted(h.member.name for h in members) == ["member2", "member3", "member4"]
    assert [h.member.hex_id for h in members if h.member.name == "member4"] == [done["new_member_id"]]
    actions = await audit_actions(group.store, row["id"])
    assert actions.count(("step_done", "remove")) == 1 and actions.count(("step_done", "add")) == 1
    assert ("plan_taken_over", "add") in actions
    assert any("took over plan" in m.text for m in replies(slack, plan))


async def test_a_deposed_leader_stops_before_its_next_action_and_leaves_the_plan_running(make_cluster, slack,
                                                                                         start_bot):
    """Another holder takes the lease while the leader announces the add step: the leader does not
    send the add, records nothing more, and does not call the plan failed: the new leader resumes it."""
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store, me = bot.ctx.store, bot.ctx.leadership
    c.kill("member1")
    gate = hold_at(slack, 3)
    peer, client = urls()
    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}")
    row = await plan_row(store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await gate.reached()

    await eventually(lambda: depose(store, me.replica_id), 5, "another replica to take the lease")
    gate.release()
    await eventually(lambda: not bot.ctx.running, 20, "the deposed leader's run to stop")
    assert not bot.ctx.is_leader()
    record = await store.plan(row["id"])
    assert record is not None and record.state == "running" and record.current_step == 3 and not record.error
    assert sorted(h.member.name for h in await members_of(c)) == ["member2", "member3"]  # the add was not sent
    actions = await audit_actions(store, row["id"])
    assert ("step_done", "remove") in actions and ("step_done", "add") not in actions
    assert not any(a == "step_failed" for a, _ in actions)
    assert not any("stopped" in m.text or "failed" in m.text for m in replies(slack, plan))


# ---------------------------------------------------------------- only the leader watches

async def test_only_the_leader_watches_and_its_successor_resolves_the_same_alert(make_cluster, slack, replicas):
    """Two replicas watch one cluster: a dead member gives one alert, not one per replica; when the
    leader dies, the new leader carries that alert on (no second post) and resolves it in its thread."""
    c = make_cluster(3)
    group = await replicas([cluster_table("prod", c, watch={"interval": "1s", "grace": "2s"}, timeout_seconds=0.5)])
    leader = await group.leader()

    def member_down() -> list:
        return [m for m in slack.channel_messages(CHANNEL, include_threads=False, include_ephemeral=False)
                if m.source == "chat.postMessage" and "MEMBER DOWN" in m.text]

    c.kill("member1")
    (alert,) = await eventually(lambda: member_down() or None, 20, "the member-down alert")
    await more(leader, 'etcd_chatops_watch_rounds_total{cluster="prod"}', 3)   # the alert lasts: edits only
    assert len(member_down()) == 1, "both replicas posted"
    follower = next(b for b in group.bots if b is not leader)
    assert await counted(follower, 'etcd_chatops_watch_rounds_total{cluster="prod"}') == 0, "the follower watched"
    leader.kill()
    successor = await group.leader(timeout=20, among=[b for b in group.bots if b is not leader])
    await asyncio.to_thread(c.restart, "member1")
    await slack.wait_for(lambda: "resolved after" in thread(slack, alert), timeout=30,
                         what=f"the alert resolved by {successor.url}")
    assert len(member_down()) == 1, "the new leader posted the alert again"


# ---------------------------------------------------------------- only the leader takes scheduled snapshots

EVERY = 60.0  # `every = "1m"`, the shortest schedule the config allows


def scheduled_posts(slack) -> list[str]:
    return [text_of(m) for m in slack.channel_messages(CHANNEL, include_threads=False, include_ephemeral=False)
            if m.source == "chat.postMessage" and "Scheduled snapshot of prod" in text_of(m)]


async def scheduled_rows(group: Replicas) -> list[SnapshotRecord]:
    return [r for r in await group.store.snapshots("prod") if r.reason == "scheduled"]


async def snapshots_taken(bot: BotProcess) -> float:
    """What this replica's /metrics says it took: another replica's snapshot is not counted there."""
    _, metrics = await _get(f"{bot.base_url}/metrics")
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith('etcd_chatops_snapshot_duration_seconds_count{cluster="prod"}'))


async def a_minute_passes(group: Replicas) -> None:
    """Move the scheduled snapshots a schedule period back in the shared catalog, where the schedule reads
    its last run: the next tick is due now, as a minute later, without the test waiting that minute."""
    config = load_config(group.config)
    assert isinstance(config.database, str)
    async with await psycopg.AsyncConnection.connect(config.database, password=config.database_password,
                                                     autocommit=True) as conn:
        await conn.execute("UPDATE snapshots SET created_at = created_at - %s WHERE reason = 'scheduled'", [EVERY])


async def counted(bot: BotProcess, series: str) -> float:
    """A counter on the replica's /metrics page (0 when it has none yet)."""
    _, metrics = await _get(f"{bot.base_url}/metrics")
    return next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(series + " ")), 0.0)


async def more(bot: BotProcess, series: str, n: int = 2) -> None:
    """Wait until the replica's counter `series` went up `n` more: so many more watch rounds or passes over the
    schedules ran (before counting what they did not do)."""
    start = await counted(bot, series)

    async def grown() -> bool:
        return await counted(bot, series) >= start + n
    await eventually(grown, 30, f"{n} more {series} on {bot.base_url}")


PASSES = "etcd_chatops_upkeep_passes_total"


@pytest.mark.slow
async def test_two_replicas_take_one_scheduled_snapshot_per_due_tick_on_the_leader(cluster, slack, replicas):
    """A second replica starts while a tick is due: it leaves the tick to the leader. (The leader's
    pass waits meanwhile for the cluster's snapshot lease, which the test holds as another replica's
    running snapshot would, so the tick stays due while the second replica looks at it.) Each tick
    gives one snapshot in the catalog and one post, and the follower's /metrics count none."""
    group = await replicas([cluster_table("prod", cluster, snapshots={"every": "1m"})], n=1)
    (a,) = group.bots
    assert await group.leader() is a
    await eventually(lambda: len(scheduled_posts(slack)) == 1, 30, "the scheduled snapshot taken at start-up")
    assert len(await scheduled_rows(group)) == 1
    assert await group.store.acquire_lease(lease_name("prod"), "another-replica", 60) is not None
    await a_minute_passes(group)
    b = await group.add()
    assert await group.follower() is b
    await more(b, PASSES, 3)   # the follower looked at the due tick, three times
    await group.store.release_lease(lease_name("prod"), "another-replica")
    await eventually(lambda: len(scheduled_posts(slack)) >= 2, 30, "the second tick's scheduled snapshot")
    await more(a, PASSES)
    assert len(scheduled_posts(slack)) == 2, scheduled_posts(slack)
    rows = await scheduled_rows(group)
    assert len(rows) == 2 and len({r.path for r in rows}) == 2
    assert (await snapshots_taken(a), await snapshots_taken(b)) == (2, 0)
    told = b.log_file.read_text()  # the follower neither waited for the leader's snapshot nor failed one of its own
    assert "taking a snapshot" not in told and "scheduled snapshot" not in told, told


async def test_a_new_leader_takes_over_the_snapshot_schedule(cluster, slack, replicas):
    """Two replicas start together: one scheduled snapshot, by the leader. The leader is
    SIGKILLed; the next tick comes due; the survivor takes it within 15 s of the kill, and
    it is the only new one."""
    group = await replicas([cluster_table("prod", cluster, snapshots={"every": "1m"})])
    leader, follower = await group.leader(), await group.follower()
    await eventually(lambda: len(scheduled_posts(slack)) >= 1, 30, "the scheduled snapshot taken at start-up")
    await asyncio.gather(more(leader, PASSES), more(follower, PASSES))
    assert len(scheduled_posts(slack)) == 1 and len(await scheduled_rows(group)) == 1
    assert (await snapshots_taken(leader), await snapshots_taken(follower)) == (1, 0)

    killed_at, killed_wall = time.monotonic(), time.time()
    leader.kill()
    await a_minute_passes(group)  # before the survivor leads: the lease lapses only LEASE_SECONDS after a renewal
    assert await group.leader(timeout=15, among=[follower]) is follower
    await eventually(lambda: len(scheduled_posts(slack)) >= 2, 15, "a scheduled snapshot by the new leader")
    assert time.monotonic() - killed_at < 15
    await more(follower, PASSES)
    assert len(scheduled_posts(slack)) == 2, scheduled_posts(slack)
    newest, _ = await scheduled_rows(group)
    assert newest.created_at > killed_wall and newest.requested_by == SCHEDULER
    assert await snapshots_taken(follower) == 1


async def test_a_leader_deposed_during_a_scheduled_pass_starts_no_further_snapshot(make_cluster, slack, start_bot):
    """Two clusters are due in one pass. While the first one's result is being posted, another
    replica takes the lease: the deposed leader does not go on to snapshot the second cluster
    (the new leader's schedule does, from the shared catalog)."""
    clock = ManualClock()   # the upkeep's start-up pass, then only the pass the test drives
    a, b = make_cluster(1), make_cluster(1)
    server = await start_bot([cluster_table(name, c, snapshots={"every": "1m"}) for name, c in (("a", a), ("b", b))],
                             replicas={"lease_seconds": 3}, clock=clock)
    ctx = server.ctx

    def posted(name: str) -> int:
        return sum(f"Scheduled snapshot of {name}" in text_of(m) for m in slack.messages
                   if m.source == "chat.postMessage")
    await eventually(ctx.is_leader, 10, "the bot to lead")   # (in real time: the lease's clock)
    await advance_until(clock, lambda: posted("a") == posted("b") == 1, 10, "start-up pass over both clusters")
    gate = slack.hold("chat.postMessage", match=lambda args: "Scheduled snapshot of a" in str(args))
    run = asyncio.create_task(Scheduler(ctx).run_due(now=time.time() + EVERY))
    await gate.reached(timeout=30)   # the pass posts cluster a's snapshot, and waits there
    await eventually(lambda: depose(ctx.store, ctx.leadership.replica_id), 5, "another replica to take the lease")
    await eventually(lambda: not ctx.is_leader(), 3, "the leader to learn it was deposed")
    gate.release()
    assert await run == ["a"]
    assert (posted("a"), posted("b")) == (2, 1)
    assert [len(await ctx.store.snapshots(name)) for name in ("a", "b")] == [2, 1]


async def test_a_tick_another_replica_took_while_this_one_waited_is_not_taken_twice(make_cluster, slack, start_bot):
    """A deposed leader's scheduled snapshot runs on while the new leader's pass finds the tick due
    and waits for the cluster's snapshot lease. Once the lease is its own it asks again: the other
    replica's snapshot is in the shared catalog, so it takes none and posts nothing (before: a
    second snapshot and a second post for one tick). An on-call's request that joined the
    scheduled snapshot meanwhile still gets a snapshot of its own."""
    clock = ManualClock()   # the upkeep's start-up pass, then only the pass the test drives
    c = make_cluster(1)
    server = await start_bot([cluster_table("a", c, snapshots={"every": "1m"})], replicas={"lease_seconds": 3},
                             clock=clock)
    ctx = server.ctx

    def posted() -> int:
        return sum("Scheduled snapshot of a" in text_of(m) for m in slack.messages if m.source == "chat.postMessage")
    await eventually(ctx.is_leader, 10, "the bot to lead")   # (in real time: the lease's clock)
    await advance_until(clock, lambda: posted() == 1, 10, "start-up pass")
    assert await ctx.store.acquire_lease("snapshot:a", "another-replica", 60) is not None  # its snapshot runs
    run = asyncio.create_task(Scheduler(ctx).run_due(now=time.time() + EVERY))
    await eventually(lambda: "a" in ctx.running_snapshots, 10, "the pass to wait for the cluster's lease")
    asked = asyncio.create_task(take_snapshot(ctx, ctx.config.clusters[0], requested_by=ONCALL, reason="manual"))

    async def joined() -> bool:
        return any(r.action == "snapshot_joined" for r in await ctx.store.audit_rows())
    await eventually(joined, 10, "an on-call's request to join the scheduled snapshot")
    (first,) = await ctx.store.snapshots("a")  # the other replica's snapshot ends: catalogued, lease given back
    await ctx.store.record_snapshot(replace(first, created_at=time.time() + EVERY, path=first.path + ".other"))
    await ctx.store.release_lease("snapshot:a", "another-replica")
    assert await asyncio.wait_for(run, 30) == []
    assert posted() == 1
    saved = await asyncio.wait_for(asked, 30)  # the on-call still gets the snapshot asked for
    rows = await ctx.store.snapshots("a")
    assert len(rows) == 3 and [r.path for r in rows if r.requested_by == ONCALL] == [str(saved.path)]


# ---------------------------------------------------------------- off-site uploads: one bucket, two replicas

async def test_a_replica_snapshot_waits_for_the_other_and_never_aborts_its_running_upload(make_cluster, slack,
                                                                                           replicas, s3):
    """Both replicas upload to one bucket and prefix. While A streams a snapshot off-site, B is
    asked for one: B's first upload would abort the cluster's leftover uploads, but A's is alive
    (it holds the cluster's snapshot lease in the shared store), so B waits for it. A's upload
    is never aborted (no retry from its local file), both end verified remotely, one after the other."""
    c = make_cluster(1)
    await fill(c, 60)  # ~64 MB: A's upload is under way when B is asked
    group = await replicas([cluster_table("prod", c, snapshots={"store": s3.store_table()})])
    a, b = group.bots
    start = len(slack.messages)
    await command(slack, "snapshot", to=a.url)
    await eventually(lambda: asyncio.to_thread(s3.unfinished_uploads), 60, "A's multipart upload to start",
                     interval=0.01)
    await command(slack, "snapshot", to=b.url)

    def done() -> list[str]:
        texts = [text_of(m) for m in slack.messages[start:] if m.source == "chat.postMessage"]
        return [t for t in texts if "*File:*" in t]
    texts = await eventually(lambda: d if len(d := done()) == 2 else None, 180, "both replicas' snapshots")
    told = [text_of(m) for m in slack.messages[start:] if m.ephemeral_to == ONCALL]
    assert any(f"is running on replica `{group.replica_id(a)}`; yours starts when it ends" in t for t in told), told
    assert all("verified remotely" in t for t in texts), texts
    logs = a.log_file.read_text() + b.log_file.read_text()
    assert "aborted unfinished uploads" not in logs and "retrying from the local file" not in logs
    first, second = sorted(await group.store.snapshots("prod"), key=lambda r: r.created_at)
    assert first.remote_state == second.remote_state == "verified"
    assert second.created_at >= first.remote_verified_at, "the replicas snapshotted the cluster at once"
    assert "snapshot_offsite_failed" not in [r.action for r in await group.store.audit_rows()]
    assert s3.unfinished_uploads() == [] and len(s3.keys("prod/prod/")) == 4  # two snapshots, two manifests


async def test_a_replica_killed_mid_upload_leaves_a_leftover_the_other_aborts_once_the_lease_lapses(
        make_cluster, slack, replicas, s3):
    """B has snapshotted (and looked for leftovers) already; A is killed mid-upload. B's next snapshot
    waits for A's lease to lapse, then aborts A's unfinished upload: another replica held the
    cluster's lease since B's last snapshot, so B looks again."""
    c = make_cluster(1)
    await fill(c, 60)
    group = await replicas([cluster_table("prod", c, snapshots={"store": s3.store_table()})])
    a, b = group.bots
    assert "verified remotely" in text_of(await reply(slack, "snapshot", to=b.url, timeout=120))
    await command(slack, "snapshot", to=a.url)
    await eventually(lambda: asyncio.to_thread(s3.unfinished_uploads), 60, "A's multipart upload to start",
                     interval=0.01)
    a.kill()
    assert len(s3.unfinished_uploads()) == 1
    c.etcdctl("put", "/next", "x")
    assert "verified remotely" in text_of(await reply(slack, "snapshot", to=b.url, timeout=120))
    assert s3.unfinished_uploads() == []
    assert "aborted unfinished uploads" in b.log_file.read_text()
