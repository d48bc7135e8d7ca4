"""The watch's conditions: what is open and held back now, and muting a cluster's alerts for a while."""
from __future__ import annotations

import time

from bot.commands.grammar import Command
from bot.commands.registry import command
from bot.config import ClusterConfig, parse_duration
from bot.ops.access import Role
from bot.ops.context import BotContext
from bot.ops.outcome import Outcome
from bot.output import blocks
from bot.watch.watcher import open_views

MAX_MUTE_SECONDS = 7 * 86400


@command("alerts", ("[cluster]",), ("--cluster",), role=Role.READER,
         summary="the conditions the watch sees open now, those it holds back and why, and any mute")
async def alerts(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    now = ctx.clock.now()   # the watch's time: what it holds back was seen for so long by it
    mute = next((m for m in await ctx.store.mutes() if m.cluster == cluster.name), None)
    by = await ctx.access.directory.user_name(mute.by) if mute else ""   # a name, not a Slack ID
    muted = (f"until {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(mute.until))} by {by}: "
             f"{mute.reason}") if mute else None
    views = open_views(cluster.name, await ctx.store.open_alerts(cluster.name), now)
    held = ctx.watch.held(cluster.name, now) if ctx.watch is not None else None
    return Outcome(channel=blocks.alerts_reply(cluster.name, views, muted, held))


@command("mute", ("[cluster]", "duration", "reason"), ("--cluster",), rest=True, durations=("duration",),
         role=Role.OPERATOR,
         summary="hold back new alerts of a cluster for a while (30m, 2h; at most 7d); it ends by itself")
@command("unmute", ("[cluster]",), ("--cluster",), summary="end a mute now", role=Role.OPERATOR)
async def mute(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
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
