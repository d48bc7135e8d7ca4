"""A plan's life: proposed -> approved -> running -> done | failed, or
rejected / cancelled / expired; running -> interrupted (the bot stopped) ->
running again on `/etcd resume`; interrupted or failed -> abandoned.

Every change of state is one guarded UPDATE in the store; whoever loses a
race is told so in the plan's thread and nothing runs twice. Approval rules
(how many distinct approvers, self-approval, TTL) come per kind of plan.
"""
from __future__ import annotations

import asyncio
import logging
import time

from bot.domain.mrkdwn import escape, mention
from bot.domain.plan import STOPPED_STATES, PlanState
from bot.domain.record import PlanRecord
from bot.ops.access import Role
from bot.ops.context import BotContext
from bot.ops.engine import note, refresh, start_plan
from bot.ops.outcome import Outcome, open_plan_refusal, refused
from bot.output import blocks
from bot.output.interactive import fingerprint_tag

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- propose


# ---------------------------------------------------------------- reactions

def reaction_name(raw: str) -> str:
    """`+1::skin-tone-2` -> `+1`: a skin tone does not change the meaning."""
    return raw.split("::", 1)[0]


# How long an approval or rejection on a message the bot does not know yet waits for it to become a plan's:
# the plan is posted first and its message's ts recorded right after, so a quick reaction can fall between.
MESSAGE_RECORD_WAIT = 5.0


async def plan_reacted_to(ctx: BotContext, channel: str, ts: str, reaction: str) -> PlanRecord | None:
    """The plan whose message `ts` is. An approval or rejection on a message not (yet) known as a plan's
    asks again for a few seconds, so that it is not ignored because it came before the ts was recorded."""
    approval = ctx.config.approval
    decisive = reaction_name(reaction) in (approval.reaction, approval.reject_reaction)
    deadline = time.monotonic() + (MESSAGE_RECORD_WAIT if decisive else 0.0)
    while (record := await ctx.store.plan_by_message(channel, ts)) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return record


async def on_reaction(ctx: BotContext, record: PlanRecord, user: str, reaction: str) -> None:
    """An approval or rejection reaction on a plan message; other reactions are ignored."""
    approval = ctx.config.approval
    name = reaction_name(reaction)
    if name == approval.reaction:
        await approve(ctx, record, user)
    elif name == approval.reject_reaction:
        await reject(ctx, record, user)


async def _is_approver(ctx: BotContext, record: PlanRecord, user: str) -> bool:
    cluster = ctx.config.cluster(record.cluster)
    return cluster is not None and await ctx.access.allowed(cluster, user, Role.APPROVER)


async def _approvers(ctx: BotContext, record: PlanRecord) -> str:
    """The approvers by name: refusals say who may act without notifying them."""
    cluster = ctx.config.cluster(record.cluster)
    return await ctx.access.names(cluster, Role.APPROVER) if cluster else "nobody"


