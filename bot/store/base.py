"""The store contract: what the bot keeps and how a change is made, whatever
the database. It is implemented once (sql.py) over two backends (sqlite.py,
the embedded default; postgres.py, shared by several replicas), and one
contract test suite (tests/test_store_contract.py) runs against both.

The contract's promises, which the engine and the handlers rely on:
- every state change is a guarded, conditional write in one transaction
  (a plan's state moves only from the states named; the approval that
  reaches the count is the only one told so), so racing callers, in one
  process or in several replicas, cannot both win;
- with a `Fence`, a write happens only while its holder still holds the
  lease with that token (in the same transaction), else `LeaseLost`;
- the audit log is one linear hash chain, however many writers append;
- errors are `StoreError`s with one line naming the database (never a password).
"""
from __future__ import annotations

import hashlib
import hmac
import json
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable
from dataclasses import fields
from typing import Any

from bot.domain.cluster import Member, MembershipRecord
from bot.domain.plan import Confirmation, Fence, Lease, PlanState, Stage, StageAnswer
from bot.domain.record import (
    AlertRecord,
    AuditEntry,
    AuditRecord,
    Mute,
    NewAlert,
    NewPlan,
    PlanRecord,
    QueuedPost,
    ReceivedAlert,
    StepRecord,
)
from bot.domain.snapshot import DrillRecord, NewSnapshot, SnapshotRecord
from bot.store.schema import AppliedMigration

GENESIS = "0" * 64

# Columns of the tables a caller may write through `update_snapshot` and `update_alert`.
SNAPSHOT_UPDATABLE = frozenset({"remote_url", "remote_state", "remote_error", "remote_verified_at",
                                "remote_pruned_at", "pruned_at", "plan_id"})
REMOTE_STATES = ("", "uploading", "verified", "failed")
ALERT_COLUMNS = frozenset(f.name for f in fields(AlertRecord)) - {"id"}


class StoreError(Exception):
    """The database could not do what was asked, or cannot be used at all
    (corrupt, a directory, another schema, unreachable); one line naming the
    database and why."""


class StoreBusy(StoreError):
    """Another writer holds the database lock beyond our bounded wait."""


class OpenPlanExists(StoreError):
    def __init__(self, plan_id: str, state: str):
        super().__init__(f"plan {plan_id} is {state}")
        self.plan_id, self.state = plan_id, state


class LeaseLost(StoreError):
    """A fenced write was refused: the fence's holder no longer holds the lease
    with that token (it expired, was released or taken over). Nothing was written."""

    def __init__(self, fence: Fence):
        super().__init__(f"lease {fence.name} is no longer held by {fence.holder} with token {fence.token}; "
                         "nothing was written")
        self.fence = fence


def audit_hash(prev_hash: str, entry: AuditEntry, key: bytes | None = None) -> str:
    """sha256 over the previous row's hash and this row's content; with a key,
    an HMAC-SHA256, which nobody without the key can recompute."""
    content = json.dumps([entry.id, entry.ts, entry.user, entry.channel, entry.cluster, entry.action, entry.detail],
                         separators=(",", ":"), ensure_ascii=False)
    message = f"{prev_hash}\n{content}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest() if key else hashlib.sha256(message).hexdigest()


def audit_key_id(key: bytes) -> str:
    """A short name of a key, stored with each keyed row: tells "wrong key" from
    "changed row" and reveals nothing of the key."""
    return hmac.new(key, b"etcd-chatops audit key id", hashlib.sha256).hexdigest()[:16]


def membership_text(members: Iterable[Member]) -> str:
    """A membership as stored: sorted, compact JSON, so an unchanged one compares equal."""
    return json.dumps(sorted((m.to_json() for m in members), key=lambda m: (m["name"], m["id"])), sort_keys=True,
                      separators=(",", ":"))


def audit_detail_text(detail: dict[str, Any] | None) -> str:
    return json.dumps(detail or {}, sort_keys=True, separators=(",", ":"), default=str)


def known_columns(fields: dict[str, Any], allowed: frozenset[str], what: str) -> dict[str, Any]:
    """`fields` when every key is a column the caller may write; ValueError (a bug, not bad input) otherwise."""
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"{what}: unknown column(s) {', '.join(unknown)}")
    if "remote_state" in fields and fields["remote_state"] not in REMOTE_STATES:
        raise ValueError(f"{what}: remote_state {fields['remote_state']!r} is not one of {REMOTE_STATES}")
    return fields


