"""The watch on real clusters, through the real bot and the Slack stand-in: the bot notices a dead
member, a NOSPACE alarm, a flapping member on its own, posts one message per condition with the
next command, edits it, and resolves it in its thread.

The watch keeps a clock the test moves (bot.testing.clock): each `advance(INTERVAL)` is one whole
round against the real cluster, so a test says in which round an alert comes instead of waiting
for it. The tests about real time (a black-holed cluster next to a live one, a mute ending by
itself) keep the system's clock."""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

from bot.config import load_config
from bot.domain.record import NewAlert
from bot.etcd.client import EtcdClient
from bot.ops.context import BotContext
from bot.ops.notify import PlainDirectory, PlainNotifier
from bot.output.blocks import Reply
from bot.testing.clock import ManualClock
from bot.testing.slack import Message, SlackStandIn
from bot.testing.workspace import CHANNEL, LEAD, cluster_table, write_config
from bot.watch.conditions import CONDITIONS, Condition, Facts, Finding
from bot.watch.tracker import FLAP_MIN
from bot.watch.watcher import Watcher
from helpers import (
    APPROVAL,
    OK,
    QUOTA_ARGS,
    advance_until,
    ephemeral,
    eventually,
    fill_until_nospace,
    hold_at,
    members_of,
    open_store,
    plan_row,
    propose,
    reply,
    text_of,
    thread,
    urls,
    wait_done,
    wait_state,
    watching,
)

INTERVAL, GRACE = 1.0, 2.0
MARGIN = 5.0           # on the system's clock: every alert within interval + grace + 5 s
WATCH = {"interval": f"{INTERVAL:g}s", "grace": f"{GRACE:g}s"}
ROUNDS = round((INTERVAL + GRACE) / INTERVAL)   # the round that first sees a condition, and grace's


def watched(name: str, cluster, **extra) -> dict:
    """A cluster table with a fast watch and a short deadline (a silent member costs 0.5 s)."""
    return cluster_table(name, cluster, **{"watch": WATCH, "timeout_seconds": 0.5, **extra})


def alerts(slack: SlackStandIn, word: str, channel: str = CHANNEL) -> list[Message]:
    """The watch's top-level messages of one condition (by its headline word, e.g. MEMBER DOWN)."""
    return [m for m in slack.channel_messages(channel, include_threads=False, include_ephemeral=False)
            if m.source == "chat.postMessage" and m.thread_ts is None and word in m.text]


async def first_alert(slack: SlackStandIn, word: str, timeout: float, channel: str = CHANNEL, bot=None) -> Message:
    try:
        return await slack.wait_for(lambda: next(iter(alerts(slack, word, channel)), None), timeout,
                                    f"a {word} alert in {channel}")
    except TimeoutError as e:   # say what the watch was tracking
        watcher = bot.runtime.watcher if bot else None
        tracks = {name: w.tracker.tracks for name, w in watcher.clusters.items()} if watcher else "?"
        raise AssertionError(f"{e}; the watch tracks {tracks}") from None


def metrics(bot) -> str:
    with urllib.request.urlopen(f"{bot.base_url}/metrics", timeout=5) as resp:
        return resp.read().decode()


async def test_a_dead_member_is_one_alert_then_resolved_in_its_thread(make_cluster, slack, start_bot):
    c = make_cluster(3)
    clock = ManualClock()
    bot = await start_bot([watched("prod", c)], clock=clock)
    await watching(bot.runtime.watcher, clock)
    c.kill("member1")
    alert, rounds = await advance_until(clock, lambda: next(iter(alerts(slack, "MEMBER DOWN member1")), None),
                                       ROUNDS, "member-down alert")
    assert rounds == ROUNDS, "posted before the condition lasted its grace"   # and not a round later
    shown = text_of(alert)
    for expected in ("member1", "/etcd replace member1 member4 http://NEW-HOST:", "--cluster prod`",
                     "`/etcd status prod`", "2 of 3 voters healthy"):
        assert expected in shown, f"{expected!r} missing from the alert: {shown}"
    assert 'etcd_chatops_alerts_open{cluster="prod",condition="member_down"} 1.0' in await asyncio.to_thread(
        metrics, bot)
    listing = await reply(slack, "alerts")
    assert "1 open condition" in listing.text and "member down member1" in listing.text

    await asyncio.to_thread(c.restart, "member1")
    _, rounds = await advance_until(clock, lambda: "resolved after" in thread(slack, alert), 3 * ROUNDS,
                                   "resolution in the alert's thread")
    assert rounds >= ROUNDS, "resolved before the member was back for its grace"
    assert "resolved after" in alert.text and "/etcd replace" not in text_of(alert)   # the message says so too
    assert len(alerts(slack, "MEMBER DOWN")) == 1, "exactly one alert"
    page = await asyncio.to_thread(metrics, bot)
    assert 'etcd_chatops_alerts_open{cluster="prod",condition="member_down"} 0.0' in page
    assert 'etcd_chatops_alerts_posted_total{cluster="prod",condition="member_down"} 1.0' in page
    assert "no open conditions" in (await reply(slack, "alerts")).text


