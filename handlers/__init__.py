"""The Slack edge: thin listeners that parse, call bot/, and render."""
from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from bot.ops.context import BotContext


def register_all(app: AsyncApp, ctx: BotContext) -> None:
    from handlers import commands, reactions

    commands.register(app, ctx)
    reactions.register(app, ctx)