def judge_confirmation(stages: Iterable[Stage], key: str | None, now: float, settle: float) -> StageAnswer | None:
    """A confirmation of the plan whose stages are `stages`, arriving at `now` (the database's clock), naming
    stage `key` or none: the refusal, or None when it confirms the stage the plan waits on (the newest).
    Unnamed, it is refused for `settle` seconds after its stage opened when an earlier stage was confirmed:
    two approvers confirming one stage moments apart must not confirm the next one too."""
    every = list(stages)
    current = max(every, key=lambda s: s.opened_at, default=None)
    if key is not None and (current is None or key != current.key):
        named = next((s for s in every if s.key == key), None)
        if named is not None and named.confirmed_by:
            return StageAnswer(Confirmation.ALREADY, named, now)
        return StageAnswer(Confirmation.NOT_WAITING, current, now)
    if current is None:
        return StageAnswer(Confirmation.NOT_WAITING, None, now)
    if current.confirmed_by:
        return StageAnswer(Confirmation.ALREADY, current, now)
    if current.closed_at is not None:
        return StageAnswer(Confirmation.NOT_WAITING, current, now)
    if key is None and now - current.opened_at < settle and any(s.confirmed_by for s in every if s is not current):
        return StageAnswer(Confirmation.TOO_SOON, current, now)
    return None


class AuditVerifier:
    """Walks the chain row by row (ordered by id); `problem` is set at the first break.
    Rows before the first keyed one may be unkeyed (written before a key was
    configured); after it, an unkeyed row is a rewrite without the key."""

    def __init__(self, key: bytes | None, key_id: str):
        self.key, self.key_id = key, key_id
        self.prev, self.expected_id, self.n = GENESIS, 1, 0
        self.keyed_row: int | None = None

    def check(self, row: AuditRecord) -> str | None:
        self.n += 1
        if row.id != self.expected_id:
            return f"row {self.expected_id} is missing (next is {row.id})"
        if row.prev_hash != self.prev:
            return f"row {row.id}: previous hash does not match row {row.id - 1}"
        if row.key_id:
            if not self.key:
                return (f"row {row.id} is keyed with HMAC and no audit key is configured "
                        "(audit_key_env or audit_key_file): it cannot be verified")
            if row.key_id != self.key_id:
                return f"row {row.id} is keyed with another key than the configured audit key"
            self.keyed_row = self.keyed_row or row.id
        elif self.keyed_row:
            return (f"row {row.id} is not keyed although row {self.keyed_row} before it is: "
                    "rewritten by someone without the key")
        if audit_hash(self.prev, row, self.key if row.key_id else None) != row.hash:
            return f"row {row.id}: content does not match its hash (changed after it was written)"
        self.prev, self.expected_id = row.hash, self.expected_id + 1
        return None

    def result(self, rows: Iterable[AuditRecord]) -> tuple[int, str | None]:
        for row in rows:
            if (problem := self.check(row)) is not None:
                return self.n, problem
        if self.key and self.n and not self.keyed_row:
            return self.n, (f"no row is keyed although an audit key is configured: the bot has not run with the key "
                            f"yet, or rows up to {self.expected_id - 1} were rewritten by someone without it")
        return self.n, None


