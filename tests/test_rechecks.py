"""Every change is re-checked against the live cluster right before it is made:
real clusters of 3 and 5 members, the real bot, the Slack stand-in.

To change the facts between two steps deterministically, the stand-in holds
the progress update that announces the chosen step: the engine announces a
step before it checks the step's precondition, so it waits there while the
test changes the cluster, and goes on when the test releases it.
"""
from __future__ import annotations

import asyncio
import time

from bot.domain.cluster import Member
from bot.domain.errors import UnhealthyCluster
from bot.etcd.client import EtcdClient
from bot.testing.workspace import CHANNEL, LEAD, LEAD2, STRANGER, cluster_table
from helpers import (
    APPROVAL,
    OK,
    audit_actions,
    ephemeral,
    hold_at,
    members_of,
    plan_row,
    propose,
    replies,
    text_of,
    thread,
    urls,
    wait_state,
)


async def add_learner_by_hand(cluster) -> Member:
    """As etcdctl member add --learner would; etcd refuses while its leader is new (unhealthy cluster)."""
    deadline = time.monotonic() + 15
    async with EtcdClient(cluster.endpoints) as client:
        while True:
            try:
                return (await client.member_add([urls()[0]], learner=True, timeout=10))[0]
            except UnhealthyCluster:
                assert time.monotonic() < deadline, "etcd kept refusing the member add"
                await asyncio.sleep(0.5)


async def names(cluster) -> list[str]:
    return sorted(h.member.name or h.member.hex_id for h in await members_of(cluster))


def stops(slack, plan) -> list[str]:
    """The thread's notes that the plan stopped, as the notification text (what a person reads first)."""
    return [m.text for m in replies(slack, plan) if m.text.startswith(":x: Plan ") and " stopped" in m.text]


