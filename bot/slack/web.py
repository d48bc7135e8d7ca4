"""Posting to Slack: one place that knows the Web API's failure modes.

Rate limits are retried by slack_sdk's handler (see app.py); here a message
the channel must see is posted, a progress edit may fail without failing
the work, and nothing is silently lost: failures are logged.
"""
from __future__ import annotations

import logging
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.output.blocks import Reply

log = logging.getLogger(__name__)


class SlackPostError(Exception):
    pass


async def post(client: AsyncWebClient, channel: str, reply: Reply, *, thread_ts: str | None = None) -> str:
    """chat.postMessage; returns the message ts. Raises SlackPostError."""
    kwargs: dict[str, Any] = {"channel": channel, **reply.as_kwargs(), "unfurl_links": False, "unfurl_media": False}
    if thread_ts:
        kwargs["thread_ts"] = thread_ts
    try:
        resp = await client.chat_postMessage(**kwargs)
    except SlackApiError as e:
        error = e.response.get("error", "unknown_error") if e.response is not None else "unknown_error"
        raise SlackPostError(_explain(error)) from None
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        raise SlackPostError(f"Slack did not answer ({type(e).__name__})") from None
    return str(resp["ts"])


async def update(client: AsyncWebClient, channel: str, ts: str, reply: Reply) -> bool:
    """chat.update for progress; a failure is logged and reported, never raised."""
    try:
        await client.chat_update(channel=channel, ts=ts, **reply.as_kwargs())
        return True
    except Exception as e:  # a progress edit must never fail the work it reports
        log.warning("chat.update failed", extra={"ctx_channel": channel, "ctx_error": _error_of(e)})
        return False


async def ephemeral(client: AsyncWebClient, channel: str, user: str, reply: Reply) -> bool:
    try:
        await client.chat_postEphemeral(channel=channel, user=user, **reply.as_kwargs())
        return True
    except Exception as e:
        log.warning("chat.postEphemeral failed", extra={"ctx_channel": channel, "ctx_error": _error_of(e)})
        return False


def _error_of(e: Exception) -> str:
    if isinstance(e, SlackApiError) and e.response is not None:
        return str(e.response.get("error"))
    return type(e).__name__


def _explain(error: str) -> str:
    hints = {
        "not_in_channel": "the bot is not in this channel: invite it with /invite @etcd-chatops",
        "channel_not_found": "the bot cannot see this channel: invite it with /invite @etcd-chatops",
        "is_archived": "the channel is archived",
        "invalid_auth": "Slack refused the bot token (SLACK_BOT_TOKEN)",
        "not_authed": "no Slack bot token (SLACK_BOT_TOKEN)",
        "ratelimited": "Slack rate limit: try again in a minute",
    }
    return hints.get(error, f"Slack answered {error}")
