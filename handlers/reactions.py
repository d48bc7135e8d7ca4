"""Reactions on plan messages are approvals and rejections.

Slack redelivers events (X-Slack-Retry-Num, or silently in Socket Mode):
each event ID is acted on once. Reactions on any other message, and events
of any other shape, are ignored. Removing a reaction undoes nothing (the
app does not subscribe to reaction_removed).
"""
from __future__ import annotations

import logging
from typing import Any

from slack_bolt.async_app import AsyncApp

from bot.ops import lifecycle
from bot.ops.context import BotContext
from bot.output import blocks
from bot.store.base import StoreError

log = logging.getLogger(__name__)


def register(app: AsyncApp, ctx: BotContext) -> None:
    @app.event("reaction_added")
    async def on_reaction_added(event: dict[str, Any], body: dict[str, Any]) -> None:
        ctx.track_current_task()
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type") != "message":
            return
        channel, ts = item.get("channel"), item.get("ts")
        user, reaction = event.get("user"), event.get("reaction")
        if not (isinstance(channel, str) and channel and isinstance(ts, str) and ts
                and isinstance(user, str) and user and isinstance(reaction, str) and reaction):
            return
        event_id = body.get("event_id")
        try:
            if event_id and not await ctx.store.first_delivery(event_id):
                log.info("duplicate event ignored", extra={"ctx_event_id": event_id})
                return
            record = await lifecycle.plan_reacted_to(ctx, channel, ts, reaction)
            if record is not None:
                await lifecycle.on_reaction(ctx, record, user, reaction)
        except StoreError as e:
            # Nothing is decided without the store: the person learns their reaction counted for nothing.
            log.error("reaction not handled: state store unavailable", extra={"ctx_error": str(e)})
            await ctx.notifier.private_message(channel, user, blocks.error_reply(
                f"your :{reaction}: reaction was not acted on: the bot's state store is unavailable: {e}"))
            return
