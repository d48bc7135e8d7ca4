"""The plan record the store returns: a stored plan decoded into the plan type of its kind."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bot.domain.defrag import DefragPlan
from bot.domain.plan import PlanKind, PlanState
from bot.domain.replace import ReplacePlan
from bot.domain.restore import RestorePlan

# The plan of each kind, as stored in the plan column (JSON).
AnyPlan = ReplacePlan | RestorePlan | DefragPlan


PLAN_TYPES: dict[PlanKind, type[ReplacePlan] | type[RestorePlan] | type[DefragPlan]] = {
    PlanKind.REPLACE: ReplacePlan, PlanKind.RESTORE: RestorePlan, PlanKind.DEFRAG: DefragPlan}


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
