"""Small helpers for end-to-end tests: talk to the bot as people in the channel do."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from bot.testing.cluster import free_port
from bot.testing.slack import Delivery, Message, SlackStandIn
from bot.testing.workspace import CHANNEL, LEAD, LEADS_GROUP, ONCALL
from bot.etcd.client import EtcdClient
from bot.etcd.health import check_cluster
from bot.store.sqlite import Store


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


# ---------------------------------------------------------------- replacement plans

APPROVAL = {"approvers": [LEAD, ONCALL], "approver_groups": [LEADS_GROUP], "ttl_minutes": 30,
            "reaction": "white_check_mark", "reject_reaction": "x"}
OK = "white_check_mark"


def urls() -> tuple[str, str]:
    return f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"


async def propose(slack, text: str, user: str = ONCALL) -> Message:
    start = len(slack.messages)
    await command(slack, text, user=user)
    return await slack.wait_for_message(
        lambda m: m.source == "chat.postMessage" and m.thread_ts is None and m.text.startswith("Plan "),
        after=start, timeout=30, what=f"the plan message for /etcd {text}")


def replies(slack, plan: Message) -> list[Message]:
    return [m for m in slack.messages if m.thread_ts == plan.ts]


def thread(slack, plan: Message) -> str:
    return "\n".join(text_of(m) for m in replies(slack, plan))


async def plan_row(store: Store, plan: Message, timeout: float = 10.0) -> dict:
    """The plan behind a message (the bot records the message's ts right after posting it)."""
    deadline = time.monotonic() + timeout
    while (row := await store.plan_by_message(CHANNEL, plan.ts)) is None:
        assert time.monotonic() < deadline, f"no plan recorded for message {plan.ts}"
        await asyncio.sleep(0.02)
    return row


async def wait_state(store: Store, plan_id: str, states: tuple[str, ...], timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        row = await store.plan(plan_id)
        if row["state"] in states:
            return row
        if time.monotonic() > deadline:
            steps = [(st["key"], st["state"], st["detail"] or st["error"]) for st in await store.steps(plan_id)]
            raise AssertionError(f"plan {plan_id} is {row['state']} (error: {row['error']}), not {states}; "
                                 f"steps: {steps}")
        await asyncio.sleep(0.1)


async def wait_done(store: Store, plan_id: str, timeout: float = 120.0) -> dict:
    """Wait until the plan ends; it must have ended done (its error says why not)."""
    row = await wait_state(store, plan_id, ("done", "failed"), timeout)
    assert row["state"] == "done", row["error"]
    return row


async def audit_actions(store: Store, plan_id: str) -> list[tuple[str, str]]:
    rows = await store.audit_rows()
    out = []
    for r in rows:
        detail = json.loads(r["detail"])
        if detail.get("plan") == plan_id:
            out.append((r["action"], detail.get("step", "")))
    return out


async def members_of(cluster) -> list:
    user, password = cluster.user or (None, None)
    async with EtcdClient(cluster.endpoints, tls=cluster.tls_files(), username=user, password=password) as client:
        return (await check_cluster(client, "check")).members


class open_store:
    """The bot's database opened from the test (the bot process may be dead)."""

    def __init__(self, directory: Path):
        self.store = Store(directory / "etcd-chatops.db")

    async def __aenter__(self) -> Store:
        return await self.store.open()

    async def __aexit__(self, *exc) -> None:
        await self.store.close()
