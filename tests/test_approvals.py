"""Approvals per kind of plan: distinct approvers counted in the
store, each once; the plan runs exactly once when the count is reached, however
approvals race (racing in the store itself: tests/test_store_contract.py)."""
from __future__ import annotations

import asyncio

from bot.domain.plan import PlanState
from bot.testing.workspace import CHANNEL, LEAD, LEAD2, cluster_table
from helpers import APPROVAL, OK, audit_actions, plan_row, propose, replies, thread, urls, wait_done


async def test_a_plan_needing_two_approvers_runs_once_after_the_second(make_cluster, slack, start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval={**APPROVAL, "replace": {"approvals_needed": 2}})
    store = bot.ctx.store
    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]} --client-url {urls()[1]}")
    row = await plan_row(store, plan)
    assert "needs 2 approvers (0 so far)" in str(plan.blocks)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await slack.wait_for(lambda: "Approval 1 of 2" in thread(slack, plan), what="the first approval")
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)  # the same approver again counts once
    await slack.wait_for(lambda: "approved plan" in thread(slack, plan) and "already" in thread(slack, plan),
                         what="the repeated approval")
    assert (await store.plan(row["id"])).state is PlanState.PROPOSED
    assert "approvals 1 of 2" in str(slack.find_message(CHANNEL, plan.ts).blocks)
    await slack.react(user=LEAD2, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await wait_done(store, row["id"])
    assert sum("Approved by" in m.text for m in replies(slack, plan)) == 1
    record = await store.plan(row["id"])
    assert record.approvals == (LEAD, LEAD2) and record.decided_by == LEAD2
    actions = [a for a, _ in await audit_actions(store, row["id"])]
    assert actions.count("plan_approval") == 1 and actions.count("plan_approved") == 1


async def test_an_approval_that_comes_before_the_plan_message_is_recorded_counts(make_cluster, slack, start_bot,
                                                                                  monkeypatch):
    """The plan is posted, then its message's ts recorded: a quick approver (or a slow store) reacts in between.
    The reaction waits for the record instead of being ignored for good (before: the ✅ showed on the
    message and the plan stayed proposed until it expired). Found by the robustness harness."""
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    looked, recorded = asyncio.Event(), asyncio.Event()
    update_plan, plan_by_message = store.update_plan, store.plan_by_message

    async def record_late(plan_id: str, **fields):
        if "message_ts" in fields:  # the real write, held until the reaction has been looked up
            await recorded.wait()
        return await update_plan(plan_id, **fields)

    async def lookup(channel: str, ts: str):
        found = await plan_by_message(channel, ts)
        looked.set()
        return found
    monkeypatch.setattr(store, "update_plan", record_late)
    monkeypatch.setattr(store, "plan_by_message", lookup)
    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]} --client-url {urls()[1]}")
    assert (await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)).status == 200
    await asyncio.wait_for(looked.wait(), 10)  # the reaction found no plan for the message yet
    recorded.set()
    row = await plan_row(store, plan)
    await wait_done(store, row["id"])
    assert (await store.plan(row["id"])).decided_by == LEAD