async def test_a_flapping_member_is_one_message_that_says_so(make_bed, slack, start_bot):
    c = make_bed(3)
    clock = ManualClock()
    bot = await start_bot([watched("prod", c)], clock=clock)
    await watching(bot.runtime.watcher, clock)
    for cycle in range(1, FLAP_MIN + 1):   # its host off the network for one round, back for one: shorter than grace
        c.isolate("member2")
        await clock.advance(INTERVAL)
        c.heal("member2")
        await clock.advance(INTERVAL)
        assert len(alerts(slack, "MEMBER DOWN member2")) == (cycle == FLAP_MIN), f"after {cycle} flaps"
    (alert,) = alerts(slack, "MEMBER DOWN member2")   # opened by the third appearance, grace or not
    assert "flapping" in alert.text
    assert len(alerts(slack, "MEMBER DOWN")) == 1


async def test_nospace_opens_the_alarm_condition_with_the_defrag_suggestion(make_cluster, slack, start_bot):
    c = make_cluster(3, extra_args=QUOTA_ARGS)
    clock = ManualClock()
    bot = await start_bot([watched("prod", c)], clock=clock)
    await watching(bot.runtime.watcher, clock)
    await fill_until_nospace(c)
    alert, _ = await advance_until(clock, lambda: next(iter(alerts(slack, "ALARM NOSPACE")), None), ROUNDS,
                                  "NOSPACE alert")
    assert "`/etcd defrag prod`" in text_of(alert) and "refuses writes" in alert.text
    assert len(alerts(slack, "ALARM NOSPACE")) == 1
    quota, _ = await advance_until(clock, lambda: next(iter(alerts(slack, "QUOTA")), None), 10,
                                  "quota alert")   # the database is above 80 % of 16 MiB too
    assert "`/etcd defrag prod`" in text_of(quota)


async def test_a_mute_is_honoured_and_ends_by_itself(make_cluster, slack, start_bot):
    c = make_cluster(3)
    await start_bot([watched("prod", c)])
    muted = await reply(slack, "mute prod 8s replacing disks <!channel>", user=LEAD)
    until = time.monotonic() + 8
    assert "held back until" in text_of(muted) and "&lt;!channel&gt;" in muted.text
    c.kill("member3")
    alert = await first_alert(slack, "MEMBER DOWN member3", 8 + INTERVAL + GRACE + MARGIN)
    assert time.monotonic() >= until - 0.5, "posted while muted"
    assert len(alerts(slack, "MEMBER DOWN")) == 1 and alert.text