async def approve(ctx: BotContext, record: PlanRecord, user: str, *, privately: bool = False) -> bool:
    """Count `user`'s approval (True), or say why it counts for nothing (False): in the thread, or to
    `user` alone when `privately` (a button)."""
    store, plan_id = ctx.store, record.id
    rule = ctx.config.approval.rule(record.kind)
    if not await _is_approver(ctx, record, user):
        await _refuse(ctx, record, user, "approve_refused",
                      f"{mention(user)} is not an approver, so plan {plan_id} is not approved "
                      f"(approvers: {await _approvers(ctx, record)}).", privately)
        return False
    if user == record.proposer and not rule.allow_self_approval:
        await _refuse(ctx, record, user, "approve_refused",
                      f"{mention(user)} proposed plan {plan_id} and cannot approve it too: "
                      f"another approver must approve (allow_self_approval is off).", privately)
        return False
    if record.state == PlanState.PROPOSED and time.time() >= record.expires_at:
        await expire(ctx, record)
        await _refuse_expired(ctx, record, user, privately)
        return False
    first, count, won = await store.add_approval(plan_id, user, rule.approvals_needed)
    if won:
        await store.audit("plan_approved", user=user, channel=record.channel, cluster=record.cluster,
                          detail={"plan": plan_id, "approvals": count})
        await note(ctx, record, f":white_check_mark: Approved by {mention(user)}. Executing plan {plan_id} now.")
        start_plan(ctx, plan_id, user, from_states=(PlanState.APPROVED,), start=0)  # else the leader picks it up
        return True
    elif first:
        await store.audit("plan_approval", user=user, channel=record.channel, cluster=record.cluster,
                          detail={"plan": plan_id, "approvals": count, "needed": rule.approvals_needed})
        await refresh(ctx, plan_id)
        await note(ctx, record, f":ballot_box_with_check: Approval {count} of {rule.approvals_needed} for plan "
                                f"{plan_id}, by {mention(user)}; it runs when {rule.approvals_needed} approvers agree.")
        return True
    elif count:
        await _refuse(ctx, record, user, "approve_ignored",
                      f"{mention(user)} approved plan {plan_id} already; each approver counts once "
                      f"({count} of {rule.approvals_needed}).", privately)
        return False
    else:
        current = await store.plan(plan_id) or record
        if current.state == PlanState.EXPIRED:   # upkeep expired it first: the same words as above
            await _refuse_expired(ctx, record, user, privately)
            return False
        await _refuse(ctx, record, user, "approve_ignored",
                      f"plan {plan_id} is {current.state}{_decided(current)}, not proposed: "
                      f"{mention(user)}'s approval changes nothing.", privately)
    return False


async def _refuse_expired(ctx: BotContext, record: PlanRecord, user: str, privately: bool) -> None:
    """An approval that came too late, whether it expired the plan or the leader's upkeep had."""
    await _refuse(ctx, record, user, "approve_refused",
                  f"plan {record.id} expired at {blocks.slack_date(record.expires_at)}: propose it again.", privately)


def _decided(record: PlanRecord) -> str:
    """` by @bob at <date>`: who moved the plan on, and when, for a refusal that says it is too late."""
    by = f" by {mention(record.decided_by)}" if record.decided_by else ""
    return by + (f" at {blocks.slack_date(record.decided_at)}" if by and record.decided_at else "")


async def reject(ctx: BotContext, record: PlanRecord, user: str, *, privately: bool = False) -> None:
    plan_id = record.id
    if user != record.proposer and not await _is_approver(ctx, record, user):
        await _refuse(ctx, record, user, "reject_refused",
                      f"{mention(user)} is neither an approver nor the proposer, so plan {plan_id} is not rejected.",
                      privately)
        return
    if not await ctx.store.transition(plan_id, [PlanState.PROPOSED], PlanState.REJECTED, decided_by=user,
                                      decided_at=time.time()):
        current = await ctx.store.plan(plan_id) or record
        await _refuse(ctx, record, user, "reject_ignored",
                      f"plan {plan_id} is {current.state}{_decided(current)}, not proposed: the rejection changes "
                      "nothing.", privately)
        return
    await ctx.store.audit("plan_rejected", user=user, channel=record.channel, cluster=record.cluster,
                          detail={"plan": plan_id})
    await refresh(ctx, plan_id)
    await note(ctx, record, f":no_entry_sign: Rejected by {mention(user)}. Nothing was changed.")


async def _refuse(ctx: BotContext, record: PlanRecord, user: str, action: str, text: str,
                  privately: bool = False) -> None:
    """A refused reaction: the first one of a user on a plan is answered in its
    thread; repeats only to that user, so nobody can flood the thread. A refused
    click (`privately`) is answered to its user alone, always."""
    repeated = privately or await ctx.store.acted_before(action, user, record.id)
    await ctx.store.audit(action, user=user, channel=record.channel, cluster=record.cluster,
                          detail={"plan": record.id, "why": text})
    if repeated:
        await ctx.notifier.private_note(record, user, f":no_entry: {text}")
    else:
        await note(ctx, record, f":no_entry: {text}")


async def on_click(ctx: BotContext, record: PlanRecord, user: str, approving: bool, tag: str) -> None:
    """A click on a plan message's Approve or Reject button. Everything is checked again on every click (the
    button shows what the message said when it was drawn): its plan's fingerprint, then the clicker's role
    and the plan's state; each approver counts once, as with reactions. A refusal is one line to the clicker
    alone and changes nothing."""
    if tag != fingerprint_tag(record.plan.fingerprint):
        await _refuse(ctx, record, user, "approve_refused" if approving else "reject_refused",
                      f"this button belongs to another version of plan {record.id}: nothing changed; use the plan's "
                      "current message.", privately=True)
        return
    if approving:
        await approve(ctx, record, user, privately=True)
    else:
        await reject(ctx, record, user, privately=True)


