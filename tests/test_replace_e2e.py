"""Replacing a failed member under an approval, end to end: real etcd members,
real slack-bolt, the Slack stand-in, a `command` launcher starting real etcd."""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.ops import lifecycle
from bot.testing.workspace import (
    CHANNEL,
    LEAD,
    LEAD2,
    LEADS_GROUP,
    ONCALL,
    STRANGER,
    BotProcess,
    cluster_table,
    write_config,
)
from helpers import (
    APPROVAL,
    OK,
    audit_actions,
    command,
    ephemeral,
    members_of,
    must,
    open_store,
    plan_row,
    propose,
    replies,
    reply,
    text_of,
    thread,
    urls,
    wait_done,
)


async def test_the_whole_runbook(make_cluster, slack, start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    c.kill("member1")
    failed = c.member("member1")
    peer, client = urls()

    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}")
    text = text_of(plan)
    row = await plan_row(store, plan)
    failed_id = json.loads(row["plan"])["failed"]["id"]
    survivors = ",".join(f"member{i}={c.member(f'member{i}').peer_url}" for i in (2, 3))
    assert plan.text.startswith("Replace member1 with member4 in prod — needs 1 approver")
    for expected in ("Plan ", failed.peer_url, failed.client_url, "member4", peer, client, "learner",
                     f"<@{ONCALL}>", f"<@{LEAD}>", f"<!subteam^{LEADS_GROUP}>", "expires", f"`{row['id']}`"):
        assert expected in text, f"{expected!r} missing from the plan message"
    assert failed_id not in text, "members by name: member1's ID is not needed to tell it apart"
    env = await slack.wait_for(lambda: "ETCD_NAME=member4" in thread(slack, plan) and thread(slack, plan),
                               what="the environment in the plan's thread")
    for expected in (f"ETCD_INITIAL_CLUSTER={survivors},member4={peer}", "ETCD_INITIAL_CLUSTER_STATE=existing"):
        assert expected in env and expected not in text
    for i, key in enumerate(("Re-check", "snapshot", "Remove member1", "Add member4", "Start member4",
                             "promote", "--etcd-servers", "Verify 3 members")):
        assert f"{i}. " in text and key in text

    # A stranger and the proposer cannot approve; the thread says why; nothing moves.
    await slack.react(user=STRANGER, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await slack.wait_for(lambda: f"<@{STRANGER}> is not an approver" in thread(slack, plan), what="stranger refusal")
    await slack.react(user=ONCALL, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await slack.wait_for(lambda: "cannot approve it too" in thread(slack, plan), what="self-approval refusal")
    assert (await store.plan(row["id"]))["state"] == "proposed"

    # The lead approves; Slack redelivers that event, and a second lead races it.
    first = await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await asyncio.gather(
        slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK, event_id=first.event_id, retry_num=1,
                    retry_reason="http_timeout"),
        slack.react(user=LEAD2, channel=CHANNEL, ts=plan.ts, reaction=f"{OK}::skin-tone-3"))
    done = await wait_done(store, row["id"])
    assert done["decided_by"] == LEAD

    members = await members_of(c)
    assert sorted(h.member.name for h in members) == ["member2", "member3", "member4"]
    assert all(h.healthy and not h.member.is_learner for h in members)
    assert failed_id not in {h.member.hex_id for h in members}
    new = next(h.member for h in members if h.member.name == "member4")
    assert new.hex_id == done["new_member_id"] and new.client_urls == (client,)

    talk = thread(slack, plan)
    servers = ",".join(u for h in sorted(members, key=lambda h: h.member.name) for u in h.member.client_urls)
    assert f"--etcd-servers={servers}" in talk and "load balancer" in talk
    assert sum("Approved by" in m.text for m in replies(slack, plan)) == 1
    assert f"<@{LEAD2}>'s approval changes nothing" in talk
    actions = await audit_actions(store, row["id"])
    assert actions.count(("step_done", "remove")) == 1 and actions.count(("step_done", "add")) == 1
    assert actions.count(("plan_approved", "")) == 1 and ("plan_done", "") in actions
    final = slack.find_message(CHANNEL, plan.ts)   # edited to DONE right after the store says so
    await slack.wait_for(lambda: "*State:* DONE" in text_of(final), what="the plan message to say DONE")
    assert final.edits
    snaps = await store.snapshots("prod")
    assert len(snaps) == 1 and snaps[0].reason == f"before plan {row.id}" and Path(snaps[0].path).is_file()


async def test_no_learner_joins_as_a_voting_member(make_cluster, slack, start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    c.kill("member2")
    peer, client = urls()
    plan = await propose(slack, f"replace member2 member5 {peer} --client-url {client} --no-learner")
    assert "joins as a voting member (--no-learner)" in text_of(plan)
    row = await plan_row(bot.ctx.store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await wait_done(bot.ctx.store, row["id"])
    assert "added to cluster as a voting member" in thread(slack, plan)
    assert sorted(h.member.name for h in await members_of(c)) == ["member1", "member3", "member5"]


async def test_refusals_before_any_plan(make_cluster, slack, start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    peer, _ = urls()
    msg = await ephemeral(slack, f"replace member1 member4 {peer}")
    assert "still answers and reports healthy" in text_of(msg)
    c.kill("member1")
    msg = await ephemeral(slack, f"replace member1 member2 {peer}")
    assert "the name 'member2' is already used" in text_of(msg)
    msg = await ephemeral(slack, f"replace member1 member4 {c.member('member3').peer_url}")
    assert "is already used by member member3" in text_of(msg)
    msg = await ephemeral(slack, "replace member1 member4 10.0.0.4:2380")
    assert "not an http(s)://host:port URL" in text_of(msg) and "Usage" in text_of(msg)
    msg = await ephemeral(slack, f"replace member9 member4 {peer}")
    assert "no member 'member9'" in text_of(msg)
    assert await bot.ctx.store.plans("prod") == []
    assert not slack.calls_to("chat.postMessage")


async def test_quorum_lost_points_to_the_newest_snapshot(make_cluster, slack, start_bot):
    c = make_cluster(3)
    await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    start = len(slack.messages)
    await command(slack, "snapshot")
    snap = await slack.wait_for_message(lambda m: m.source == "chat.postMessage", after=start, timeout=30)
    name = next(w.strip("`") for w in text_of(snap).split() if w.strip("`").endswith(".db"))
    c.kill("member1")
    c.kill("member2")
    msg = await ephemeral(slack, f"replace member1 member4 {urls()[0]}")
    text = text_of(msg)
    assert "quorum is lost: 1 of 3 voting members are healthy and 2 are needed" in text
    assert "restore the cluster from the newest recorded snapshot" in text and name in text


async def test_one_open_plan_per_cluster_and_cancel(make_cluster, slack, start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]}")
    row = await plan_row(bot.ctx.store, plan)
    msg = await ephemeral(slack, f"replace member1 member5 {urls()[0]}")
    assert f"plan {row['id']} is proposed for this cluster: one open plan per cluster" in text_of(msg)
    msg = await ephemeral(slack, f"cancel {row['id']}", user=STRANGER)
    assert "needs the approver role or being its proposer" in text_of(msg)
    msg = await ephemeral(slack, f"cancel {row['id']}")
    assert f"Plan {row['id']} cancelled" in text_of(msg)
    assert (await bot.ctx.store.plan(row["id"]))["state"] == "cancelled"
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await slack.wait_for(lambda: f"is cancelled by <@{ONCALL}> at <!date^" in thread(slack, plan)
                         and "not proposed" in thread(slack, plan), what="late approval refused")


@pytest.mark.parametrize("expired_by", ["the approval", "the upkeep"])
async def test_an_expired_plan_cannot_be_approved(make_cluster, slack, start_bot, expired_by):
    """The approval that comes too late expires the plan itself, or finds it expired by the leader's upkeep
    (a late election's first upkeep pass did, in a full run): the approver reads the same refusal either way.
    Before, the second read "plan X is expired, not proposed"."""
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval={**APPROVAL, "ttl_minutes": 0.01})
    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]}")
    row = await plan_row(bot.ctx.store, plan)
    await slack.wait_for(lambda: time.time() > row["expires_at"], what="the plan's expiry")
    if expired_by == "the upkeep":
        await lifecycle.expire_stale(bot.ctx)   # the upkeep's job (it may have run it already)
        assert (await bot.ctx.store.plan(row["id"]))["state"] == "expired"
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await slack.wait_for(lambda: f"plan {row['id']} expired at" in thread(slack, plan), what="expiry refusal")
    assert (await bot.ctx.store.plan(row["id"]))["state"] == "expired"
    assert "add" not in [a[1] for a in await audit_actions(bot.ctx.store, row["id"])]


