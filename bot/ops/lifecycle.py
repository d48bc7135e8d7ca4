"""A replacement plan's life: proposed -> approved -> running -> done | failed,
or rejected / cancelled / expired; running -> interrupted (the bot stopped)
-> running again on `/etcd resume`.

Every change of state is one guarded UPDATE in the store; whoever loses a
race is told so in the plan's thread and nothing runs twice.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from bot.slack import blocks
from bot.ops.access import Role
from bot.config import ClusterConfig
from bot.ops.context import BotContext
from bot.etcd.model import EtcdError
from bot.ops.executor import Executor, StepFailed, plan_view, refresh_message, say_in_thread
from bot.ops.replace import MemberRef, Plan, Refusal, ReplaceRequest, plan_replacement
from bot.slack.web import SlackPostError, post
from bot.store.sqlite import OpenPlanExists

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What a command leaves: a channel message, an answer only the user sees, or both."""

    channel: blocks.Reply | None = None
    ephemeral: blocks.Reply | None = None


def _refused(reason: str, hint: str | None = None, usage: str | None = None) -> Outcome:
    return Outcome(ephemeral=blocks.error_reply(reason, usage, hint))


# ---------------------------------------------------------------- propose

async def propose(ctx: BotContext, cluster: ClusterConfig, req: ReplaceRequest, user: str, channel: str,
                  usage: str) -> Outcome:
    store = ctx.store
    open_plan = await store.open_plan(cluster.name)
    if open_plan:
        return _open_plan_refusal(open_plan)
    try:
        health = await ctx.check(cluster)
    except EtcdError as e:
        return _refused(f"cannot read cluster {cluster.name}: {e}")
    newest = await store.snapshots(cluster.name, limit=1)
    removed = None if health.find(req.failed) else await removed_by_earlier_plan(ctx, cluster.name, req.failed)
    try:
        plan = plan_replacement(health, req, newest_snapshot=newest[0]["path"] if newest else None,
                                launcher=cluster.launcher.kind, removed=removed)
    except Refusal as r:
        await store.audit("replace_refused", user=user, channel=channel, cluster=cluster.name,
                          detail={"reason": r.reason, "request": req.__dict__})
        return _refused(f"cannot replace {req.failed} in {cluster.name}: {r.reason}", r.hint, usage)
    now = time.time()
    row = {"id": plan.id, "cluster": cluster.name, "state": "proposed", "channel": channel, "proposer": user,
           "created_at": now, "expires_at": now + ctx.config.approval.ttl_minutes * 60, "fingerprint": plan.fingerprint,
           "plan": json.dumps(plan.to_json())}
    try:
        await store.insert_plan(row)
    except OpenPlanExists as e:
        return _open_plan_refusal(await store.plan(e.plan_id) or {"id": e.plan_id, "state": e.state})
    try:
        ts = await post(ctx.web, channel, blocks.plan_reply(plan, plan_view(ctx, row)))
    except SlackPostError as e:
        await store.transition(plan.id, ["proposed"], "cancelled", error=f"could not post the plan: {e}")
        return _refused(f"could not post the plan in this channel: {e}")
    await store.update_plan(plan.id, message_ts=ts)
    await store.audit("plan_proposed", user=user, channel=channel, cluster=cluster.name,
                      detail={"plan": plan.id, "failed": plan.failed.id, "new_name": plan.new_name,
                              "new_peer_url": plan.new_peer_url, "learner": plan.learner})
    return Outcome()


async def removed_by_earlier_plan(ctx: BotContext, cluster: str, ref: str) -> tuple[MemberRef, str] | None:
    """A failed member an earlier plan removed (etcd < 3.6 requires removing every
    unreachable voter before an add) and nobody has replaced yet."""
    wanted = ref.strip().lower()
    rows = await ctx.store.plans(cluster, limit=50, states=("done",))
    replaced = {Plan.from_json(json.loads(r["plan"])).failed.id for r in rows}
    for row in rows:
        for m in Plan.from_json(json.loads(row["plan"])).also_remove:
            if m.id not in replaced and wanted in (m.name.lower(), m.id):
                return m, row["id"]
    return None


def _open_plan_refusal(row: dict) -> Outcome:
    return _refused(f"plan {row['id']} is {row['state']} for this cluster: one open plan per cluster",
                    f"let it finish, or cancel it with `/etcd cancel {row['id']}`" if row["state"] == "proposed"
                    else f"let plan {row['id']} finish (see /etcd plans)")


# ---------------------------------------------------------------- reactions

def reaction_name(raw: str) -> str:
    """`+1::skin-tone-2` -> `+1`: a skin tone does not change the meaning."""
    return raw.split("::", 1)[0]


