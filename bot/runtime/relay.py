"""The relay: what was done from a shell while Slack was down (`etcd-chatops plan ...`, queued in the store's
outbox) is posted once the chat answers again, oldest first, each marked as done from a shell and when. A
plan proposed there gets its message first, so its approvals and progress read as any other plan's. Run by
the leader's upkeep, so one replica posts it; a post that fails stays queued for the next round."""
from __future__ import annotations

import logging
import time

from bot.ops.context import BotContext
from bot.ops.engine import refresh
from bot.ops.notify import NotifyFailed
from bot.output.blocks import Reply

log = logging.getLogger(__name__)
RELAY_SECONDS = 5.0  # how often the leader looks for queued posts


def stamp(at: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    return f":rotating_light: _break glass: done from a shell at {when}_"


async def relay(ctx: BotContext) -> int:
    """Post what is queued; the number posted. Stops at the first post the chat refuses (it is down still)."""
    store, notifier = ctx.store, ctx.notifier
    posted, touched = 0, set()
    try:
        for row in await store.queued_posts():
            text = f"{stamp(row.at)}\n{row.text}"
            if not row.channel:  # a cluster bound to no channel: nowhere to post it
                await store.mark_posted(row.id)
                continue
            if row.plan_id is None:
                await notifier.channel_message(row.channel, Reply(text=text))
            else:
                record = await store.plan(row.plan_id)
                if record is not None and not record.message_ts:  # proposed from a shell: its message first
                    await store.update_plan(record.id, message_ts=await notifier.post_plan(record))
                    record = await store.plan(record.id)
                    if record is not None:
                        await notifier.plan_details(record)
                if record is not None:
                    await notifier.thread_post(record, text)
                    touched.add(record.id)
            await store.mark_posted(row.id)
            posted += 1
    except NotifyFailed as e:
        log.info("relay waits for the chat", extra={"ctx_error": str(e)})
    for plan_id in touched:  # the message as the plan stands now
        await refresh(ctx, plan_id)
    return posted
