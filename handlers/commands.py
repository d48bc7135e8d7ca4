"""`/etcd <subcommand>`: one pipeline for every command: parse, route,
authorize, audit, run, reply.

Parsing and routing need no I/O, so bad input is answered in the
acknowledgement itself (Slack shows it only to the person who typed it);
the rest runs after the ack, and its answer is a channel message, or an
ephemeral one for refusals. The pipeline ends in a `Verdict`; `conclude`
is the one place commands are counted and refusals audited. The bolt
listener only translates: a request into an `Invocation`, a verdict into
Slack calls.

The audit rule: a command whose audit row cannot be written does not run
(the person is told the state store is unavailable); a refusal is audited
quietly (if the row cannot be written, the log keeps it), because the
refusal itself changes nothing.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_sdk.web.async_client import AsyncWebClient

from bot.backup.catalog import catalog
from bot.config import ClusterConfig, parse_duration
from bot.etcd.consistency import check_consistency
from bot.etcd.metrics import cluster_metrics
from bot.etcd.model import EtcdError
from bot.etcd.snapshots import SnapshotFailed
from bot.ops import defragment, drill, lifecycle, recovery
from bot.ops.access import COMMAND_ROLES
from bot.ops.commands import SPECS, Command, UsageError, general_usage, parse
from bot.ops.context import BotContext
from bot.ops.lifecycle import Outcome
from bot.ops.replace import Refusal, ReplaceRequest
from bot.ops.routing import RoutingError, resolve_cluster
from bot.ops.snapshots import RunningSnapshot, remote_store, take_snapshot
from bot.output import blocks
from bot.output.model import perf_view
from bot.slack.web import SlackPostError, post
from bot.store.base import StoreError
from bot.watch.watcher import open_views

log = logging.getLogger(__name__)
COMMAND = "/etcd"

# (ctx, command, cluster, user, channel): the cluster is a ClusterConfig when the WORK entry's flag says
# the command needs one, else None (the plan the command names decides); Any lets each work say which.
Work = Callable[[BotContext, Command, Any, str, str], Awaitable[Outcome]]


async def _status(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    try:
        health = await ctx.check(cluster)
    except EtcdError as e:
        return Outcome(channel=blocks.unreachable_reply(cluster.name, str(e)))
    if cmd.name == "members":
        return Outcome(channel=blocks.members_reply(health))
    metrics = await cluster_metrics(ctx.client(cluster), health)
    return Outcome(channel=blocks.status_reply(health, requested_by=user, metrics=metrics))


async def _replace(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    req = ReplaceRequest(failed=cmd.args["failed_name_or_hex_id"], new_name=cmd.args["new_name"],
                         new_peer_url=cmd.args["new_peer_url"], new_client_url=cmd.args.get("client_url"),
                         learner="no_learner" not in cmd.flags)
    return await lifecycle.propose(ctx, cluster, req, user, channel, cmd.spec.usage)


async def _plans(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    return Outcome(channel=blocks.plans_reply(cluster.name, await ctx.store.plans(cluster.name, limit=10)))


async def _snapshot(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    joined: list[RunningSnapshot] = []

    async def tell(running: RunningSnapshot) -> None:
        joined.append(running)
        await ctx.notifier.private_message(
            channel, user, blocks.snapshot_joined_reply(running.cluster, running.requested_by, running.started_at))
    async def wait(replica: str) -> None:
        await ctx.notifier.private_message(channel, user, blocks.snapshot_waiting_reply(cluster.name, replica))
    try:
        saved = await take_snapshot(ctx, cluster, requested_by=user, reason="requested", channel=channel, on_join=tell,
                                    on_wait=wait)
        answer = blocks.snapshot_reply(saved, joined[0].requested_by if joined else user)
    except SnapshotFailed as e:
        await ctx.store.audit("snapshot_failed", user=user, channel=channel, cluster=cluster.name,
                              detail={"reason": str(e)})
        answer = blocks.snapshot_failed_reply(cluster.name, str(e))
    if joined and joined[0].channel == channel:  # the channel sees the result from the request it joined
        await ctx.notifier.private_message(channel, user, answer)
        return Outcome()
    return Outcome(channel=answer)


async def _snapshots(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    rows = await ctx.store.snapshots(cluster.name, limit=1000, include_pruned=True)  # a pruned one may be remote
    view = await catalog(cluster.snapshots.store, cluster.name, rows, open_store=remote_store)
    return Outcome(channel=blocks.snapshots_reply(view, await ctx.store.last_drills(cluster.name)))


async def _restore(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    return await recovery.propose_restore(ctx, cluster, cmd.args.get("snapshot"), "force" in cmd.flags, user, channel,
                                          cmd.spec.usage)


async def _continue(ctx: BotContext, cmd: Command, cluster: None, user: str, channel: str) -> Outcome:
    return await recovery.continue_plan(ctx, cmd.args["plan_id"], cmd.args.get("stage"), user, channel,
                                        cmd.spec.usage)


async def _drill(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    try:
        result = await drill.drill(ctx, cluster, cmd.args.get("snapshot"), user)
    except Refusal as r:
        return Outcome(ephemeral=blocks.error_reply(f"no drill for {cluster.name}: {r.reason}", cmd.spec.usage, r.hint))
    return Outcome(channel=blocks.drill_reply(result, user))


async def _cancel(ctx: BotContext, cmd: Command, cluster: None, user: str, channel: str) -> Outcome:
    return await lifecycle.cancel(ctx, cmd.args["plan_id"], user, channel)


async def _resume(ctx: BotContext, cmd: Command, cluster: None, user: str, channel: str) -> Outcome:
    return await lifecycle.resume(ctx, cmd.args["plan_id"], user, channel)


async def _abandon(ctx: BotContext, cmd: Command, cluster: None, user: str, channel: str) -> Outcome:
    return await lifecycle.abandon(ctx, cmd.args["plan_id"], cmd.args["reason"], user, channel)


async def _check(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    """alarms, perf, consistency: read-only, each read under the cluster's deadline."""
    try:
        health = await ctx.check(cluster)
    except EtcdError as e:
        return Outcome(channel=blocks.unreachable_reply(cluster.name, str(e)))
    client = ctx.client(cluster)
    if cmd.name == "alarms":
        return Outcome(channel=blocks.alarms_reply(health))
    if cmd.name == "perf":
        return Outcome(channel=blocks.perf_reply(perf_view(health, await cluster_metrics(client, health))))
    try:
        return Outcome(channel=blocks.consistency_reply(await check_consistency(client, health)))
    except EtcdError as e:
        return Outcome(channel=blocks.unreachable_reply(cluster.name, str(e)))


