"""The port the core reports through: the engine, the planners and the
snapshot service say what happened; an implementation decides how people see
it. `bot.slack.notifier` posts Block Kit messages, edits and thread replies;
`PlainNotifier` collects plain text for the CLI and the tests.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from bot.domain.record import PlanRecord
from bot.output.blocks import Reply


class NotifyFailed(Exception):
    """A message that had to reach people could not be posted; one line why."""


class Notifier(Protocol):
    async def post_plan(self, record: PlanRecord) -> str:
        """Show a new plan; returns the message's ID (its ts). Raises NotifyFailed."""

    async def plan_details(self, record: PlanRecord) -> None:
        """The long part of a new plan (commands, environment), under its message. Never raises."""

    async def plan_changed(self, record: PlanRecord, step_states: Mapping[int, str]) -> None:
        """Re-render the plan's message (its state, progress, error). Never raises."""

    async def thread_note(self, record: PlanRecord, text: str) -> None:
        """A detail under the plan, in mrkdwn whose values are escaped already. Never raises."""

    async def thread_post(self, record: PlanRecord, text: str) -> None:
        """A note under the plan that must arrive (what was done from a shell, relayed once the chat answers):
        raises NotifyFailed, so it is kept for a later try."""

    async def private_note(self, record: PlanRecord, user: str, text: str) -> None:
        """A note only `user` sees (a repeated refusal). Never raises."""

    async def private_message(self, channel: str, user: str, reply: Reply) -> None:
        """A message only `user` sees in `channel` (a joined snapshot's result). Never raises."""

    async def channel_message(self, channel: str, reply: Reply) -> str:
        """A message in a channel (scheduled snapshot results, watch alerts); returns its ts. Raises NotifyFailed."""

    async def update_message(self, channel: str, ts: str, reply: Reply) -> None:
        """Re-render a message posted with channel_message (an alert's figures). Never raises."""

    async def thread_message(self, channel: str, ts: str, reply: Reply) -> None:
        """A reply in the thread of a message posted with channel_message (an alert resolved). Never raises."""


class Directory(Protocol):
    """Who is in a user group, and what people and groups are called: the chat
    platform knows, the core asks (bot.slack.directory answers)."""

    async def group_members(self, group: str) -> frozenset[str]: ...

    async def user_name(self, user: str) -> str: ...

    async def group_name(self, group: str) -> str: ...


@dataclass
class PlainNotifier:
    """Collects what would be posted, as text: the CLI prints it, tests read it."""

    lines: list[str] = field(default_factory=list)
    _next_ts: int = 0

    async def post_plan(self, record: PlanRecord) -> str:
        self._next_ts += 1
        self.lines.append(f"plan {record.id} ({record.kind}) {record.state}")
        return f"plain.{self._next_ts}"

    async def plan_details(self, record: PlanRecord) -> None:
        return None   # the plan's lines say all a terminal shows of it

    async def plan_changed(self, record: PlanRecord, step_states: Mapping[int, str]) -> None:
        steps = ", ".join(f"{i}:{s}" for i, s in sorted(step_states.items()))
        self.lines.append(f"plan {record.id} {record.state} [{steps}]" + (f": {record.error}" if record.error else ""))

    async def thread_note(self, record: PlanRecord, text: str) -> None:
        self.lines.append(f"plan {record.id}: {text}")

    async def thread_post(self, record: PlanRecord, text: str) -> None:
        await self.thread_note(record, text)

    async def private_note(self, record: PlanRecord, user: str, text: str) -> None:
        self.lines.append(f"plan {record.id} (to {user} only): {text}")

    async def private_message(self, channel: str, user: str, reply: Reply) -> None:
        self.lines.append(f"{channel} (to {user} only): {reply.text}")

    async def channel_message(self, channel: str, reply: Reply) -> str:
        self._next_ts += 1
        self.lines.append(f"{channel}: {reply.text}")
        return f"plain.{self._next_ts}"

    async def update_message(self, channel: str, ts: str, reply: Reply) -> None:
        self.lines.append(f"{channel} (edit {ts}): {reply.text}")

    async def thread_message(self, channel: str, ts: str, reply: Reply) -> None:
        self.lines.append(f"{channel} (thread {ts}): {reply.text}")


@dataclass
class PlainDirectory:
    """Groups from a fixed table, names as the IDs themselves (the CLI, tests)."""

    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)

    async def group_members(self, group: str) -> frozenset[str]:
        return self.groups.get(group, frozenset())

    async def user_name(self, user: str) -> str:
        return user

    async def group_name(self, group: str) -> str:
        return group
