"""The Slack edge: thin bolt listeners that translate Slack's requests for the core and its answers back."""
from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from bot.ops.context import BotContext
from handlers import interactions, reactions, slash


def register_all(app: AsyncApp, ctx: BotContext) -> None:
    slash.register(app, ctx)
    reactions.register(app, ctx)
    interactions.register(app, ctx)
