"""The records the store keeps, as typed values: a plan (decoded into the plan type of its kind), a plan's
step, the watch's alerts and mutes, an alert Alertmanager sent, a row of the audit chain. Each one's fields
are its table's columns (by another name only where `of` says so); the snapshot catalog's records are
bot.domain.snapshot's, a recorded membership bot.domain.cluster's, a manual stage and a lease
bot.domain.plan's."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from bot.domain.defrag import DefragPlan
from bot.domain.plan import PlanKind, PlanState
from bot.domain.replace import ReplacePlan
from bot.domain.restore import RestorePlan

# The plan of each kind, as stored in the plan column (JSON).
AnyPlan = ReplacePlan | RestorePlan | DefragPlan


PLAN_TYPES: dict[PlanKind, type[ReplacePlan] | type[RestorePlan] | type[DefragPlan]] = {
    PlanKind.REPLACE: ReplacePlan, PlanKind.RESTORE: RestorePlan, PlanKind.DEFRAG: DefragPlan}


@dataclass(frozen=True, kw_only=True)
class NewPlan:
    """A plan to store, proposed: the plans table's columns as first written (the store keeps the plan as JSON)."""

    id: str
    kind: PlanKind
    cluster: str
    plan: AnyPlan
    channel: str
    proposer: str
    created_at: float
    expires_at: float
    fingerprint: str
    message_ts: str | None = None


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
    decided_at: float | None = None   # when decided_by decided (approved, rejected, cancelled, abandoned)
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
                   new_member_id=row.get("new_member_id"), decided_at=row.get("decided_at"), columns=dict(row))

    def __getitem__(self, column: str) -> Any:
        """A stored column by name, as written (for exports and tests that read the raw row)."""
        return self.columns[column]


@dataclass(frozen=True)
class StepRecord:
    """A step of a plan as run: each (re)start counts an attempt, the last outcome is kept."""

    plan_id: str
    idx: int
    key: str
    state: str                     # running | done | failed
    started_at: float
    finished_at: float | None
    detail: str | None
    error: str | None
    attempts: int

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> StepRecord:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True, kw_only=True)
class NewAlert:
    """An alert the watch posted in one channel, to record (open) with its message."""

    cluster: str
    condition: str
    subject: str = ""
    channel: str | None = None
    message_ts: str | None = None  # None: the post failed (tried again next round)
    detail: str | None = None      # the finding as JSON
    flaps: int = 0
    opened_at: float | None = None   # None: now
    updated_at: float | None = None  # None: now


@dataclass(frozen=True)
class AlertRecord:
    """One channel's message of an alert, open or resolved."""

    id: int
    cluster: str
    condition: str
    subject: str
    state: str                     # open | resolved
    opened_at: float
    updated_at: float
    resolved_at: float | None
    channel: str | None
    message_ts: str | None
    detail: str | None             # the finding as JSON
    flaps: int

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> AlertRecord:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class ReceivedAlert:
    """One alert as Alertmanager last sent it, filed under its cluster (`received_alerts`; labels and annotations
    are JSON there). Its fingerprint and `starts_at` are one episode of it: what a redelivery repeats."""

    cluster: str
    fingerprint: str
    alertname: str
    status: str                        # firing | resolved
    starts_at: float                   # Unix time
    ends_at: float | None              # resolved ones
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    received_at: float = 0.0           # 0: not yet filed (the store stamps it)

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> ReceivedAlert:
        return cls(**{**{f.name: row[f.name] for f in fields(cls)}, "labels": json.loads(row["labels"]),
                      "annotations": json.loads(row["annotations"])})

    def columns(self) -> dict[str, Any]:
        """Its row, as written (its time of filing aside)."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "received_at"},
                "labels": json.dumps(dict(self.labels)), "annotations": json.dumps(dict(self.annotations))}


@dataclass(frozen=True)
class Mute:
    """A cluster's alerts muted until `until`, why and by whom, set `at`."""

    cluster: str
    until: float
    reason: str
    by: str
    at: float

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Mute:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class AuditEntry:
    """What a row of the audit chain says, which its hash covers."""

    id: int                        # gap-free, from 1
    ts: float
    user: str
    channel: str
    cluster: str
    action: str
    detail: str                    # JSON, as hashed


@dataclass(frozen=True)
class AuditRecord(AuditEntry):
    """A row of the audit chain: the entry and its link to the row before."""

    prev_hash: str
    hash: str
    key_id: str                    # '': hash is a sha256; else an HMAC-SHA256 with the key of this id

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> AuditRecord:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class QueuedPost:
    """A message kept for the channel until a replica posts it: what was done from a shell while Slack was down."""

    id: int
    at: float
    channel: str
    plan_id: str | None            # in the plan's thread; None: in the channel
    text: str                      # mrkdwn, every value escaped already
    posted_at: float | None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> QueuedPost:
        return cls(**{f.name: row[f.name] for f in fields(cls)})
