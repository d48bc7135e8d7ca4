"""Changing a cluster through a plan: propose one (replace, restore, defrag), list them, and move one along
(cancel, resume, abandon, continue). Proposing needs the operator role; a plan runs only once approved."""
from __future__ import annotations

from bot.commands.grammar import Command
from bot.commands.registry import command
from bot.config import ClusterConfig
from bot.domain.replace import ReplaceRequest
from bot.ops import lifecycle
from bot.ops.access import Role
from bot.ops.context import BotContext
from bot.ops.defrag import plan as defrag
from bot.ops.outcome import Outcome
from bot.ops.replace import plan as replace
from bot.ops.restore import plan as restore
from bot.ops.restore import run as restore_run
from bot.output import blocks

CLUSTER = ("[cluster]",), ("--cluster",)


@command("replace", ("failed-name-or-hex-id", "new-name", "new-peer-url"), ("--client-url", "--cluster"),
         ("--no-learner",), summary="propose replacing a failed member; runs once approved (one approver by default)",
         urls=("new_peer_url", "client_url"), role=Role.OPERATOR)
async def propose_replace(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    req = ReplaceRequest(failed=cmd.args["failed_name_or_hex_id"], new_name=cmd.args["new_name"],
                         new_peer_url=cmd.args["new_peer_url"], new_client_url=cmd.args.get("client_url"),
                         learner="no_learner" not in cmd.flags)
    return await replace.propose(ctx, cluster, req, user, channel, cmd.spec.usage)


@command("restore", ("[snapshot]",), ("--cluster",), ("--force",), role=Role.OPERATOR,
         summary="propose restoring every member from a verified snapshot (after a quorum loss; --force to roll back a "
                 "healthy cluster); runs once approved (two approvers by default)")
async def propose_restore(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    return await restore.propose_restore(ctx, cluster, cmd.args.get("snapshot"), "force" in cmd.flags, user, channel,
                                         cmd.spec.usage)


@command("defrag", ("[cluster]",), ("--cluster", "--rule"), ("--no-compact",), role=Role.OPERATOR,
         summary="propose a rolling defragmentation (followers, then the leader after moving leadership), "
                 "compaction and NOSPACE disarm; runs once approved (one approver by default)")
async def propose_defrag(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    return await defrag.propose(ctx, cluster, cmd.args.get("rule"), "no_compact" not in cmd.flags, user, channel,
                                cmd.spec.usage)


@command("plans", *CLUSTER, summary="recent plans and their state", role=Role.READER)
async def plans(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    return Outcome(channel=blocks.plans_reply(cluster.name, await ctx.store.plans(cluster.name, limit=10)))


@command("cancel", ("plan-id", "[reason]"), rest=True, role=None, names_plan=True,
         summary="cancel a proposed plan (proposer or approver), or stop one waiting on a person, with a reason "
                 "(approvers)")
async def cancel(ctx: BotContext, cmd: Command, cluster: None, user: str, channel: str) -> Outcome:
    return await lifecycle.cancel(ctx, cmd.args["plan_id"], user, channel, cmd.args.get("reason", ""))


@command("resume", ("plan-id",), summary="continue an interrupted or failed plan from its step (approvers)",
         role=Role.APPROVER, names_plan=True)
async def resume(ctx: BotContext, cmd: Command, cluster: None, user: str, channel: str) -> Outcome:
    return await lifecycle.resume(ctx, cmd.args["plan_id"], user, channel)


@command("abandon", ("plan-id", "reason"), rest=True, role=Role.APPROVER, names_plan=True,
         summary="close an interrupted or failed plan without undoing anything, so a new one can be made (approvers)")
async def abandon(ctx: BotContext, cmd: Command, cluster: None, user: str, channel: str) -> Outcome:
    return await lifecycle.abandon(ctx, cmd.args["plan_id"], cmd.args["reason"], user, channel)


@command("continue", ("plan-id", "[stage]"), role=Role.APPROVER, names_plan=True,
         summary="confirm the stage a restore plan waits on for a person now: apiserver-stop, stop, restore, start "
                 "(approvers)")
async def confirm_stage(ctx: BotContext, cmd: Command, cluster: None, user: str, channel: str) -> Outcome:
    return await restore_run.continue_plan(ctx, cmd.args["plan_id"], cmd.args.get("stage"), user, channel,
                                           cmd.spec.usage)
