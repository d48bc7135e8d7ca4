"""The typed plan record the store returns, and the plan states and kinds.

One enum of states serves the store, its SQL, the engine and the rendering,
so a state is never a free-form string that one layer spells differently.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


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


class Confirmation(StrEnum):
    """What became of an approver's `/etcd continue` (bot.store.base.Store.confirm_stage)."""

    CONFIRMED = "confirmed"      # this call confirmed the stage the plan waits on
    NOT_WAITING = "not_waiting"  # the plan waits on no stage now, or on another one than named
    ALREADY = "already"          # the stage was confirmed before (by whom: the answer's stage)
    TOO_SOON = "too_soon"        # unnamed, and the stage began a moment after an earlier one was confirmed


@dataclass(frozen=True)
class Stage:
    """A manual stage of a plan (the `manual` launcher's stop, restore or start): the plan waits on it
    from `opened_at` until an approver confirms it or the wait ends. Times are the database's clock."""

    plan_id: str
    key: str                     # readable: the step it belongs to (stop, restore, start)
    opened_at: float
    closed_at: float | None      # the wait ended (confirmed, timed out or stopped)
    confirmed_by: str | None
    confirmed_at: float | None

    @property
    def waiting(self) -> bool:
        return self.closed_at is None and self.confirmed_by is None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Stage:
        return cls(plan_id=row["plan_id"], key=row["stage"], opened_at=float(row["opened_at"]),
                   closed_at=row["closed_at"], confirmed_by=row["confirmed_by"], confirmed_at=row["confirmed_at"])


@dataclass(frozen=True)
class StageAnswer:
    """`outcome` of a confirmation, the stage it concerns (the one confirmed, or confirmed before; else the
    stage the plan is at, None when it never waited) and the database's time it was decided."""

    outcome: Confirmation
    stage: Stage | None
    at: float


@dataclass(frozen=True)
class Step:
    key: str
    title: str
