"""The Notifier (bot.ops.notify) for Slack: a plan is one message edited as it
progresses (chat.update), with its Approve and Reject buttons while it is proposed;
its long part and the details go to its thread, repeated refusals to the person
alone (chat.postEphemeral)."""
from __future__ import annotations

import logging
from collections.abc import Mapping

from slack_sdk.web.async_client import AsyncWebClient

from bot.config import Config
from bot.domain.record import PlanRecord
from bot.ops.kinds import plan_view, render_plan
from bot.ops.notify import NotifyFailed
from bot.output import blocks
from bot.slack.web import SlackPostError, ephemeral, post, update

log = logging.getLogger(__name__)


class SlackNotifier:
    def __init__(self, web: AsyncWebClient, config: Config):
        self.web = web
        self.config = config

    def view(self, record: PlanRecord, step_states: Mapping[int, str]) -> blocks.PlanView:
        return plan_view(self.config, record, step_states)

    async def post_plan(self, record: PlanRecord) -> str:
        try:
            return await post(self.web, record.channel, render_plan(record, self.view(record, {})))
        except SlackPostError as e:
            raise NotifyFailed(str(e)) from None

    async def plan_details(self, record: PlanRecord) -> None:
        details = render_plan(record, self.view(record, {})).details
        if details is not None and record.message_ts:
            await self.thread_message(record.channel, record.message_ts, details)

    async def plan_changed(self, record: PlanRecord, step_states: Mapping[int, str]) -> None:
        if record.message_ts:
            await update(self.web, record.channel, record.message_ts,
                         render_plan(record, self.view(record, step_states)))

    async def thread_note(self, record: PlanRecord, text: str) -> None:
        try:
            await post(self.web, record.channel, blocks.thread_note(text), thread_ts=record.message_ts)
        except SlackPostError as e:  # a detail lost is logged, never fatal to the work it reports
            log.warning("thread reply failed", extra={"ctx_plan": record.id, "ctx_error": str(e)})

    async def thread_post(self, record: PlanRecord, text: str) -> None:
        try:
            await post(self.web, record.channel, blocks.thread_note(text), thread_ts=record.message_ts)
        except SlackPostError as e:
            raise NotifyFailed(str(e)) from None

    async def private_note(self, record: PlanRecord, user: str, text: str) -> None:
        await self.private_message(record.channel, user, blocks.thread_note(text))

    async def private_message(self, channel: str, user: str, reply: blocks.Reply) -> None:
        await ephemeral(self.web, channel, user, reply)

    async def channel_message(self, channel: str, reply: blocks.Reply) -> str:
        try:
            return await post(self.web, channel, reply)
        except SlackPostError as e:
            raise NotifyFailed(str(e)) from None

    async def update_message(self, channel: str, ts: str, reply: blocks.Reply) -> None:
        await update(self.web, channel, ts, reply)

    async def thread_message(self, channel: str, ts: str, reply: blocks.Reply) -> None:
        try:
            await post(self.web, channel, reply, thread_ts=ts)
        except SlackPostError as e:
            log.warning("thread reply failed", extra={"ctx_channel": channel, "ctx_error": str(e)})