class Store(ABC):
    """The bot's state. All methods are coroutines; every failure is a StoreError."""

    name: str  # the database as shown in messages: a path, or a URL without its password

    # -- plumbing -------------------------------------------------------

    @abstractmethod
    async def open(self) -> Store:
        """Connect, refuse a database that is not ours (one line, nothing altered),
        apply pending schema migrations exactly once (under the database's lock,
        so replicas starting together do not race), and return self."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; safe on a store that never opened."""

    @abstractmethod
    async def probe(self) -> None:
        """A real write, for the readiness check: raises when the database refuses."""

    @abstractmethod
    async def schema_version(self) -> int:
        """The highest migration applied."""

    @abstractmethod
    async def migrations_applied(self) -> list[AppliedMigration]:
        """The migrations record, in order."""

    @abstractmethod
    async def plan_counts(self) -> dict[str, int]:
        """Number of plans by state."""

    # -- plans ----------------------------------------------------------

    @abstractmethod
    async def insert_plan(self, plan: NewPlan) -> None:
        """Store a plan, proposed; OpenPlanExists if the cluster has one open
        (a unique index guards it, so two replicas proposing at once: one wins)."""

    @abstractmethod
    async def plan(self, plan_id: str) -> PlanRecord | None: ...

    @abstractmethod
    async def plan_by_message(self, channel: str, ts: str) -> PlanRecord | None: ...

    @abstractmethod
    async def open_plan(self, cluster: str) -> PlanRecord | None: ...

    @abstractmethod
    async def plans(self, cluster: str | None = None, limit: int = 10,
                    states: Iterable[PlanState] | None = None) -> list[PlanRecord]:
        """Newest first."""

    @abstractmethod
    async def add_approval(self, plan_id: str, user: str, needed: int) -> tuple[bool, int, bool]:
        """Record `user`'s approval of a proposed plan, atomically with counting:
        (first time this user approved, distinct approvers now, this call moved
        the plan to approved). Exactly one caller sees the last flag, however
        approvals race (from one store or several)."""

    @abstractmethod
    async def transition(self, plan_id: str, from_states: Iterable[PlanState], to_state: PlanState, *,
                         fence: Fence | None = None, **fields: Any) -> bool:
        """The guarded state change (the old states in the WHERE): True only for
        the one caller that made it. False when the plan is in none of
        `from_states` or the move would open a second plan of the cluster.
        With `fence`: LeaseLost unless the lease is still held with its token."""

    @abstractmethod
    async def update_plan(self, plan_id: str, *, fence: Fence | None = None, **fields: Any) -> None:
        """Set columns of a plan (not its state: that is `transition`'s)."""

    # -- steps ----------------------------------------------------------

    @abstractmethod
    async def step_started(self, plan_id: str, idx: int, key: str, *, fence: Fence | None = None) -> None:
        """The step is running (again: attempts counts); the plan's current step moves to it."""

    @abstractmethod
    async def step_finished(self, plan_id: str, idx: int, state: str, detail: str = "",
                            error: str | None = None, *, fence: Fence | None = None) -> None: ...

    @abstractmethod
    async def steps(self, plan_id: str) -> list[StepRecord]: ...

    # -- leases ---------------------------------------------------------

    @abstractmethod
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        """Take or renew the lease `name` for `ttl` seconds, in one guarded write.
        Granted when free (never taken, released or expired) or already held by
        `holder` (a renewal: same token, later expiry). The token counts tenures:
        a renewal keeps it, any other grant takes the next one, so it increases
        each time the holder changes (and when a holder takes it back after it
        lapsed). None while another holder's lease is unexpired.
        Times are the database's clock, whatever the replicas' clocks say."""

    @abstractmethod
    async def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up at once (if `holder` holds it): the next acquire needs no wait."""

    @abstractmethod
    async def lease(self, name: str) -> Lease | None:
        """The lease as held now; None when free (never taken, released or expired)."""

    # -- events ---------------------------------------------------------

    @abstractmethod
    async def first_delivery(self, event_id: str) -> bool:
        """True the first time an event ID is seen by any replica (Slack redelivers
        within minutes; IDs older than a day are forgotten)."""

    # -- snapshots ------------------------------------------------------

    @abstractmethod
    async def record_snapshot(self, snapshot: NewSnapshot) -> int:
        """Catalog a snapshot (of a SnapshotRecord, what a NewSnapshot says: a copy, under a new id); its id."""

    @abstractmethod
    async def snapshots(self, cluster: str, limit: int = 10, include_pruned: bool = False) -> list[SnapshotRecord]:
        """Newest first."""

    @abstractmethod
    async def last_snapshot_at(self, cluster: str, reason: str) -> float | None: ...

    @abstractmethod
    async def snapshot_for_plan(self, snapshot_id: int, plan_id: str) -> None:
        """Mark a snapshot as a plan's pre-change snapshot (it joined one already running)."""

    @abstractmethod
    async def mark_pruned(self, snapshot_id: int) -> None: ...

    @abstractmethod
    async def update_snapshot(self, snapshot_id: int, **fields: Any) -> None:
        """Set catalog columns of a snapshot (the off-site copy's remote_* columns;
        remote_state is '' | 'uploading' | 'verified' | 'failed'); ValueError for
        another column."""

    # -- restore drills ---------------------------------------------------

    @abstractmethod
    async def record_drill(self, drill: DrillRecord) -> None: ...

    @abstractmethod
    async def last_drills(self, cluster: str) -> dict[int, DrillRecord]:
        """The last drill of each snapshot of `cluster`, by snapshot id."""

    @abstractmethod
    async def last_drill_at(self, cluster: str, requested_by: str) -> float | None: ...

    # -- memberships ----------------------------------------------------

    @abstractmethod
    async def record_membership(self, cluster: str, members: Iterable[Member]) -> None:
        """The membership a status or plan check saw: a new row when it changed,
        else the last row's time moves on (one row per change, not per check)."""

    @abstractmethod
    async def last_membership(self, cluster: str) -> MembershipRecord | None:
        """The last membership the bot recorded for `cluster` and when it last saw it."""

    # -- watch: alerts and mutes -------------------------------------------

    @abstractmethod
    async def open_alert(self, alert: NewAlert) -> int:
        """Record an alert, open; its id."""

    @abstractmethod
    async def update_alert(self, alert_id: int, **fields: Any) -> None:
        """Set columns of an alert; ValueError for an unknown column."""

    @abstractmethod
    async def open_alerts(self, cluster: str | None = None) -> list[AlertRecord]:
        """Alerts in state 'open', oldest first."""

    @abstractmethod
    async def prune_alerts(self, resolved_before: float) -> int:
        """Delete the alerts resolved before `resolved_before`; how many."""

    @abstractmethod
    async def close_alerts(self, keep: Collection[str], at: float) -> int:
        """Mark resolved at `at` the open alerts of clusters not in `keep` (their messages are
        left as they are: the bot no longer watches those clusters); how many."""

    @abstractmethod
    async def receive_alert(self, alert: ReceivedAlert) -> bool:
        """File what Alertmanager sent of one alert: True when it changes what is known, in one guarded write: a
        new alert, a new episode of it (a later `starts_at`), or the resolution of the episode known. A
        redelivery (the same state), or a late copy of an older state, changes nothing."""

    @abstractmethod
    async def received_alerts(self, cluster: str) -> list[ReceivedAlert]:
        """The alerts of `cluster` that Alertmanager last said are firing, oldest first."""

    @abstractmethod
    async def prune_received(self, resolved_before: float) -> int:
        """Delete the resolved alerts received before `resolved_before`; how many."""

    @abstractmethod
    async def set_mute(self, cluster: str, until: float, reason: str, by: str) -> None:
        """Mute a cluster's alerts until `until` (replacing an earlier mute)."""

    @abstractmethod
    async def clear_mute(self, cluster: str) -> bool:
        """True when there was a mute to clear."""

    @abstractmethod
    async def mutes(self) -> list[Mute]:
        """The mutes not yet expired."""

    # -- manual stages --------------------------------------------------
    # A plan waits on one stage at a time; a confirmation counts for the stage it waits on when it
    # arrives, never for one that starts later. Times are the database's clock (dialect.py: now).

    @abstractmethod
    async def open_stage(self, plan_id: str, key: str, *, fence: Fence | None = None) -> Stage:
        """The plan waits on stage `key` from now: a fresh wait (an earlier confirmation of that stage, from a run
        that stopped, no longer counts), and any other stage of the plan stops waiting."""

    @abstractmethod
    async def close_stage(self, plan_id: str, key: str, *, fence: Fence | None = None) -> Stage | None:
        """The wait on `key` ends (later confirmations are refused); the stage as it ended, confirmed or not."""

    @abstractmethod
    async def stage(self, plan_id: str, key: str) -> Stage | None: ...

    @abstractmethod
    async def cancel_stage(self, plan_id: str, user: str, reason: str) -> Stage | None:
        """`/etcd cancel` of a plan waiting on a person, in one write: the stage it waits on stops waiting
        unconfirmed and the plan goes running -> cancelled (`decided_by` the user, `error` the reason). None,
        changing nothing, when the plan waits on no stage (a confirmation that won the race included)."""

    @abstractmethod
    async def confirm_stage(self, plan_id: str, user: str, key: str | None, settle: float) -> StageAnswer:
        """`/etcd continue`: confirm the stage the plan waits on now, in one guarded write (of racing
        confirmations, one is CONFIRMED and the others ALREADY), as `judge_confirmation` decides."""

    # -- outbox: posted once Slack answers ---------------------------------

    @abstractmethod
    async def queue_post(self, channel: str, plan_id: str | None, text: str) -> None:
        """Keep a message for the channel (in the plan's thread when `plan_id`) until a replica posts it."""

    @abstractmethod
    async def queued_posts(self, limit: int = 50) -> list[QueuedPost]:
        """The messages not posted yet, oldest first."""

    @abstractmethod
    async def mark_posted(self, post_id: int) -> None: ...

    # -- audit ----------------------------------------------------------

    @abstractmethod
    async def audit(self, action: str, *, user: str = "", channel: str = "", cluster: str = "",
                    detail: dict[str, Any] | None = None) -> int:
        """Append one row to the hash chain, atomically with reading its tail (one
        linear chain under concurrent writers); its id."""

    @abstractmethod
    async def continue_audit_chain(self) -> None:
        """At start-up: StoreError unless the configured key continues the chain
        (no key, or another key, after keyed rows would write rows that never
        verify). The first start with a key after unkeyed rows keys the chain at
        once with an `audit_keyed` row: from then on, an unkeyed tail is a rewrite."""

    @abstractmethod
    async def acted_before(self, action: str, user: str, plan_id: str) -> bool:
        """Whether the audit already holds `action` by `user` on the plan (a repeated refusal)."""

    @abstractmethod
    async def audit_rows(self, since: float | None = None) -> list[AuditRecord]: ...

    @abstractmethod
    async def verify_audit(self) -> tuple[int, str | None]:
        """(rows checked, None) when the chain holds, else the first problem (AuditVerifier)."""

    @abstractmethod
    async def audit_keyed_from(self) -> int | None:
        """The first row keyed with HMAC (earlier rows were written without a key), or None."""


