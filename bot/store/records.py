"""The typed plan record the store returns, and the plan states and kinds.

One enum of states serves the store, its SQL, the engine and the rendering,
so a state is never a free-form string that one layer spells differently.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bot.ops.defrag import DefragPlan
from bot.ops.replace import Plan
from bot.ops.restore import RestorePlan


class PlanState(StrEnum):
    PROPOSED = "proposed"
    APPROVED = "approved"
    RUNNING = "running"
    INTERRUPTED = "interrupted"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    ABANDONED = "abandoned"


# A cluster has at most one plan in these states (a unique partial index enforces it).
OPEN_STATES = (PlanState.PROPOSED, PlanState.APPROVED, PlanState.RUNNING, PlanState.INTERRUPTED)
# A plan stopped part-way: resume continues it, abandon closes it.
STOPPED_STATES = (PlanState.INTERRUPTED, PlanState.FAILED)


class PlanKind(StrEnum):
    """An operation on a cluster; each registers its steps with the engine (bot.ops.engine)."""

    REPLACE = "replace"
    RESTORE = "restore"
    DEFRAG = "defrag"


# The plan of each kind, as stored in the plan column (JSON).
AnyPlan = Plan | RestorePlan | DefragPlan
PLAN_TYPES: dict[PlanKind, type[Plan] | type[RestorePlan] | type[DefragPlan]] = {
    PlanKind.REPLACE: Plan, PlanKind.RESTORE: RestorePlan, PlanKind.DEFRAG: DefragPlan}


@dataclass(frozen=True)
class PlanRecord:
    id: str
    kind: PlanKind
    cluster: str
    state: PlanState
    plan: AnyPlan
    channel: str
    message_ts: str | None
    proposer: str
    created_at: float
    expires_at: float
    approvals: tuple[str, ...]        # distinct approvers, in the order they approved
    current_step: int
    decided_by: str | None
    error: str | None
    new_member_id: str | None
    columns: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> PlanRecord:
        approvals = tuple(u for u in (row.get("approvals") or "").split(",") if u)
        kind = PlanKind(row.get("kind") or PlanKind.REPLACE)
        return cls(id=row["id"], kind=kind, cluster=row["cluster"],
                   state=PlanState(row["state"]), plan=PLAN_TYPES[kind].from_json(json.loads(row["plan"])),
                   channel=row["channel"], message_ts=row.get("message_ts"), proposer=row["proposer"],
                   created_at=row["created_at"], expires_at=row["expires_at"], approvals=approvals,
                   current_step=row["current_step"], decided_by=row.get("decided_by"), error=row.get("error"),
                   new_member_id=row.get("new_member_id"), columns=dict(row))

    def __getitem__(self, column: str) -> Any:
        """A stored column by name, as written (for exports and tests that read the raw row)."""
        return self.columns[column]


@dataclass(frozen=True)
class Lease:
    """A named lease (leadership): who holds it, the tenure's fencing token, until when (database clock)."""

    name: str
    holder: str
    token: int
    expires_at: float

    @property
    def fence(self) -> Fence:
        return Fence(self.name, self.holder, self.token)


@dataclass(frozen=True)
class Fence:
    """What a fenced write checks, in its own transaction: the lease `name` is still
    held by `holder` with `token` and unexpired; else the write raises LeaseLost."""

    name: str
    holder: str
    token: int