# ---------------------------------------------------------------- commands on a plan

async def _plan_for(ctx: BotContext, plan_id: str, channel: str) -> PlanRecord | None:
    record = await ctx.store.plan(plan_id)
    return record if record is not None and record.channel == channel else None


async def _stopped_plan(ctx: BotContext, plan_id: str, user: str, channel: str, what: str) -> PlanRecord | Outcome:
    """The plan an approver resumes or abandons, or the refusal to answer instead (audited)."""
    record = await _plan_for(ctx, plan_id, channel)
    if record is None:
        return refused(f"no plan {plan_id!r} in this channel", "see /etcd plans")
    if await _is_approver(ctx, record, user):
        return record
    await ctx.store.audit(f"{what}_refused", user=user, channel=record.channel, cluster=record.cluster,
                          detail={"plan": record.id, "missing_role": "approver"})
    return refused(f"{what}ing plan {record.id} needs the approver role, which you do not hold "
                    f"(approvers: {await _approvers(ctx, record)})")


async def resume(ctx: BotContext, plan_id: str, user: str, channel: str) -> Outcome:
    record = await _stopped_plan(ctx, plan_id, user, channel, "resum")
    if isinstance(record, Outcome):
        return record
    if record.state not in STOPPED_STATES:
        return refused(f"plan {plan_id} is {record.state}; only an interrupted or failed plan can be resumed")
    start = record.current_step
    open_plan = await ctx.store.open_plan(record.cluster)
    if open_plan and open_plan.id != plan_id:
        return open_plan_refusal(open_plan.id, open_plan.state)
    step = record.plan.steps[start]
    # Approved again, at the step it stopped on: the leader (this replica or another) runs it from there.
    if not await ctx.store.transition(plan_id, STOPPED_STATES, PlanState.APPROVED):
        return refused(f"plan {plan_id} changed state meanwhile; see /etcd plans")
    await ctx.store.audit("plan_resumed", user=user, channel=channel, cluster=record.cluster,
                          detail={"plan": plan_id, "step": step.key})
    await note(ctx, record, f":arrow_forward: {mention(user)} resumed plan {plan_id} at step {start} "
                            f"({escape(step.title)}), after the re-check of step 0.")
    start_plan(ctx, plan_id, user, from_states=(PlanState.APPROVED,), start=start)
    return Outcome(ephemeral=blocks.Reply(text=f"Resuming plan {plan_id} at step {start}; progress is in its thread."))


async def abandon(ctx: BotContext, plan_id: str, reason: str, user: str, channel: str) -> Outcome:
    """Close a stopped plan without undoing anything, so a new one can be made;
    says which steps had run, since those changes stay."""
    record = await _stopped_plan(ctx, plan_id, user, channel, "abandon")
    if isinstance(record, Outcome):
        return record
    if record.state not in STOPPED_STATES:
        hint = {PlanState.PROPOSED: f"a proposed plan is cancelled instead: `/etcd cancel {plan_id}`",
                PlanState.APPROVED: "it is about to run; let it finish or fail first",
                PlanState.RUNNING: "it is running; let it finish or fail first"}.get(
                    record.state, "it is closed already; nothing to abandon")
        return refused(f"plan {plan_id} is {record.state}; only an interrupted or failed plan can be abandoned", hint)
    if not await ctx.store.transition(plan_id, STOPPED_STATES, PlanState.ABANDONED, decided_by=user,
                                      decided_at=time.time()):
        return refused(f"plan {plan_id} changed state meanwhile; see /etcd plans")
    ran, done = await _steps_run(ctx, record)
    await ctx.store.audit("plan_abandoned", user=user, channel=channel, cluster=record.cluster,
                          detail={"plan": plan_id, "reason": reason, "steps_run": done})
    await refresh(ctx, plan_id)
    listing = "\n".join(ran) or "(none)"
    summary = (f"Plan {plan_id} abandoned by {mention(user)}: {escape(reason)}. Nothing was undone; the steps that had "
               f"run:\n{listing}\nA new plan for {escape(record.cluster)} can be proposed now.")
    await note(ctx, record, f":wastebasket: {summary}")
    return Outcome(ephemeral=blocks.Reply(text=summary))