async def on_reaction(ctx: BotContext, row: dict, user: str, reaction: str) -> None:
    """An approval or rejection reaction on a plan message; other reactions are ignored."""
    approval = ctx.config.approval
    name = reaction_name(reaction)
    if name == approval.reaction:
        await approve(ctx, row, user)
    elif name == approval.reject_reaction:
        await reject(ctx, row, user)


async def _is_approver(ctx: BotContext, row: dict, user: str) -> bool:
    cluster = ctx.config.cluster(row["cluster"])
    return cluster is not None and await ctx.access.allowed(cluster, user, Role.APPROVER)


def _approvers(ctx: BotContext, row: dict) -> str:
    cluster = ctx.config.cluster(row["cluster"])
    return ctx.access.holders(cluster, Role.APPROVER) if cluster else "nobody"


async def approve(ctx: BotContext, row: dict, user: str) -> None:
    store, plan_id = ctx.store, row["id"]
    if not await _is_approver(ctx, row, user):
        await _refuse_in_thread(ctx, row, user, "approve_refused",
                                f"<@{user}> is not an approver, so plan {plan_id} is not approved "
                                f"(approvers: {_approvers(ctx, row)}).")
        return
    if user == row["proposer"] and not ctx.config.approval.allow_self_approval:
        await _refuse_in_thread(ctx, row, user, "approve_refused",
                                f"<@{user}> proposed plan {plan_id} and cannot approve it too: "
                                f"another approver must react (allow_self_approval is off).")
        return
    if row["state"] == "proposed" and time.time() >= row["expires_at"]:
        await expire(ctx, row)
        await _refuse_in_thread(ctx, row, user, "approve_refused",
                                f"plan {plan_id} expired at {blocks.slack_date(row['expires_at'])}: propose it again.")
        return
    won = await store.transition(plan_id, ["proposed"], "approved", decided_by=user, decided_at=time.time())
    if not won:
        current = await store.plan(plan_id) or row
        by = f" by <@{current['decided_by']}>" if current.get("decided_by") else ""
        await _refuse_in_thread(ctx, row, user, "approve_ignored",
                                f"plan {plan_id} is {current['state']}{by}, not proposed: <@{user}>'s approval changes nothing.")
        return
    await store.audit("plan_approved", user=user, channel=row["channel"], cluster=row["cluster"], detail={"plan": plan_id})
    await say_in_thread(ctx, row, f":white_check_mark: Approved by <@{user}>. Executing plan {plan_id} now.")
    ctx.spawn(execute(ctx, plan_id, user, from_states=("approved",), start=0), name=f"plan-{plan_id}")


async def reject(ctx: BotContext, row: dict, user: str) -> None:
    plan_id = row["id"]
    if user != row["proposer"] and not await _is_approver(ctx, row, user):
        await _refuse_in_thread(ctx, row, user, "reject_refused",
                                f"<@{user}> is neither an approver nor the proposer, so plan {plan_id} is not rejected.")
        return
    if not await ctx.store.transition(plan_id, ["proposed"], "rejected", decided_by=user, decided_at=time.time()):
        current = await ctx.store.plan(plan_id) or row
        await _refuse_in_thread(ctx, row, user, "reject_ignored",
                                f"plan {plan_id} is {current['state']}, not proposed: the rejection changes nothing.")
        return
    await ctx.store.audit("plan_rejected", user=user, channel=row["channel"], cluster=row["cluster"], detail={"plan": plan_id})
    await refresh_message(ctx, plan_id)
    await say_in_thread(ctx, row, f":no_entry_sign: Rejected by <@{user}>. Nothing was changed.")


async def _refuse_in_thread(ctx: BotContext, row: dict, user: str, action: str, text: str) -> None:
    await ctx.store.audit(action, user=user, channel=row["channel"], cluster=row["cluster"],
                          detail={"plan": row["id"], "why": text})
    await say_in_thread(ctx, row, f":no_entry: {text}")


# ---------------------------------------------------------------- execution

async def execute(ctx: BotContext, plan_id: str, actor: str, *, from_states: tuple[str, ...], start: int) -> str:
    """Take the plan to `running` (guarded) and run it from step `start`."""
    if not await ctx.store.transition(plan_id, from_states, "running", error=None):
        return "skipped"
    row = await ctx.store.plan(plan_id)
    try:
        executor = Executor(ctx, row, actor)
    except StepFailed as e:
        await ctx.store.transition(plan_id, ["running"], "failed", error=e.reason, finished_at=time.time())
        await say_in_thread(ctx, row, f":x: Plan {plan_id} cannot run: {e.reason}")
        return "failed"
    return await executor.run(start)


