"""`/etcd <subcommand>`: parse, acknowledge at once, then do the work.

Bad input is answered in the acknowledgement itself (Slack shows it only
to the person who typed it); work that talks to etcd runs after the ack,
and its answer is a channel message.
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from bot import blocks
from bot.commands import Command, UsageError, general_usage, parse
from bot.config import ClusterConfig
from bot.context import BotContext
from bot.etcd import EtcdError
from bot.health import check_cluster
from bot.routing import RoutingError, resolve_cluster
from bot.slackio import SlackPostError, post

log = logging.getLogger(__name__)
COMMAND = "/etcd"

Work = Callable[[BotContext, Command, ClusterConfig, dict[str, Any]], Awaitable[blocks.Reply]]


async def _status(ctx: BotContext, cmd: Command, cluster: ClusterConfig, body: dict[str, Any]) -> blocks.Reply:
    try:
        health = await check_cluster(ctx.client(cluster), cluster.name)
    except EtcdError as e:
        return blocks.unreachable_reply(cluster.name, str(e))
    if cmd.name == "members":
        return blocks.members_reply(health)
    return blocks.status_reply(health, requested_by=body.get("user_id"))


WORK: dict[str, Work] = {"status": _status, "members": _status}


def register(app: AsyncApp, ctx: BotContext) -> None:
    @app.command(COMMAND)
    async def on_etcd(ack, command: dict[str, Any], client: AsyncWebClient, respond) -> None:
        channel, user = command.get("channel_id", ""), command.get("user_id", "")
        try:
            cmd = parse(command.get("text", ""))
        except UsageError as e:
            await ack(**blocks.error_reply(e.reason, e.usage).as_kwargs())
            return
        if cmd.name == "help":
            topic = cmd.args.get("topic")
            usage = f"`{parse(topic).spec.usage}`" if topic else general_usage()
            bound = [c.name for c in ctx.config.clusters_for_channel(channel)]
            await ack(**blocks.help_reply(usage, bound).as_kwargs())
            return
        try:
            cluster = resolve_cluster(ctx.config, channel, cmd.cluster)
        except RoutingError as e:
            await ack(**blocks.error_reply(str(e), cmd.spec.usage).as_kwargs())
            return
        await ack()
        log.info("command", extra={"ctx_command": cmd.name, "ctx_user": user, "ctx_channel": channel,
                                   "ctx_cluster": cluster.name})
        try:
            reply = await WORK[cmd.name](ctx, cmd, cluster, command)
        except Exception:
            log.exception("command failed", extra={"ctx_command": cmd.name, "ctx_cluster": cluster.name})
            await respond(**blocks.error_reply(f"/etcd {cmd.name} failed inside the bot; the details are in its log").as_kwargs())
            return
        try:
            await post(client, channel, reply)
        except SlackPostError as e:
            # The bot may not be in the channel: the response URL still reaches the person.
            await respond(response_type="ephemeral", **reply.as_kwargs())
            await respond(**blocks.error_reply(f"could not post in the channel: {e}").as_kwargs())