async def test_rejection_by_the_proposer(make_cluster, slack, start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]}")
    row = await plan_row(bot.ctx.store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction="eyes")  # any other reaction: ignored
    await slack.react(user=ONCALL, channel=CHANNEL, ts=plan.ts, reaction="x")
    await slack.wait_for(lambda: f"Rejected by <@{ONCALL}>" in thread(slack, plan), what="rejection")
    assert (await bot.ctx.store.plan(row["id"]))["state"] == "rejected"
    said = [m.text.split("\n")[0] for m in replies(slack, plan)]   # the "eyes" caused no reply
    assert len(said) == 2 and said[0].startswith("Environment for member4") and "Rejected by" in said[1], said
    assert len(await members_of(c)) == 3


async def test_five_members_two_failed_replaced_one_after_the_other(make_cluster, slack, start_bot):
    c = make_cluster(5)
    bot = await start_bot([cluster_table("prod", c, catch_up_seconds=60)], approval=APPROVAL)
    store = bot.ctx.store
    c.kill("member1")
    c.kill("member2")
    for failed, new in (("member1", "member6"), ("member2", "member7")):
        peer, client = urls()
        plan = await propose(slack, f"replace {failed} {new} {peer} --client-url {client}")
        if failed == "member1":  # etcd 3.5: member2 must go before any add; its plan then only adds
            assert "Also failed: *member2*" in text_of(plan) and "one at a time" in text_of(plan)
            assert "This plan removes *member2* too" in text_of(plan)
        else:
            assert "was removed by plan" in text_of(plan)
        row = await plan_row(store, plan)
        await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
        await wait_done(store, row["id"])
    members = await members_of(c)
    assert sorted(h.member.name for h in members) == ["member3", "member4", "member5", "member6", "member7"]
    assert all(h.healthy for h in members)