async def _steps_run(ctx: BotContext, record: PlanRecord) -> tuple[list[str], list[str]]:
    """The steps that had run when a plan was closed part-way, as lines to show (changes that stay), and the
    keys of those done (for the audit)."""
    steps = await ctx.store.steps(record.id)
    shown = [f"{s.idx}. {escape(record.plan.steps[s.idx].title)} ({s.state})" for s in steps
             if s.state in ("done", "failed", "running")]
    return shown, [s.key for s in steps if s.state == "done"]


async def cancel(ctx: BotContext, plan_id: str, user: str, channel: str, reason: str = "") -> Outcome:
    """A proposed plan, by its proposer or an approver; a running plan while it waits on a person (a manual
    stage), by an approver and with a reason: the one safe point at which a running plan can stop."""
    record = await _plan_for(ctx, plan_id, channel)
    if record is None:
        return refused(f"no plan {plan_id!r} in this channel", "see /etcd plans")
    if record.state == PlanState.RUNNING:
        return await _cancel_waiting(ctx, record, user, reason)
    if user != record.proposer and not await _is_approver(ctx, record, user):
        await ctx.store.audit("cancel_refused", user=user, channel=channel, cluster=record.cluster,
                              detail={"plan": plan_id, "missing_role": "approver or proposer"})
        return refused(f"cancelling plan {plan_id} needs the approver role or being its proposer "
                        f"(approvers: {await _approvers(ctx, record)})")
    if not await ctx.store.transition(plan_id, [PlanState.PROPOSED], PlanState.CANCELLED, decided_by=user,
                                      decided_at=time.time()):
        return refused(f"plan {plan_id} is {record.state}; only a proposed plan can be cancelled")
    await ctx.store.audit("plan_cancelled", user=user, channel=channel, cluster=record.cluster,
                          detail={"plan": plan_id, **({"reason": reason} if reason else {})})
    await refresh(ctx, plan_id)
    why = f": {escape(reason)}" if reason else ""
    await note(ctx, record, f":wastebasket: Cancelled by {mention(user)}{why}. Nothing was changed.")
    return Outcome(ephemeral=blocks.Reply(text=f"Plan {plan_id} cancelled."))


async def _cancel_waiting(ctx: BotContext, record: PlanRecord, user: str, reason: str) -> Outcome:
    plan_id = record.id
    if not await _is_approver(ctx, record, user):
        await ctx.store.audit("cancel_refused", user=user, channel=record.channel, cluster=record.cluster,
                              detail={"plan": plan_id, "missing_role": "approver"})
        return refused(f"stopping running plan {plan_id} needs the approver role, which you do not hold "
                       f"(approvers: {await _approvers(ctx, record)})")
    if not reason:
        return refused(f"plan {plan_id} is running: say why it stops, `/etcd cancel {plan_id} <reason>`")
    stage = await ctx.store.cancel_stage(plan_id, user, reason)
    if stage is None:
        return refused(f"plan {plan_id} is running and waits on nobody now, so it cannot stop safely here",
                       "a running plan stops only where it waits on a person (a manual stage); let it finish or "
                       "fail, then /etcd abandon it")
    ran, done = await _steps_run(ctx, record)
    await ctx.store.audit("plan_cancelled", user=user, channel=record.channel, cluster=record.cluster,
                          detail={"plan": plan_id, "reason": reason, "stage": stage.key, "steps_run": done})
    await refresh(ctx, plan_id)
    listing = "\n".join(ran) or "(none)"
    summary = (f"Plan {plan_id} cancelled by {mention(user)} while it waited on stage *{escape(stage.key)}*: "
               f"{escape(reason)}. Nothing was undone; the steps that had run (what a person did at that stage "
               f"stays done too):\n{listing}\nA new plan for {escape(record.cluster)} can be proposed now.")
    await note(ctx, record, f":wastebasket: {summary}")
    return Outcome(ephemeral=blocks.Reply(text=summary))