async def test_unmute_and_who_may_mute(make_cluster, slack, start_bot):
    c = make_cluster(3)
    clock = ManualClock()
    bot = await start_bot([watched("prod", c, access={"operators": [LEAD]})], clock=clock)
    await watching(bot.runtime.watcher, clock)
    refused = await ephemeral(slack, "mute 1h x")   # the on-call engineer is no operator here
    assert "needs the operator role" in refused.text
    assert "is not muted" in (await ephemeral(slack, "unmute", user=LEAD)).text
    await reply(slack, "mute 1h maintenance", user=LEAD)
    c.kill("member1")
    await advance_until(clock, lambda: bot.ctx.watch.held("prod", clock.now()), 1, "member1 seen down")
    await clock.advance(GRACE)   # it lasted its grace: only the mute holds it back now
    assert not alerts(slack, "MEMBER DOWN")
    listing = (await reply(slack, "alerts")).text   # what the mute holds back is listed, and why
    assert "muted: until" in listing and "by bob: maintenance" in listing and LEAD not in listing  # names, not IDs
    assert "cluster prod: no open conditions, 1 held back\nmember down member1: " in listing, listing
    assert "(held back: muted; seen for " in listing, listing
    await reply(slack, "unmute", user=LEAD)
    await advance_until(clock, lambda: alerts(slack, "MEMBER DOWN member1"), 1, "alert in the first round unmuted")
    actions = [(r.action, r.user) for r in await bot.ctx.store.audit_rows()]
    assert ("mute", LEAD) in actions and ("unmute", LEAD) in actions


async def test_the_member_being_replaced_is_no_alert(make_cluster, slack, start_bot):
    c = make_cluster(3)
    clock = ManualClock()
    bot = await start_bot([watched("prod", c)], approval=APPROVAL, clock=clock)
    await watching(bot.runtime.watcher, clock)
    c.kill("member1")
    peer, client = urls()
    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}")
    row = await plan_row(bot.ctx.store, plan)

    def held_for_the_plan(state: str, subject: str | None = None) -> list:
        """What /etcd alerts lists as held back because of the plan (in `state`), seen for longer than grace."""
        return [v for v in bot.ctx.watch.held("prod", clock.now())
                if (subject is None or v.subject == subject) and clock.now() - v.opened_at > GRACE
                and v.held == f"the bot's own replace plan {row['id']} ({state}) causes it"]
    await advance_until(clock, lambda: held_for_the_plan("proposed", "member1"), ROUNDS + 1,
                       "member1 held back for the plan past its grace")
    # The plan is held twice while the watch goes on for longer than interval + grace: before it removes
    # the dead member1, and after it added member4, before starting it.
    gates = [hold_at(slack, 2), hold_at(slack, 4)]
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    for gate, subject in zip(gates, ("member1", None), strict=True):
        await gate.reached()
        for _ in range(ROUNDS + 1):   # longer than interval + grace on the watch's clock
            await clock.advance(INTERVAL)
        held = held_for_the_plan("running", subject)
        assert held and not alerts(slack, "MEMBER DOWN"), bot.ctx.watch.held("prod", clock.now())
        if subject is None:   # after the add: the new member, not yet started (member1 is gone)
            assert "member1" not in {v.subject for v in held}, held
        gate.release()
    await wait_done(bot.ctx.store, row["id"])
    assert not alerts(slack, "MEMBER DOWN"), [m.text for m in alerts(slack, "MEMBER DOWN")]
    # ... and still posts what the plan does not cause.
    c.kill("member2")
    await advance_until(clock, lambda: alerts(slack, "MEMBER DOWN member2"), ROUNDS, "member2's alert")


async def test_a_restarted_bot_edits_its_alert_instead_of_posting_again(make_cluster, slack, start_bot):
    c = make_cluster(3)
    clusters = [watched("prod", c)]
    clock = ManualClock()
    bot = await start_bot(clusters, clock=clock)
    await watching(bot.runtime.watcher, clock)
    c.kill("member1")
    alert, _ = await advance_until(clock, lambda: next(iter(alerts(slack, "MEMBER DOWN member1")), None), ROUNDS,
                                  "member-down alert")
    # the row is written just after the post; a stop in between loses it (the watch round is cancelled)
    await eventually(lambda: bot.ctx.store.open_alerts("prod"), 10, "the alert's row")
    await bot.stop()
    edits = len(alert.edits)
    clock = ManualClock(clock.now())
    bot = await start_bot(clusters, clock=clock)
    await watching(bot.runtime.watcher, clock)   # its first round as the watch edits what the store says is open
    assert len(alert.edits) > edits, "the new bot did not edit the alert"
    await asyncio.to_thread(c.restart, "member1")
    await advance_until(clock, lambda: "resolved after" in thread(slack, alert), 3 * ROUNDS,
                       "resolution in the old alert's thread")
    assert len(alerts(slack, "MEMBER DOWN")) == 1