async def test_the_bot_killed_during_the_start_step_resumes_without_repeating(make_cluster, slack, creds, tmp_path):
    c = make_cluster(3)
    started, go = tmp_path / "launcher-started", tmp_path / "launcher-go"
    # The launcher marks that step 4 began, then waits for `go` before starting the member for real.
    code = (f"import os, sys, time, runpy; open({str(started)!r}, 'w').write(str(os.getpid())); "
            f"[time.sleep(0.05) for _ in iter(lambda: not os.path.exists({str(go)!r}), False)]; "
            f"sys.argv = ['start_member', '--base-dir', {str(c.base_dir)!r}]; "
            f"runpy.run_module('bot.testing.start_member', run_name='__main__')")
    table = cluster_table("prod", c)
    table["launcher"] = {"kind": "command", "argv": [sys.executable, "-c", code], "timeout_seconds": 120}
    config = write_config(tmp_path, [table], approval=APPROVAL)
    # Started from a thread: the stand-in lives on this event loop and must keep answering.
    bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, tmp_path / "bot.log").start)
    try:
        slack.bot_url = bot.url
        c.kill("member1")
        peer, client = urls()
        plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}")
        await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
        # The file exists before the launcher's pid is in it (open() makes it, close() writes it): wait for the pid.
        pid = await slack.wait_for(lambda: started.exists() and started.read_text().strip(), timeout=60,
                                   what="step 4 to start")
        bot.kill()
        os.kill(int(pid), signal.SIGKILL)  # the machine died: its launcher too

        async with open_store(tmp_path) as store:
            row = await plan_row(store, plan)
            assert row["state"] == "running" and row["current_step"] == 4

        bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, tmp_path / "bot.log").start)
        slack.bot_url = bot.url
        await slack.wait_for(lambda: "was interrupted at step 4" in thread(slack, plan), what="the interruption notice")
        go.write_text("")
        msg = await ephemeral(slack, f"resume {row['id']}", user=LEAD)
        assert f"Resuming plan {row['id']} at step 4" in text_of(msg)
        await slack.wait_for(lambda: f"Plan {row['id']} is done" in thread(slack, plan), timeout=120,
                             what="the resumed plan to finish")
    finally:
        await asyncio.to_thread(bot.stop)
    async with open_store(tmp_path) as store:
        row = must(await store.plan(row["id"]))
        assert row["state"] == "done"
        actions = await audit_actions(store, row["id"])
    assert actions.count(("step_done", "remove")) == 1 and actions.count(("step_done", "add")) == 1
    assert ("plan_interrupted", "start") in actions and ("plan_resumed", "start") in actions
    members = await members_of(c)
    assert sorted(h.member.name for h in members) == ["member2", "member3", "member4"]
    assert [h.member.hex_id for h in members if h.member.name == "member4"] == [row["new_member_id"]]