async def test_a_refused_approval_is_answered_once_and_names_approvers_without_a_ping(make_cluster, slack, start_bot):
    """A repeated refusal: the first refusal goes to the thread, repeats only to their author."""
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]} --client-url {urls()[1]}")
    await plan_row(bot.ctx.store, plan)
    await slack.react(user=STRANGER, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await slack.wait_for(lambda: "is not an approver" in thread(slack, plan), what="the first refusal")
    await slack.react(user=STRANGER, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await slack.wait_for(lambda: any(m.ephemeral_to == STRANGER and "is not an approver" in text_of(m)
                                     for m in slack.messages), what="the repeated refusal, to its author only")
    refusals = [text_of(m) for m in slack.messages if "is not an approver" in text_of(m)]
    assert sum("is not an approver" in text_of(m) for m in replies(slack, plan)) == 1
    assert all(f"<@{LEAD}>" not in t and "<!subteam^" not in t and f"<@{LEAD2}>" not in t for t in refusals), refusals
    assert all("`bob`" in t for t in refusals), refusals


async def test_a_member_back_before_the_remove_stops_the_plan_and_its_resume(make_cluster, slack, start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]} --client-url {urls()[1]}")
    row = await plan_row(store, plan)

    gate = hold_at(slack, 2)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await gate.reached()
    await asyncio.to_thread(c.restart, "member1")  # it comes back while the remove is about to be sent
    gate.release()
    failed = await wait_state(store, row["id"], ("failed", "done"))
    assert failed["state"] == "failed" and "member1 answers and is healthy again" in failed["error"]
    assert "before step 2 (remove)" in failed["error"]
    assert await names(c) == ["member1", "member2", "member3"]
    [stop] = await slack.wait_for(lambda: stops(slack, plan), what="the plan's stop note in its thread")
    assert "a new plan is needed" in stop and "\n" not in stop
    # A plan that is no longer proposed does not ask for approval any more.
    message = slack.find_message(CHANNEL, plan.ts)
    assert "FAILED" in message.text and "to approve" not in text_of(message)

    # Resume re-runs the full re-check first, and stops with one line.
    await ephemeral(slack, f"resume {row['id']}", user=LEAD)
    await slack.wait_for(lambda: len(stops(slack, plan)) == 2, what="the resumed plan to stop again")
    again = stops(slack, plan)[1]
    assert "member1 answers and is healthy again" in again and "a new plan is needed" in again
    assert "\n" not in again
    assert await names(c) == ["member1", "member2", "member3"]
    assert ("step_done", "remove") not in await audit_actions(store, row["id"])


async def test_a_learner_added_by_hand_before_the_add_stops_it_and_abandon_closes_the_plan(make_cluster, slack,
                                                                                           start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    c.kill("member1")
    gate = hold_at(slack, 3)
    plan = await propose(slack, f"replace member1 member4 {urls()[0]} --client-url {urls()[1]}")
    row = await plan_row(store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await gate.reached()
    intruder = await add_learner_by_hand(c)  # between remove and add
    gate.release()
    failed = await wait_state(store, row["id"], ("failed", "done"))
    assert failed["state"] == "failed" and "before step 3 (add)" in failed["error"]
    assert f"a learner (unstarted) ({intruder.hex_id}) was added to prod" in failed["error"]
    ids = {h.member.hex_id for h in await members_of(c)}
    assert intruder.hex_id in ids and len(ids) == 3  # member2, member3, the intruder: nothing added by the bot

    # Resume: the re-check sees the learner too; nothing is added.
    await ephemeral(slack, f"resume {row['id']}", user=LEAD)
    await slack.wait_for(lambda: len(stops(slack, plan)) == 2, what="the resumed plan to stop again")
    assert f"({intruder.hex_id}) was added" in stops(slack, plan)[1]
    assert {h.member.hex_id for h in await members_of(c)} == ids

    # Abandon: approvers only; lists the steps that ran; undoes nothing; the cluster is free for a new plan.
    refused = await ephemeral(slack, f"abandon {row['id']} learner added by hand", user=STRANGER)
    assert "needs the approver role" in text_of(refused)
    msg = await ephemeral(slack, f"abandon {row['id']} learner added by hand", user=LEAD)
    text = text_of(msg)
    assert f"Plan {row['id']} abandoned" in text and "learner added by hand" in text and "Nothing was undone" in text
    assert "2. Remove member1" in text and "(done)" in text and "3. Add member4" in text
    assert (await store.plan(row["id"]))["state"] == "abandoned"
    assert await store.open_plan("prod") is None
    abandoned = [a for a in await store.audit_rows() if a.action == "plan_abandoned"]
    assert len(abandoned) == 1 and "learner added by hand" in abandoned[0].detail
    again = await ephemeral(slack, f"abandon {row['id']} twice", user=LEAD)
    assert "is abandoned; only an interrupted or failed plan can be abandoned" in text_of(again)
    assert {h.member.hex_id for h in await members_of(c)} == ids


async def test_an_also_removed_member_that_answers_again_stops_the_remove(make_cluster, slack, start_bot):
    c = make_cluster(5)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    c.kill("member1")
    c.kill("member2")
    plan = await propose(slack, f"replace member1 member6 {urls()[0]} --client-url {urls()[1]}")
    row = await plan_row(store, plan)
    assert "removes *member2* too" in text_of(plan)
    gate = hold_at(slack, 2)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await gate.reached()
    await asyncio.to_thread(c.restart, "member2")
    gate.release()
    failed = await wait_state(store, row["id"], ("failed", "done"))
    assert failed["state"] == "failed" and "member2" in failed["error"] and "answers again" in failed["error"]
    # the state is stored before the note is posted: wait for the note, as a person would
    [stop] = await slack.wait_for(lambda: stops(slack, plan), what="the plan's stop note in its thread")
    assert "member2" in stop and "answers again" in stop
    assert await names(c) == ["member1", "member2", "member3", "member4", "member5"]
    assert ("step_done", "remove") not in await audit_actions(store, row["id"])


async def test_launcher_output_and_long_values_reach_slack_escaped_and_whole(make_cluster, slack, start_bot):
    c = make_cluster(3)
    loud = "echo '<!channel> <@U0LEAD0001> <!subteam^S0ONCALLLD>'; exit 3"
    bot = await start_bot([cluster_table("prod", c, launcher={"kind": "command", "argv": ["sh", "-c", loud],
                                                              "timeout_seconds": 20})], approval=APPROVAL)
    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]} --client-url {urls()[1]}")
    row = await plan_row(bot.ctx.store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    failed = await wait_state(bot.ctx.store, row["id"], ("failed", "done"))
    assert failed["state"] == "failed" and "<!channel>" in failed["error"]  # stored as said
    await slack.wait_for(lambda: "&lt;!channel&gt;" in thread(slack, plan), what="the launcher output in the thread")
    message = slack.find_message(CHANNEL, plan.ts)
    posted = [message, *replies(slack, plan)]
    for m in posted:
        raw = m.text + str(m.blocks)
        assert "<!channel>" not in raw and "<@U0LEAD0001> <!subteam^" not in raw, raw
    assert "&lt;!channel&gt;" in str(message.blocks)