# ---------------------------------------------------------------- housekeeping

def resumes_on_takeover(ctx: BotContext) -> bool:
    """Whether a new leader resumes the plans its predecessor left running. On a
    shared PostgreSQL another replica takes over at once, so it does; a single
    SQLite replica restarting reports them interrupted and an approver decides."""
    configured = ctx.config.replicas.resume_on_takeover
    return configured if configured is not None else isinstance(ctx.config.database, str)  # str: a postgresql:// URL


async def take_over(ctx: BotContext) -> list[str]:
    """At the start of each tenure: the plans left running or approved by the
    previous leader (another replica, or this one before it stopped) are
    resumed from their last persisted step, the step in flight re-checked before
    it is retried; or, without resume_on_takeover, reported interrupted."""
    taken = []
    resume = resumes_on_takeover(ctx)
    for record in await ctx.store.plans(states=(PlanState.RUNNING, PlanState.APPROVED), limit=1000):
        if record.id in ctx.running:
            continue
        if not resume:
            if await _interrupted(ctx, record):
                taken.append(record.id)
            continue
        if record.state == PlanState.RUNNING:
            step = record.plan.steps[record.current_step]
            await ctx.store.audit("plan_taken_over", channel=record.channel, cluster=record.cluster,
                                  detail={"plan": record.id, "step": step.key, "replica": ctx.leadership.replica_id})
            await note(ctx, record, f":arrows_counterclockwise: Replica {escape(ctx.leadership.replica_id)} took over "
                                    f"plan {record.id}; it continues at step {record.current_step} "
                                    f"({escape(step.title)}) after re-checking the cluster.")
        if start_plan(ctx, record.id, record.decided_by or "", from_states=(record.state,), start=record.current_step):
            taken.append(record.id)
    if taken:
        log.warning("plans taken over from the previous leader", extra={"ctx_plans": taken, "ctx_resumed": resume})
    return taken


async def pick_up(ctx: BotContext) -> None:
    """On the leader, about every second: run the plans approved (or resumed)
    through another replica; the guarded transition to running lets one run win."""
    for record in await ctx.store.plans(states=(PlanState.APPROVED,), limit=100):
        start_plan(ctx, record.id, record.decided_by or "", from_states=(PlanState.APPROVED,),
                   start=record.current_step)


async def _interrupted(ctx: BotContext, record: PlanRecord) -> bool:
    """A plan cut off by a stop of the bot: say so in its thread and in its error (the one line /etcd plans
    shows); an approver decides to resume or abandon."""
    step = record.plan.steps[record.current_step]
    why = f"interrupted at step {record.current_step} ({step.key}) when the bot stopped"
    if not await ctx.store.transition(record.id, [record.state], PlanState.INTERRUPTED, error=why,
                                      fence=ctx.leadership.fence):
        return False
    await ctx.store.audit("plan_interrupted", channel=record.channel, cluster=record.cluster,
                          detail={"plan": record.id, "step": step.key})
    await refresh(ctx, record.id)
    await note(ctx, record, f":warning: Plan {record.id} was interrupted at step {record.current_step} "
                            f"({escape(step.title)}) when the bot stopped. An approver can continue from that step "
                            f"with `/etcd resume {record.id}` (the cluster is re-checked first; every step is "
                            f"safe to repeat), or close it with `/etcd abandon {record.id} &lt;reason&gt;`.")
    return True


async def expire(ctx: BotContext, record: PlanRecord) -> bool:
    if not await ctx.store.transition(record.id, [PlanState.PROPOSED], PlanState.EXPIRED):
        return False
    await ctx.store.audit("plan_expired", channel=record.channel, cluster=record.cluster, detail={"plan": record.id})
    await refresh(ctx, record.id)
    return True


async def expire_stale(ctx: BotContext) -> int:
    now = time.time()
    n = 0
    for record in await ctx.store.plans(states=(PlanState.PROPOSED,), limit=1000):
        if record.expires_at <= now and await expire(ctx, record):
            await note(ctx, record,
                       f":hourglass: Plan {record.id} expired unapproved. Propose it again if still needed.")
            n += 1
    return n
