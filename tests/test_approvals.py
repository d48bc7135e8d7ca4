"""Approvals per kind of plan: distinct approvers counted in the
store, each once; the plan runs exactly once when the count is reached, however
approvals race (racing in the store itself: tests/test_store_contract.py)."""
from __future__ import annotations

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
