"""Publishing a new plan of any kind: stored proposed (with its kind's TTL), posted, its message remembered,
audited. Every operation's proposal ends here."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from bot.domain.plan import PlanKind, PlanState
from bot.domain.record import AnyPlan, NewPlan
from bot.ops.notify import NotifyFailed
from bot.ops.outcome import Outcome, open_plan_refusal, refused
from bot.store.base import OpenPlanExists

if TYPE_CHECKING:  # the context is gRPC's; the planning above it is not
    from bot.ops.context import BotContext


async def publish_plan(ctx: BotContext, kind: PlanKind, plan: AnyPlan, cluster: str, user: str, channel: str,
                       detail: dict[str, Any]) -> Outcome:
    """Store a new plan of any kind (proposed, with its kind's TTL), post it, remember its message."""
    store = ctx.store
    now = time.time()
    new = NewPlan(id=plan.id, kind=kind, cluster=cluster, plan=plan, channel=channel, proposer=user, created_at=now,
                  expires_at=now + ctx.config.approval.rule(kind).ttl_minutes * 60, fingerprint=plan.fingerprint)
    try:
        await store.insert_plan(new)
    except OpenPlanExists as e:
        return open_plan_refusal(e.plan_id, PlanState(e.state))
    record = await store.plan(plan.id)
    assert record is not None  # just inserted
    try:
        ts = await ctx.notifier.post_plan(record)
    except NotifyFailed as e:
        await store.transition(plan.id, [PlanState.PROPOSED], PlanState.CANCELLED,
                               error=f"could not post the plan: {e}")
        return refused(f"could not post the plan in this channel: {e}")
    await store.update_plan(plan.id, message_ts=ts)
    await store.audit("plan_proposed", user=user, channel=channel, cluster=cluster, detail=detail)
    posted = await store.plan(plan.id)   # its message known first: a quick approval finds its plan
    await ctx.notifier.plan_details(posted or record)
    return Outcome()
