"""What a command leaves (a channel message, an answer only its author sees, or both), and the refusals
every command words the same way."""
from __future__ import annotations

from dataclasses import dataclass

from bot.domain.plan import PlanState
from bot.output import blocks


@dataclass(frozen=True)
class Outcome:
    """What a command leaves: a channel message, an answer only the user sees, or both."""

    channel: blocks.Reply | None = None
    ephemeral: blocks.Reply | None = None


def refused(reason: str, hint: str | None = None, usage: str | None = None) -> Outcome:
    return Outcome(ephemeral=blocks.error_reply(reason, usage, hint))


def open_plan_refusal(plan_id: str, state: PlanState) -> Outcome:
    return refused(f"plan {plan_id} is {state} for this cluster: one open plan per cluster",
                    f"let it finish, or cancel it with `/etcd cancel {plan_id}`" if state == PlanState.PROPOSED
                    else f"let plan {plan_id} finish, or abandon it with `/etcd abandon {plan_id} <reason>` "
                         "(see /etcd plans)")