async def _defrag(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    return await defragment.propose(ctx, cluster, cmd.args.get("rule"), "no_compact" not in cmd.flags, user, channel,
                                    cmd.spec.usage)


MAX_MUTE_SECONDS = 7 * 86400


async def _alerts(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    now = time.time()
    mute = next((m for m in await ctx.store.mutes() if m["cluster"] == cluster.name), None)
    muted = (f"until {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(mute['until']))} by {mute['by']}: "
             f"{mute['reason']}") if mute else None
    views = open_views(cluster.name, await ctx.store.open_alerts(cluster.name), now)
    held = ctx.watch.held(cluster.name, now) if ctx.watch is not None else None
    return Outcome(channel=blocks.alerts_reply(cluster.name, views, muted, held))


async def _mute(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    if cmd.name == "unmute":
        if not await ctx.store.clear_mute(cluster.name):
            return Outcome(ephemeral=blocks.error_reply(f"cluster {cluster.name} is not muted", cmd.spec.usage))
        await ctx.store.audit("unmute", user=user, channel=channel, cluster=cluster.name)
        return Outcome(channel=blocks.unmute_reply(cluster.name, user))
    seconds = parse_duration(cmd.args["duration"])
    if seconds > MAX_MUTE_SECONDS:
        return Outcome(ephemeral=blocks.error_reply("a mute lasts at most 7d; mute again when it ends",
                                                    cmd.spec.usage))
    until, reason = time.time() + seconds, cmd.args["reason"]
    await ctx.store.set_mute(cluster.name, until, reason, user)
    await ctx.store.audit("mute", user=user, channel=channel, cluster=cluster.name,
                          detail={"until": until, "reason": reason})
    return Outcome(channel=blocks.mute_reply(cluster.name, until, reason, user))


# Commands that name a plan find their cluster through it; the others resolve one.
WORK: dict[str, tuple[Work, bool]] = {
    "status": (_status, True), "members": (_status, True), "replace": (_replace, True), "plans": (_plans, True),
    "snapshot": (_snapshot, True), "snapshots": (_snapshots, True),
    "cancel": (_cancel, False), "resume": (_resume, False), "abandon": (_abandon, False),
    "restore": (_restore, True), "continue": (_continue, False), "drill": (_drill, True),
    "alarms": (_check, True), "perf": (_check, True), "consistency": (_check, True), "defrag": (_defrag, True),
    "alerts": (_alerts, True), "mute": (_mute, True), "unmute": (_mute, True),
}


class Result(Enum):
    """How a command ended, as the metrics count it."""

    OK = "ok"
    USAGE_ERROR = "usage_error"
    REFUSED = "refused"
    ERROR = "error"


@dataclass(frozen=True)
class Invocation:
    """One `/etcd` as Slack delivered it."""

    text: str
    user: str
    channel: str


@dataclass(frozen=True)
class Routed:
    """A parsed command and its cluster (None: the plan it names decides, as for cancel and resume)."""

    cmd: Command
    cluster: ClusterConfig | None


@dataclass(frozen=True)
class AuditNote:
    """A refusal to keep in the audit log."""

    action: str
    cluster: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class Verdict:
    """How one command ended: what the person sees, how it counts, and what the audit keeps."""

    command: str               # the metrics label ("invalid" when it did not parse)
    result: Result
    outcome: Outcome
    refusal: AuditNote | None = None


def admit(ctx: BotContext, inv: Invocation) -> Routed | Verdict:
    """Parse and route. No I/O: a verdict here is answered in the acknowledgement."""
    try:
        cmd = parse(inv.text)
    except UsageError as e:
        return Verdict("invalid", Result.USAGE_ERROR, Outcome(ephemeral=blocks.error_reply(e.reason, e.usage)),
                       AuditNote("usage_error", "", {"text": inv.text, "reason": e.reason}))
    if cmd.name == "help":
        topic = cmd.args.get("topic")
        usage = f"`{SPECS[topic].usage}`" if topic else general_usage()
        bound = [c.name for c in ctx.config.clusters_for_channel(inv.channel)]
        return Verdict("help", Result.OK, Outcome(ephemeral=blocks.help_reply(usage, bound)))
    _, needs_cluster = WORK[cmd.name]
    try:
        if needs_cluster:
            return Routed(cmd, resolve_cluster(ctx.config, inv.channel, cmd.cluster))
        if not ctx.config.clusters_for_channel(inv.channel):
            raise RoutingError("this channel is not bound to any etcd cluster")
    except RoutingError as e:
        return Verdict(cmd.name, Result.REFUSED, Outcome(ephemeral=blocks.error_reply(str(e), cmd.spec.usage)),
                       AuditNote("refused", cmd.cluster or "", {"command": cmd.name, "reason": str(e)}))
    return Routed(cmd, None)


async def execute(ctx: BotContext, inv: Invocation, routed: Routed) -> Verdict:
    """Authorize, audit, run. Nothing runs unaudited, and nothing raises: a store
    that is held, corrupt or foreign, or a bug, ends in an answer too."""
    cmd, cluster = routed.cmd, routed.cluster
    cluster_name = cluster.name if cluster else ""
    work, _ = WORK[cmd.name]
    try:
        checked = cluster or await _plan_cluster(ctx, cmd)
        role = COMMAND_ROLES[cmd.name]
        if role is not None and checked is not None and not await ctx.access.allowed(checked, inv.user, role):
            # The holders' mentions are deliberate (config IDs, in an ephemeral reply); the rest is fixed words.
            reason = blocks.Mrkdwn(ctx.access.refusal(checked, role, f"/etcd {cmd.name}"))
            return Verdict(cmd.name, Result.REFUSED, Outcome(ephemeral=blocks.error_reply(reason, cmd.spec.usage)),
                           AuditNote("refused", checked.name, {"command": cmd.name, "missing_role": role.value}))
        await ctx.store.audit("command", user=inv.user, channel=inv.channel, cluster=cluster_name,
                              detail={"command": cmd.name, "args": cmd.args, "flags": sorted(cmd.flags)})
        log.info("command", extra={"ctx_command": cmd.name, "ctx_user": inv.user, "ctx_channel": inv.channel,
                                   "ctx_cluster": cluster_name})
        outcome = await work(ctx, cmd, cluster, inv.user, inv.channel)
    except StoreError as e:
        log.error("command stopped: state store unavailable", extra={"ctx_command": cmd.name, "ctx_error": str(e)})
        return Verdict(cmd.name, Result.ERROR, Outcome(ephemeral=blocks.error_reply(
            f"/etcd {cmd.name} did not run: the bot's state store is unavailable: {e}")))
    except Exception:
        log.exception("command failed", extra={"ctx_command": cmd.name, "ctx_cluster": cluster_name})
        return Verdict(cmd.name, Result.ERROR, Outcome(ephemeral=blocks.error_reply(
            f"/etcd {cmd.name} failed inside the bot; the details are in its log")))
    refused = outcome.ephemeral is not None and outcome.channel is None
    return Verdict(cmd.name, Result.REFUSED if refused else Result.OK, outcome)


async def conclude(ctx: BotContext, inv: Invocation, verdict: Verdict) -> None:
    """Count the command; audit a refusal quietly (if the database is held, the log keeps the row)."""
    ctx.metrics.commands.labels(command=verdict.command, outcome=verdict.result.value).inc()
    note = verdict.refusal
    if note is None:
        return
    try:
        await ctx.store.audit(note.action, user=inv.user, channel=inv.channel, cluster=note.cluster, detail=note.detail)
    except StoreError as e:
        row = {"user": inv.user, "channel": inv.channel, "cluster": note.cluster, "detail": note.detail}
        log.error("audit row not written", extra={"ctx_action": note.action, "ctx_row": row, "ctx_error": str(e)})


async def _plan_cluster(ctx: BotContext, cmd: Command) -> ClusterConfig | None:
    """The cluster of the plan a command names (cancel, resume)."""
    record = await ctx.store.plan(cmd.args.get("plan_id", ""))
    return ctx.config.cluster(record.cluster) if record else None


def register(app: AsyncApp, ctx: BotContext) -> None:
    @app.command(COMMAND)
    async def on_etcd(ack: AsyncAck, command: dict[str, Any], client: AsyncWebClient, respond: AsyncRespond) -> None:
        ctx.track_current_task()
        inv = Invocation(command.get("text", ""), command.get("user_id", ""), command.get("channel_id", ""))
        step = admit(ctx, inv)
        if isinstance(step, Verdict):
            await ack(**(step.outcome.ephemeral or blocks.Reply(text="")).as_kwargs())
            await conclude(ctx, inv, step)
            return
        await ack()
        # Nothing may escape after the ack: bolt would take the ack back (an HTTP 404 to Slack).
        try:
            verdict = await execute(ctx, inv, step)
            await conclude(ctx, inv, verdict)
            await _reply(verdict.outcome, inv.channel, client, respond)
        except Exception:
            log.exception("command not answered", extra={"ctx_command": step.cmd.name})


async def _reply(outcome: Outcome, channel: str, client: AsyncWebClient, respond: AsyncRespond) -> None:
    """An outcome as Slack calls: the ephemeral part through the response URL, the rest in the channel."""
    if outcome.ephemeral is not None:
        await respond(response_type="ephemeral", **outcome.ephemeral.as_kwargs())
    if outcome.channel is not None:
        try:
            await post(client, channel, outcome.channel)
        except SlackPostError as e:
            # The bot may not be in the channel: the response URL still reaches the person.
            await respond(response_type="ephemeral", **outcome.channel.as_kwargs())
            await respond(response_type="ephemeral",
                          **blocks.error_reply(f"could not post in the channel: {e}").as_kwargs())