async def test_a_manual_launcher_waits_for_the_operator(make_cluster, slack, start_bot):
    """The bot posts the runbook's environment and waits; an operator starts etcd with
    exactly what was posted; the plan carries on."""
    c = make_cluster(3)
    table = cluster_table("prod", c)
    table["launcher"] = {"kind": "manual", "timeout_seconds": 60}
    bot = await start_bot([table], approval=APPROVAL)
    c.kill("member1")
    peer, client = urls()
    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}")
    assert "an operator runs etcd on the new machine" in text_of(plan)
    row = await plan_row(bot.ctx.store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    note = await slack.wait_for(lambda: next((m for m in replies(slack, plan) if "Start *member4*" in m.text), None),
                                timeout=60, what="the operator's instructions")
    block = note.text.split("```")[1]  # as a shell reads the lines it is asked to paste
    env = dict(shlex.split(line)[1].split("=", 1) for line in block.splitlines() if line.startswith("export "))
    assert env["ETCD_NAME"] == "member4" and env["ETCD_INITIAL_CLUSTER_STATE"] == "existing"
    assert env["ETCD_LISTEN_CLIENT_URLS"] == client and env["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == peer
    await asyncio.to_thread(c.start_member, "member4", env["ETCD_INITIAL_CLUSTER"],
                            client_port=int(client.rsplit(":", 1)[1]), peer_port=int(peer.rsplit(":", 1)[1]))
    await wait_done(bot.ctx.store, row["id"])
    assert sorted(h.member.name for h in await members_of(c)) == ["member2", "member3", "member4"]


async def test_a_learner_replacement_on_a_cluster_with_auth(make_cluster, slack, start_bot):
    """With etcd auth on, a learner answers no authenticated RPC: the default (learner)
    replacement used to fail at the promote step, waiting for a learner it could not see."""
    from conftest import TEST_ETCD_PASSWORD
    c = make_cluster(3)
    c.enable_auth(TEST_ETCD_PASSWORD)
    # With auth, a read first spends up to half its deadline on Authenticate, a raft request. The test is about the
    # learner's promotion, not the deadline, so it is long. (Beside a busy CPU no plan came once, with 2 s; what
    # came instead was not shown then, so the deadline is the likeliest cause, not a proven one.)
    bot = await start_bot([cluster_table("prod", c, timeout_seconds=5.0)], approval=APPROVAL)
    c.kill("member1")
    peer, client = urls()
    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}")
    assert "joins as a learner, then promoted" in text_of(plan)
    row = await plan_row(bot.ctx.store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await wait_done(bot.ctx.store, row["id"])
    assert "member4 promoted to a voting member" in thread(slack, plan)
    members = await members_of(c)
    assert sorted(h.member.name for h in members) == ["member2", "member3", "member4"]
    assert all(h.healthy and not h.member.is_learner for h in members)


async def test_the_bot_follows_the_cluster_after_every_configured_endpoint_is_gone(make_cluster, slack, start_bot,
                                                                                   tmp_path):
    """Endpoint drift: the configured endpoints are member1-3; once all three are replaced, the
    quorate cluster is reached through client URLs the bot learned from the member list (and
    recorded, so a restarted bot still knows them), and the replies say so."""
    c = make_cluster(3)
    table = cluster_table("prod", c)
    bot = await start_bot([table], approval=APPROVAL)
    store = bot.ctx.store
    for failed, new in (("member1", "member4"), ("member2", "member5"), ("member3", "member6")):
        c.kill(failed)
        peer, client = urls()
        plan = await propose(slack, f"replace {failed} {new} {peer} --client-url {client}")
        await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
        done = await wait_done(store, (await plan_row(store, plan))["id"])
        # the done note follows the store's done: asked before it, /etcd status would be answered after it
        note = f"Plan {done.id} is done"
        await slack.wait_for(lambda: note in thread(slack, plan), 20, "the done note")  # noqa: B023 (awaited here)
    assert not set(c.endpoints) & set(table["endpoints"])  # no configured endpoint is alive
    learned = [c.member(n).client_url for n in ("member4", "member5", "member6")]
    assert f'```endpoints = {json.dumps(learned)}```' in thread(slack, plan)  # the follow-ups say what to configure

    text = text_of(await reply(slack, "status"))
    assert "etcd cluster prod: HEALTHY" in text and "3 of 3 voting members healthy" in text
    assert "reached only through http://127.0.0.1:" in text and "learned from the member list" in text
    assert "update this cluster's endpoints" in text
    assert "reached only through" in text_of(await reply(slack, "members"))

    await bot.stop()  # a restarted bot remembers the membership it recorded
    await start_bot([table], approval=APPROVAL)
    text = text_of(await reply(slack, "status"))
    assert "etcd cluster prod: HEALTHY" in text and "reached only through" in text
    # so does the break-glass CLI, from the bot's database
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "bot", "status", "--cluster", "prod",
                                                    "--config", str(tmp_path / "config.toml")],
                                   capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEALTHY" in proc.stdout and "NOTE: reached only through http://127.0.0.1:" in proc.stdout


async def test_url_conflicts_and_unsafe_names_are_refused_before_any_plan(make_cluster, slack, start_bot):
    """Each of these used to be approved, remove member1, then fail to start the new member
    ("bind: address already in use"): now one line says why, with the usage, and nothing is planned."""
    c = make_cluster(5)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    c.kill("member1")
    peer, _ = urls()
    taken = c.member("member3").client_url
    for text, reason in (
            (f"replace member1 member6 {peer} --client-url {peer}",
             "the peer URL and the client URL are the same address"),
            (f"replace member1 member6 {taken}", f"the peer URL {taken} is already used by member member3"),
            (f"replace member1 member6 {peer} --client-url {c.member('member4').peer_url}",
             "is already used by member member4 ("),
            (f"replace member1 member6 http://0.0.0.0:{peer.rsplit(':', 1)[1]}", "is an unspecified address"),
            (f"replace member1 <!channel> {peer}", "cannot be an etcd member name"),
            (f"replace member1 MEMBER2 {peer}", "differs from member 'member2'")):
        msg = await ephemeral(slack, text)
        assert reason in text_of(msg) and "Usage" in text_of(msg), text_of(msg)
    assert await bot.ctx.store.plans("prod") == []
    assert not slack.calls_to("chat.postMessage")
    assert len(await members_of(c)) == 5
