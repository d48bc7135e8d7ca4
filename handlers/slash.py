"""The bolt listener of `/etcd`: a request into an Invocation, the pipeline's Answer into Slack calls
(bot.commands.pipeline does the rest). Nothing may escape after the ack: bolt would take the ack back."""
from __future__ import annotations

import logging
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_sdk.web.async_client import AsyncWebClient

from bot.commands.pipeline import Answer, Invocation, admit, conclude, execute
from bot.ops.context import BotContext
from bot.ops.outcome import Outcome
from bot.output import blocks
from bot.slack.web import SlackPostError, post

log = logging.getLogger(__name__)
COMMAND = "/etcd"


def register(app: AsyncApp, ctx: BotContext) -> None:
    @app.command(COMMAND)
    async def on_etcd(ack: AsyncAck, command: dict[str, Any], client: AsyncWebClient, respond: AsyncRespond) -> None:
        ctx.track_current_task()
        inv = Invocation(command.get("text", ""), command.get("user_id", ""), command.get("channel_id", ""))
        step = admit(ctx, inv)
        if isinstance(step, Answer):
            await ack(**(step.outcome.ephemeral or blocks.Reply(text="")).as_kwargs())
            await conclude(ctx, inv, step)
            return
        await ack()
        # Nothing may escape after the ack: bolt would take the ack back (an HTTP 404 to Slack).
        try:
            answer = await execute(ctx, inv, step)
            await conclude(ctx, inv, answer)
            await _reply(answer.outcome, inv.channel, client, respond)
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