async def test_a_dead_cluster_does_not_delay_another_clusters_alert(make_bed, make_cluster, slack, start_bot):
    dead, alive = make_bed(3), make_cluster(3)
    await start_bot([watched("dead", dead, timeout_seconds=2.0), watched("alive", alive)])
    for name in dead.members:
        dead.cut_from_bot(name)   # black-holed: connections hang until a deadline
    killed = time.monotonic()
    alive.kill("member2")
    alert = await first_alert(slack, "MEMBER DOWN member2", INTERVAL + GRACE + MARGIN)
    took = time.monotonic() - killed
    assert "cluster *alive*" in text_of(alert)
    lost = await first_alert(slack, "UNREACHABLE", 2 * (2 * 2.0 + 1) + GRACE + MARGIN)
    assert "dead" in lost.text and "no member answered" in lost.text and "not proof" in lost.text
    print(f"kill to alert beside a black-holed cluster: {took:.1f} s")
    assert took <= INTERVAL + GRACE + MARGIN


async def test_what_a_failed_plan_leaves_behind_is_posted_when_it_fails(make_cluster, slack, start_bot):
    c = make_cluster(3)
    failing = {"kind": "command", "argv": [sys.executable, "-c", "raise SystemExit(3)"], "timeout_seconds": 30}
    clock = ManualClock()   # no round between the kill and the proposal: member1 is no alert before the plan
    bot = await start_bot([watched("prod", c, launcher=failing)], approval=APPROVAL, clock=clock)
    await watching(bot.runtime.watcher, clock)
    c.kill("member1")
    peer, client = urls()
    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}")
    row = await plan_row(bot.ctx.store, plan)
    gate = hold_at(slack, 4)   # member4 added, not yet started: the plan's doing
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await gate.reached()
    for _ in range(ROUNDS + 1):   # longer than interval + grace on the watch's clock
        await clock.advance(INTERVAL)
    assert not alerts(slack, "MEMBER DOWN"), "held back while the plan ran"
    gate.release()
    failed = await wait_state(bot.ctx.store, row["id"], ("failed",))
    # The plan added member4 but could not start it: no longer the plan's doing, so it is posted.
    alert, _ = await advance_until(clock, lambda: next(iter(alerts(slack, "MEMBER DOWN")), None), 1,
                                  "alert in the first round after the plan failed")
    assert failed.new_member_id and failed.new_member_id in alert.text and "unstarted" in alert.text


async def test_leader_churn_suggests_perf(make_cluster, slack, start_bot):
    c = make_cluster(3)
    clock = ManualClock()
    bot = await start_bot([watched("prod", c)], clock=clock)
    # Elections before the watch's first round are not counted (it has no term to compare with yet), and
    # it starts once this replica leads: wait for that round, or the four moves can all come before it.
    await watching(bot.runtime.watcher, clock)
    assert bot.runtime.watcher.clusters["prod"].term
    for _ in range(4):   # four elections, moved by hand
        health = await members_of(c)
        leader = next(h for h in health if h.status and h.status.leader == h.member.id)
        target = next(h for h in health if h is not leader)
        await asyncio.to_thread(c.etcdctl, "move-leader", target.member.hex_id,
                                endpoints=[leader.member.client_urls[0]])
    alert, _ = await advance_until(clock, lambda: next(iter(alerts(slack, "LEADER CHURN")), None), ROUNDS + 1,
                                  "leader-churn alert")
    assert "`/etcd perf prod`" in text_of(alert) and "4 leader changes" in alert.text


async def test_only_a_replica_that_should_watch_posts(make_cluster, tmp_path):
    """Leader only: the watcher asks `should_watch` every round (with replicas: am I the leader?)."""
    c = make_cluster(3)
    clock = ManualClock()
    notifier = PlainNotifier()
    ctx = await BotContext.open(load_config(write_config(tmp_path, [watched("prod", c)])), notifier, PlainDirectory(),
                                clock=clock)
    leading = False
    task = asyncio.create_task(Watcher(ctx, should_watch=lambda: leading).run())
    try:
        c.kill("member1")
        await eventually(lambda: "watch prod" in clock.asleep(), 10, "the watch's first round")
        for _ in range(ROUNDS + 1):   # time for an alert
            await clock.advance(INTERVAL)
        assert not notifier.lines, "posted without being the leader"
        leading = True
        await advance_until(clock, lambda: any("MEMBER DOWN member1" in line for line in notifier.lines),
                           ROUNDS, "alert once leading")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ctx.close()