async def resume(ctx: BotContext, plan_id: str, user: str, channel: str) -> Outcome:
    row = await ctx.store.plan(plan_id)
    if row is None or row["channel"] != channel:
        return _refused(f"no plan {plan_id!r} in this channel", "see /etcd plans")
    if not await _is_approver(ctx, row, user):
        await ctx.store.audit("resume_refused", user=user, channel=channel, cluster=row["cluster"],
                              detail={"plan": plan_id, "missing_role": "approver"})
        return _refused(f"resuming plan {plan_id} needs the approver role, which you do not hold "
                        f"(approvers: {_approvers(ctx, row)})")
    if row["state"] not in ("interrupted", "failed"):
        return _refused(f"plan {plan_id} is {row['state']}; only an interrupted or failed plan can be resumed")
    start = row["current_step"]
    plan = Plan.from_json(json.loads(row["plan"]))
    open_plan = await ctx.store.open_plan(row["cluster"])
    if open_plan and open_plan["id"] != plan_id:
        return _open_plan_refusal(open_plan)
    await ctx.store.audit("plan_resumed", user=user, channel=channel, cluster=row["cluster"],
                          detail={"plan": plan_id, "step": plan.steps[start].key})
    await say_in_thread(ctx, row, f":arrow_forward: <@{user}> resumed plan {plan_id} at step {start} "
                                  f"({plan.steps[start].title}).")
    ctx.spawn(execute(ctx, plan_id, user, from_states=("interrupted", "failed"), start=start), name=f"plan-{plan_id}")
    return Outcome(ephemeral=blocks.Reply(text=f"Resuming plan {plan_id} at step {start}; progress is in its thread."))


async def cancel(ctx: BotContext, plan_id: str, user: str, channel: str) -> Outcome:
    row = await ctx.store.plan(plan_id)
    if row is None or row["channel"] != channel:
        return _refused(f"no plan {plan_id!r} in this channel", "see /etcd plans")
    if user != row["proposer"] and not await _is_approver(ctx, row, user):
        await ctx.store.audit("cancel_refused", user=user, channel=channel, cluster=row["cluster"],
                              detail={"plan": plan_id, "missing_role": "approver or proposer"})
        return _refused(f"cancelling plan {plan_id} needs the approver role or being its proposer "
                        f"(approvers: {_approvers(ctx, row)})")
    if not await ctx.store.transition(plan_id, ["proposed"], "cancelled", decided_by=user, decided_at=time.time()):
        return _refused(f"plan {plan_id} is {row['state']}; only a proposed plan can be cancelled")
    await ctx.store.audit("plan_cancelled", user=user, channel=channel, cluster=row["cluster"], detail={"plan": plan_id})
    await refresh_message(ctx, plan_id)
    await say_in_thread(ctx, row, f":wastebasket: Cancelled by <@{user}>. Nothing was changed.")
    return Outcome(ephemeral=blocks.Reply(text=f"Plan {plan_id} cancelled."))


# ---------------------------------------------------------------- housekeeping

async def recover_interrupted(ctx: BotContext) -> list[str]:
    """At start-up: a plan left running (or approved) was cut off by a stop
    of the bot. Say so in its thread; an approver decides to resume."""
    recovered = []
    for row in await ctx.store.plans(states=("running", "approved"), limit=1000):
        if not await ctx.store.transition(row["id"], [row["state"]], "interrupted"):
            continue
        recovered.append(row["id"])
        plan = Plan.from_json(json.loads(row["plan"]))
        step = plan.steps[row["current_step"]]
        await ctx.store.audit("plan_interrupted", channel=row["channel"], cluster=row["cluster"],
                              detail={"plan": row["id"], "step": step.key})
        await refresh_message(ctx, row["id"])
        await say_in_thread(ctx, row, f":warning: Plan {row['id']} was interrupted at step {row['current_step']} "
                                      f"({step.title}) when the bot stopped. An approver can continue from that step "
                                      f"with `/etcd resume {row['id']}`; every step is safe to repeat.")
    return recovered


async def expire(ctx: BotContext, row: dict) -> bool:
    if not await ctx.store.transition(row["id"], ["proposed"], "expired"):
        return False
    await ctx.store.audit("plan_expired", channel=row["channel"], cluster=row["cluster"], detail={"plan": row["id"]})
    await refresh_message(ctx, row["id"])
    return True


async def expire_stale(ctx: BotContext) -> int:
    now = time.time()
    n = 0
    for row in await ctx.store.plans(states=("proposed",), limit=1000):
        if row["expires_at"] <= now and await expire(ctx, row):
            await say_in_thread(ctx, row, f":hourglass: Plan {row['id']} expired unapproved. Propose it again if still needed.")
            n += 1
    return n
