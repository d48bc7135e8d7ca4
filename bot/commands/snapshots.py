"""Snapshots: take one now, list them (local and off-site), and prove one by a restore drill."""
from __future__ import annotations

from bot.backup.catalog import catalog
from bot.backup.object_store import object_store
from bot.commands.grammar import Command
from bot.commands.registry import command
from bot.config import ClusterConfig
from bot.domain.errors import Refusal
from bot.domain.snapshot import RunningSnapshot, SnapshotFailed
from bot.ops import drill as drills
from bot.ops.access import Role
from bot.ops.context import BotContext
from bot.ops.outcome import Outcome
from bot.ops.snapshots import take_snapshot
from bot.output import blocks

CLUSTER = ("[cluster]",), ("--cluster",)


@command("snapshot", *CLUSTER, summary="take a verified snapshot now; posts its hash and size", role=Role.OPERATOR)
async def snapshot(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
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


@command("snapshots", *CLUSTER, summary="the snapshots taken so far, newest first: local, off-site or both",
         role=Role.READER)
async def snapshots(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    rows = await ctx.store.snapshots(cluster.name, limit=1000, include_pruned=True)  # a pruned one may be remote
    view = await catalog(cluster.snapshots.store, cluster.name, rows, open_store=object_store)
    return Outcome(channel=blocks.snapshots_reply(view, await ctx.store.last_drills(cluster.name)))


@command("drill", ("[snapshot]",), ("--cluster",), role=Role.OPERATOR,
         summary="restore drill: boot a snapshot in a scratch etcd on the bot's host and compare it with the catalog")
async def drill(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    try:
        result = await drills.drill(ctx, cluster, cmd.args.get("snapshot"), user)
    except Refusal as r:
        return Outcome(ephemeral=blocks.error_reply(f"no drill for {cluster.name}: {r.reason}", cmd.spec.usage, r.hint))
    return Outcome(channel=blocks.drill_reply(result, user))
