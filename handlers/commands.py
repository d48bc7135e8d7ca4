"""`/etcd <subcommand>`: parse, acknowledge at once, then do the work.

Bad input is answered in the acknowledgement itself (Slack shows it only
to the person who typed it); work that talks to etcd runs after the ack,
and its answer is a channel message, or an ephemeral one for refusals.
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack import blocks
from bot.ops import lifecycle
from bot.ops.access import COMMAND_ROLES
from bot.ops.commands import SPECS, Command, UsageError, general_usage, parse
from bot.config import ClusterConfig
from bot.ops.context import BotContext
from bot.etcd.model import EtcdError
from bot.ops.lifecycle import Outcome
from bot.ops.replace import ReplaceRequest
from bot.ops.routing import RoutingError, resolve_cluster
from bot.slack.web import SlackPostError, post
from bot.store.sqlite import StoreError
from bot.ops.snapshots import take_snapshot
from bot.etcd.snapshots import SnapshotFailed

log = logging.getLogger(__name__)
COMMAND = "/etcd"

Work = Callable[[BotContext, Command, ClusterConfig | None, str, str], Awaitable[Outcome]]


async def _status(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    try:
        health = await ctx.check(cluster)
    except EtcdError as e:
        return Outcome(channel=blocks.unreachable_reply(cluster.name, str(e)))
    if cmd.name == "members":
        return Outcome(channel=blocks.members_reply(health))
    return Outcome(channel=blocks.status_reply(health, requested_by=user))


async def _replace(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    req = ReplaceRequest(failed=cmd.args["failed_name_or_hex_id"], new_name=cmd.args["new_name"],
                         new_peer_url=cmd.args["new_peer_url"], new_client_url=cmd.args.get("client_url"),
                         learner="no_learner" not in cmd.flags)
    return await lifecycle.propose(ctx, cluster, req, user, channel, cmd.spec.usage)


async def _plans(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    return Outcome(channel=blocks.plans_reply(cluster.name, await ctx.store.plans(cluster.name, limit=10)))


async def _snapshot(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    try:
        saved = await take_snapshot(ctx, cluster, requested_by=user, reason="requested", channel=channel)
    except SnapshotFailed as e:
        await ctx.store.audit("snapshot_failed", user=user, channel=channel, cluster=cluster.name, detail={"reason": str(e)})
        return Outcome(channel=blocks.snapshot_failed_reply(cluster.name, str(e)))
    return Outcome(channel=blocks.snapshot_reply(saved, user))


async def _snapshots(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    return Outcome(channel=blocks.snapshots_reply(cluster.name, await ctx.store.snapshots(cluster.name, limit=15)))


async def _cancel(ctx: BotContext, cmd: Command, cluster: None, user: str, channel: str) -> Outcome:
    return await lifecycle.cancel(ctx, cmd.args["plan_id"], user, channel)


async def _resume(ctx: BotContext, cmd: Command, cluster: None, user: str, channel: str) -> Outcome:
    return await lifecycle.resume(ctx, cmd.args["plan_id"], user, channel)


# Commands that name a plan find their cluster through it; the others resolve one.
WORK: dict[str, tuple[Work, bool]] = {
    "status": (_status, True), "members": (_status, True), "replace": (_replace, True), "plans": (_plans, True),
    "snapshot": (_snapshot, True), "snapshots": (_snapshots, True),
    "cancel": (_cancel, False), "resume": (_resume, False),
}


async def _audit_quietly(ctx: BotContext, action: str, **fields) -> None:
    """Audit a refusal already answered; if the database is held, the log keeps the row."""
    try:
        await ctx.store.audit(action, **fields)
    except StoreError as e:
        log.error("audit row not written", extra={"ctx_action": action, "ctx_row": fields, "ctx_error": str(e)})


async def _plan_cluster(ctx: BotContext, cmd: Command) -> ClusterConfig | None:
    """The cluster of the plan a command names (cancel, resume)."""
    row = await ctx.store.plan(cmd.args.get("plan_id", ""))
    return ctx.config.cluster(row["cluster"]) if row else None


def register(app: AsyncApp, ctx: BotContext) -> None:
    @app.command(COMMAND)
    async def on_etcd(ack, command: dict[str, Any], client: AsyncWebClient, respond) -> None:
        ctx.track_current_task()
        channel, user = command.get("channel_id", ""), command.get("user_id", "")
        try:
            cmd = parse(command.get("text", ""))
        except UsageError as e:
            await ack(**blocks.error_reply(e.reason, e.usage).as_kwargs())
            ctx.metrics.commands.labels(command="invalid", outcome="usage_error").inc()
            await _audit_quietly(ctx, "usage_error", user=user, channel=channel,
                                 detail={"text": command.get("text", ""), "reason": e.reason})
            return
        if cmd.name == "help":
            topic = cmd.args.get("topic")
            usage = f"`{SPECS[topic].usage}`" if topic else general_usage()
            bound = [c.name for c in ctx.config.clusters_for_channel(channel)]
            await ack(**blocks.help_reply(usage, bound).as_kwargs())
            ctx.metrics.commands.labels(command="help", outcome="ok").inc()
            return
        _, needs_cluster = WORK[cmd.name]
        cluster = None
        try:
            if needs_cluster:
                cluster = resolve_cluster(ctx.config, channel, cmd.cluster)
            elif not ctx.config.clusters_for_channel(channel):
                raise RoutingError("this channel is not bound to any etcd cluster")
        except RoutingError as e:
            await ack(**blocks.error_reply(str(e), cmd.spec.usage).as_kwargs())
            ctx.metrics.commands.labels(command=cmd.name, outcome="refused").inc()
            await _audit_quietly(ctx, "refused", user=user, channel=channel, cluster=cmd.cluster or "",
                                 detail={"command": cmd.name, "reason": str(e)})
            return
        await ack()
        cluster_name = cluster.name if cluster else ""
        try:
            await _run(ctx, cmd, cluster, cluster_name, user, channel, client, respond)
        except StoreError as e:
            # Nothing runs unaudited: a database held by another writer stops the command, clearly.
            log.error("command stopped: database unavailable", extra={"ctx_command": cmd.name, "ctx_error": str(e)})
            ctx.metrics.commands.labels(command=cmd.name, outcome="error").inc()
            await respond(response_type="ephemeral",
                          **blocks.error_reply(f"/etcd {cmd.name} did not run: the bot's {e}").as_kwargs())


async def _run(ctx: BotContext, cmd: Command, cluster: ClusterConfig | None, cluster_name: str, user: str,
               channel: str, client: AsyncWebClient, respond) -> None:
    """Authorize, audit, run and answer one parsed, routed command."""
    work, _ = WORK[cmd.name]
    role = COMMAND_ROLES[cmd.name]
    checked = cluster or await _plan_cluster(ctx, cmd)
    if role is not None and checked is not None and not await ctx.access.allowed(checked, user, role):
        reason = ctx.access.refusal(checked, role, f"/etcd {cmd.name}")
        ctx.metrics.commands.labels(command=cmd.name, outcome="refused").inc()
        await ctx.store.audit("refused", user=user, channel=channel, cluster=checked.name,
                              detail={"command": cmd.name, "missing_role": role.value})
        await respond(response_type="ephemeral", **blocks.error_reply(reason, cmd.spec.usage).as_kwargs())
        return
    await ctx.store.audit("command", user=user, channel=channel, cluster=cluster_name,
                          detail={"command": cmd.name, "args": cmd.args, "flags": sorted(cmd.flags)})
    log.info("command", extra={"ctx_command": cmd.name, "ctx_user": user, "ctx_channel": channel,
                               "ctx_cluster": cluster_name})
    try:
        outcome = await work(ctx, cmd, cluster, user, channel)
    except StoreError:
        raise
    except Exception:
        log.exception("command failed", extra={"ctx_command": cmd.name, "ctx_cluster": cluster_name})
        ctx.metrics.commands.labels(command=cmd.name, outcome="error").inc()
        await respond(**blocks.error_reply(f"/etcd {cmd.name} failed inside the bot; the details are in its log").as_kwargs())
        return
    ctx.metrics.commands.labels(command=cmd.name, outcome="refused" if outcome.ephemeral and not outcome.channel
                                 else "ok").inc()
    if outcome.ephemeral is not None:
        await respond(response_type="ephemeral", **outcome.ephemeral.as_kwargs())
    if outcome.channel is not None:
        try:
            await post(client, channel, outcome.channel)
        except SlackPostError as e:
            # The bot may not be in the channel: the response URL still reaches the person.
            await respond(response_type="ephemeral", **outcome.channel.as_kwargs())
            await respond(**blocks.error_reply(f"could not post in the channel: {e}").as_kwargs())