async def test_alerts_of_unwatched_clusters_are_closed_unposted_and_old_resolved_ones_deleted(
        cluster, slack, start_bot, tmp_path):
    """Alert rows do not pile up: at start-up, the leader closes the open alerts of a cluster gone from the
    config (posting nothing: its messages stay as they were) and deletes those resolved over 30 days ago."""
    now, day, ts = time.time(), 86400.0, "1700000000.000100"
    ids = {}
    async with open_store(tmp_path) as store:
        for name, cluster_name, resolved_at in [("gone", "retired", None), ("old", "prod", now - 31 * day),
                                                ("recent", "prod", now - 29 * day)]:
            ids[name] = await store.open_alert(NewAlert(cluster=cluster_name, condition="member_down", subject=name,
                                                        channel=CHANNEL, message_ts=ts, opened_at=now - 40 * day))
            if resolved_at is not None:
                await store.update_alert(ids[name], state="resolved", resolved_at=resolved_at)
    bot = await start_bot([watched("prod", cluster)])

    def rows() -> dict[int, str]:
        with closing(sqlite3.connect(tmp_path / "etcd-chatops.db")) as db:
            return dict(db.execute("SELECT id, state FROM alerts").fetchall())

    await eventually(lambda: rows() == {ids["gone"]: "resolved", ids["recent"]: "resolved"}, 10,
                     "the retired cluster's alert closed and the old resolved one deleted")
    assert await bot.ctx.store.open_alerts() == []
    assert not [c for c in slack.calls if ts in json.dumps(c.args, default=str)], "posted about a closed alert"


async def test_a_member_added_with_an_unusable_peer_url_does_not_silence_the_watch(make_cluster, slack, start_bot):
    """etcd accepts `member add --peer-urls=http://127.0.0.1:238000` (it checks no port range); the bot
    cannot use that URL, and says so, but every round goes on: the quorum loss that follows is posted."""
    c = make_cluster(3, extra_args=("--strict-reconfig-check=false",))   # adds at once, without 5 s of health
    clock = ManualClock()
    bot = await start_bot([watched("prod", c)], clock=clock)
    await watching(bot.runtime.watcher, clock)
    async with EtcdClient(c.endpoints) as client:
        odd, _ = await client.member_add(["http://127.0.0.1:238000"], learner=False)   # the real API, as etcdctl
    c.kill("member3")   # 2 of 4 voters: the member that never started counts toward the quorum etcd needs
    lost, _ = await advance_until(clock, lambda: next(iter(alerts(slack, "QUORUM LOST")), None), ROUNDS,
                                 "quorum-lost alert")
    assert "2 of 4 voters healthy, 3 needed" in text_of(lost)
    unusable = "unusable URL 'http://127.0.0.1:238000' (port out of range)"
    down, _ = await advance_until(clock, lambda: next(iter(alerts(slack, f"MEMBER DOWN {odd.hex_id}")), None), 1,
                                 "the unusable member's alert")
    assert unusable in down.text   # at a quorum loss, no replacement is suggested (it would be refused)
    assert "/etcd replace" not in text_of(down) and "Propose replacement" not in text_of(down)
    status = text_of(await reply(slack, "status prod"))
    assert unusable in status and "QUORUM LOST" in status.upper(), status
    assert 'etcd_chatops_watch_errors_total{cluster="prod"' not in await asyncio.to_thread(metrics, bot)


