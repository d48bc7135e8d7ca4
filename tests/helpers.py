"""Small helpers for end-to-end tests: talk to the bot as people in the channel do."""
from __future__ import annotations

from bot.emulator.slack import Delivery, Message, SlackStandIn
from bot.emulator.workspace import CHANNEL, ONCALL


def text_of(msg: Message) -> str:
    """Everything a person reads in a message: its text and every block's text."""
    parts = [msg.text or ""]
    for block in msg.blocks or []:
        if isinstance(block.get("text"), dict):
            parts.append(block["text"].get("text", ""))
        for element in block.get("elements", []) or []:
            if isinstance(element, dict) and "text" in element:
                parts.append(element["text"] if isinstance(element["text"], str) else element["text"].get("text", ""))
    return "\n".join(parts)


async def command(slack: SlackStandIn, text: str, *, user: str = ONCALL, channel: str = CHANNEL) -> Delivery:
    delivery = await slack.send_command(text, user_id=user, channel_id=channel)
    assert delivery.status == 200, f"/etcd {text}: HTTP {delivery.status} {delivery.body} {delivery.error}"
    return delivery


async def reply(slack: SlackStandIn, text: str, *, user: str = ONCALL, channel: str = CHANNEL,
                source: str = "chat.postMessage", timeout: float = 20.0) -> Message:
    """Run `/etcd text` and return the first message it causes from `source`."""
    start = len(slack.messages)
    await command(slack, text, user=user, channel=channel)
    return await slack.wait_for_message(lambda m: m.source == source and m.channel == channel, after=start,
                                        timeout=timeout, what=f"a {source} reply to /etcd {text}")


async def ephemeral(slack: SlackStandIn, text: str, *, user: str = ONCALL, channel: str = CHANNEL,
                    timeout: float = 20.0) -> Message:
    """Run `/etcd text` and return the first message only `user` sees."""
    start = len(slack.messages)
    await command(slack, text, user=user, channel=channel)
    return await slack.wait_for_message(lambda m: m.ephemeral_to == user, after=start, timeout=timeout,
                                        what=f"an ephemeral reply to /etcd {text}")