async def test_a_check_that_raises_is_logged_once_counted_and_costs_only_its_own_verdict(make_cluster, tmp_path,
                                                                                           monkeypatch, caplog):
    c = make_cluster(3)
    c.kill("member1")

    fixed = False

    def broken(f: Facts) -> list[Finding]:   # as a condition would be with facts it did not expect
        if fixed:
            return []
        raise ValueError("Port out of range 0-65535")
    monkeypatch.setitem(CONDITIONS, "broken", Condition("broken", "broken", broken))
    config = load_config(write_config(tmp_path, [watched("prod", c)]))
    clock = ManualClock()   # time moved, not waited for
    notifier = PlainNotifier()
    ctx = await BotContext.open(config, notifier, PlainDirectory(), clock=clock)
    watcher = Watcher(ctx, should_watch=lambda: True)
    try:
        with caplog.at_level(logging.INFO, logger="bot.watch.watcher"):
            for _ in range(3):
                await watcher.round(config.clusters[0])
                await clock.advance(GRACE + INTERVAL)
            assert any("MEMBER DOWN member1" in line for line in notifier.lines), notifier.lines
            logged = [r for r in caplog.records if r.getMessage().startswith("watch: check failed")]
            assert [(r.ctx_condition, r.ctx_subject) for r in logged] == [("broken", None)]   # once, not per round
            assert logged[0].exc_info and "Port out of range" in str(logged[0].exc_info[1])
            page = ctx.metrics.exposition().decode()
            assert 'etcd_chatops_watch_errors_total{cluster="prod",condition="broken"} 3.0' in page, page
            fixed = True   # said once more, and counted no more
            await watcher.round(config.clusters[0])
            assert [r for r in caplog.records if r.getMessage() == "watch: check works again"]
            assert 'condition="broken"} 3.0' in ctx.metrics.exposition().decode()
    finally:
        await ctx.close()


class HeldNotifier(PlainNotifier):
    """Posts only once `release` is set: the moment a replica stops while Slack takes its time."""

    def __init__(self) -> None:
        super().__init__()
        self.posting, self.release = asyncio.Event(), asyncio.Event()

    async def channel_message(self, channel: str, reply: Reply) -> str:
        self.posting.set()
        await self.release.wait()
        return await super().channel_message(channel, reply)


async def test_a_replica_stopped_while_it_posts_an_alert_still_records_it(make_cluster, tmp_path: Path) -> None:
    """The record of an alert is what a restarted bot edits instead of posting it again: stopping the watch
    between the post and the record lost it, and the next leader posted the alert a second time."""
    c = make_cluster(3)
    c.kill("member1")
    config = load_config(write_config(tmp_path, [watched("prod", c)]))
    notifier, clock = HeldNotifier(), ManualClock()
    ctx = await BotContext.open(config, notifier, PlainDirectory(), clock=clock)
    watcher = Watcher(ctx, should_watch=lambda: True)

    async def rounds() -> None:
        while True:
            await watcher.round(config.clusters[0])
            await clock.advance(GRACE + INTERVAL)

    task = asyncio.create_task(rounds())
    try:
        await asyncio.wait_for(notifier.posting.wait(), 30)
        task.cancel()   # the replica stops: Runtime.stop cancels the watch and waits for it
        notifier.release.set()
        await asyncio.gather(task, return_exceptions=True)
        rows = await ctx.store.open_alerts("prod")
        assert [(r.condition, r.subject, r.message_ts) for r in rows] == [("member_down", "member1", "plain.1")]
    finally:
        task.cancel()
        await ctx.close()


async def test_a_bad_mute_duration_is_refused_and_a_reason_loses_its_control_characters(cluster, slack, start_bot):
    bot = await start_bot([watched("prod", cluster)])
    for text in ("mute 0s maintenance", "mute prod -5m maintenance", "mute 0.5s maintenance"):
        refused = text_of(await ephemeral(slack, text, user=LEAD))
        assert "is not a duration" in refused and "Usage: /etcd mute [cluster] &lt;duration&gt;" in refused, refused
    assert await bot.ctx.store.mutes() == []
    muted = await reply(slack, 'mute 30m "disks\x1b[2J\x07 swapped \u202eokay"', user=LEAD)
    assert "disks[2J swapped okay" in muted.text and "\x1b" not in text_of(muted) and "\u202e" not in text_of(muted)
    (row,) = await bot.ctx.store.mutes()
    assert row.reason == "disks[2J swapped okay"
    (audit,) = [r for r in await bot.ctx.store.audit_rows() if r.action == "mute"]
    assert "\\u001b" not in audit.detail and "\x1b" not in audit.detail
