"""The store, written once: every method of the contract (base.py) as SQL that both
databases run, over a `Connection` that a backend supplies (sqlite.py, postgres.py)
and a `Dialect` (dialect.py) for the little that differs.

A method is a unit of work: a coroutine over one connection, run by the backend
(`_run`) in one transaction when it reads before it writes. What a transaction
holds: SQLite's BEGIN IMMEDIATE holds the whole file; PostgreSQL holds the rows
read FOR UPDATE / FOR SHARE and the advisory locks (`Connection.lock`) of what
has no row to lock (the audit chain's tail, a cluster's memberships, migrations).
Leases, fences and manual stages go by the database's clock (`Dialect.now`), so
replicas whose clocks disagree still agree on who holds a lease and when a stage began.
"""
from __future__ import annotations

import dataclasses
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Coroutine, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from bot.domain.cluster import Member, MembershipRecord
from bot.domain.plan import OPEN_STATES, Confirmation, Fence, Lease, PlanState, Stage, StageAnswer
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
from bot.store.base import (
    ALERT_COLUMNS,
    GENESIS,
    SNAPSHOT_UPDATABLE,
    AuditVerifier,
    LeaseLost,
    OpenPlanExists,
    Store,
    StoreError,
    audit_detail_text,
    audit_hash,
    audit_key_id,
    judge_confirmation,
    known_columns,
    membership_text,
)
from bot.store.dialect import Dialect
from bot.store.schema import LATEST, MIGRATIONS, MIGRATIONS_TABLE, AppliedMigration, mismatch, render

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
R = TypeVar("R")
Row = dict[str, Any]

# Lock keys (PostgreSQL's advisory locks: one bigint namespace per database).
MIGRATIONS_LOCK = 0x6574636443_01   # "etcdC" 1
AUDIT_LOCK = 0x6574636443_02
MEMBERSHIP_LOCK = 0x45_43_4d        # with the cluster's name: one lock per cluster


class Conflict(StoreError):
    """A unique index refused a write; the message is the database's own line."""


class Connection(ABC):
    """A unit of work's way to the database. Statements take `?` placeholders."""

    @abstractmethod
    async def rows(self, query: str, params: Sequence[Any] = ()) -> list[Row]: ...

    @abstractmethod
    async def execute(self, query: str, params: Sequence[Any] = (), *, savepoint: bool = False) -> int:
        """The number of rows changed. A unique index's refusal raises Conflict; with
        `savepoint` the transaction goes on after it (SQLite undoes the statement alone anyway)."""

    @abstractmethod
    async def lock(self, key: int, name: str = "") -> None:
        """Hold lock `key` (of `name`) until the transaction ends; other writers of it wait."""

    @abstractmethod
    async def scan(self, query: str, params: Sequence[Any], until: Callable[[Row], R | None]) -> R | None:
        """`until` on each row in order, streamed (not all in memory); its first answer that is not None."""

    @abstractmethod
    async def columns(self) -> dict[str, set[str]]:
        """The tables present and their columns."""

    async def row(self, query: str, params: Sequence[Any] = ()) -> Row | None:
        rows = await self.rows(query, params)
        return rows[0] if rows else None

    async def value(self, query: str, params: Sequence[Any] = ()) -> Any:
        """The first column of the first row (None without a row)."""
        row = await self.row(query, params)
        return next(iter(row.values())) if row else None


Work = Callable[[Connection], Coroutine[Any, Any, T]]


def marks(values: Collection[Any]) -> str:
    return ", ".join("?" for _ in values)


def quoted(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def among(column: str, values: Collection[Any]) -> str:
    """`column IN (?, ...)`; false for no values (PostgreSQL does not parse `IN ()`)."""
    return f"{column} IN ({marks(values)})" if values else "1 = 0"


def insert(table: str, values: Collection[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(map(quoted, values))}) VALUES ({marks(values)})"


def assignments(columns: Iterable[str]) -> str:
    return ", ".join(f"{quoted(c)} = ?" for c in columns)


def columns_of(record: DataclassInstance, kind: type[DataclassInstance] | None = None) -> dict[str, Any]:
    """A record to write, by column (a record's fields are its table's columns): those of `kind` if given."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(kind or record)}


class SqlStore(Store):
    """The contract over SQL; a backend implements `_run` (and opening, closing)."""

    dialect: ClassVar[Dialect]

    def __init__(self, name: str, audit_key: str | None):
        self.name = name
        self._audit_key = audit_key.encode() if audit_key else None
        self._audit_key_id = audit_key_id(self._audit_key) if self._audit_key else ""
        self._events_swept = 0.0
        approvals = self.dialect.concat('"user"', "approvals WHERE approvals.plan_id = plans.id", "at")
        self._plan_select = f"SELECT plans.*, {approvals} AS approvals FROM plans"

    @abstractmethod
    async def _run(self, work: Work[T], *, transaction: bool = False) -> T:
        """`work` on a connection, in one transaction if asked; driver errors leave as StoreErrors."""

    async def _rows(self, query: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._run(lambda c: c.rows(query, params))

    async def _row(self, query: str, params: Sequence[Any] = ()) -> Row | None:
        return await self._run(lambda c: c.row(query, params))

    async def _value(self, query: str, params: Sequence[Any] = ()) -> Any:
        return await self._run(lambda c: c.value(query, params))

    async def _exec(self, query: str, params: Sequence[Any] = ()) -> int:
        return await self._run(lambda c: c.execute(query, params))

    async def _fenced(self, fence: Fence | None, work: Work[T], *, transaction: bool = False) -> T:
        """`work` after checking the fence in the same transaction: LeaseLost, nothing
        written, unless its holder still holds the lease with its token (FOR SHARE:
        a takeover waits until this transaction ends)."""
        async def checked(c: Connection) -> T:
            if fence is not None and await c.row(
                    f"SELECT 1 FROM leases WHERE name = ? AND holder = ? AND token = ? "
                    f"AND expires_at > {self.dialect.now}{self.dialect.for_share}",
                    [fence.name, fence.holder, fence.token]) is None:
                raise LeaseLost(fence)
            return await work(c)
        return await self._run(checked, transaction=transaction or fence is not None)

    # -- schema ---------------------------------------------------------

    async def _check(self, c: Connection) -> int:
        """The schema version the database records, once it is known to be ours: a newer
        bot's database, or tables of another program, are refused (one line) untouched."""
        have = await c.columns()
        version = int(await c.value("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                      if "schema_migrations" in have else 0)
        if version > LATEST:
            raise StoreError(f"database {self.name}: schema version {version} is newer than this bot's ({LATEST}); "
                             "run the newer bot, or restore a backup")
        self._refuse_foreign(have, version if self.dialect.released_unversioned else max(version, 1))
        return version

    def _refuse_foreign(self, have: dict[str, set[str]], version: int = LATEST) -> None:
        if (problem := mismatch(have, version)) is not None:
            raise StoreError(f"database {self.name}: {problem}; {self.dialect.foreign_hint}")

    async def _migrate(self, c: Connection) -> None:
        """In one transaction, under the migrations lock: of replicas starting together,
        one migrates and the others, waiting on the lock, find nothing left to do."""
        await c.lock(MIGRATIONS_LOCK)
        version = await self._check(c)
        await c.execute(render(MIGRATIONS_TABLE, self.dialect))
        for migration in MIGRATIONS[version:]:
            for statement in migration.statements(self.dialect):
                await c.execute(statement)
            if migration.add_missing:
                have = await c.columns()
                for (table, column), declaration in migration.add_missing.items():
                    if column not in have[table]:
                        await c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            await c.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                            [migration.version, migration.name, time.time()])

    # -- plumbing -------------------------------------------------------

    async def probe(self) -> None:
        await self._exec("INSERT INTO probe (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                         [time.time()])

    async def schema_version(self) -> int:
        return int(await self._value("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))

    async def migrations_applied(self) -> list[AppliedMigration]:
        return [AppliedMigration(r["version"], r["name"], r["applied_at"])
                for r in await self._rows("SELECT * FROM schema_migrations ORDER BY version")]

    async def plan_counts(self) -> dict[str, int]:
        return {r["state"]: int(r["n"]) for r in await self._rows("SELECT state, COUNT(*) AS n FROM plans "
                                                                   "GROUP BY state")}

    # -- plans ----------------------------------------------------------

    async def insert_plan(self, plan: NewPlan) -> None:
        values = {**columns_of(plan), "plan": json.dumps(plan.plan.to_json()), "state": PlanState.PROPOSED,
                  "updated_at": time.time()}

        async def work(c: Connection) -> None:
            try:
                await c.execute(insert("plans", values), list(values.values()))
            except Conflict:
                found = await c.row(f"SELECT id, state FROM plans WHERE cluster = ? AND {among('state', OPEN_STATES)}",
                                    [plan.cluster, *OPEN_STATES])
                if found is None:
                    raise
                raise OpenPlanExists(found["id"], found["state"]) from None
        await self._run(work)

    async def plan(self, plan_id: str) -> PlanRecord | None:
        return await self._one("plans.id = ?", [plan_id])

    async def plan_by_message(self, channel: str, ts: str) -> PlanRecord | None:
        return await self._one("plans.channel = ? AND plans.message_ts = ?", [channel, ts])

    async def open_plan(self, cluster: str) -> PlanRecord | None:
        return await self._one(f"plans.cluster = ? AND {among('plans.state', OPEN_STATES)}", [cluster, *OPEN_STATES])

    async def _one(self, where: str, params: list[Any]) -> PlanRecord | None:
        row = await self._row(f"{self._plan_select} WHERE {where} LIMIT 1", params)
        return PlanRecord.of(row) if row else None

    async def plans(self, cluster: str | None = None, limit: int = 10,
                    states: Iterable[PlanState] | None = None) -> list[PlanRecord]:
        where: list[str] = []
        params: list[Any] = []
        if cluster:
            where.append("plans.cluster = ?")
            params.append(cluster)
        if states is not None:
            wanted = [str(s) for s in states]
            where.append(among("plans.state", wanted))
            params += wanted
        query = self._plan_select + (" WHERE " + " AND ".join(where) if where else "")
        return [PlanRecord.of(r) for r in await self._rows(query + " ORDER BY plans.created_at DESC LIMIT ?",
                                                           [*params, limit])]

    async def add_approval(self, plan_id: str, user: str, needed: int) -> tuple[bool, int, bool]:
        async def work(c: Connection) -> tuple[bool, int, bool]:
            state = await c.value(f"SELECT state FROM plans WHERE id = ?{self.dialect.for_update}", [plan_id])
            if state != PlanState.PROPOSED:
                return False, 0, False
            new = await c.execute('INSERT INTO approvals (plan_id, "user", at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING',
                                  [plan_id, user, time.time()]) == 1
            count = int(await c.value("SELECT COUNT(*) FROM approvals WHERE plan_id = ?", [plan_id]))
            won = False
            if new and count >= needed:
                now = time.time()
                won = await c.execute("UPDATE plans SET state = ?, decided_by = ?, decided_at = ?, updated_at = ? "
                                      "WHERE id = ? AND state = ?",
                                      [PlanState.APPROVED, user, now, now, plan_id, PlanState.PROPOSED]) == 1
            return new, count, won
        return await self._run(work, transaction=True)

    async def transition(self, plan_id: str, from_states: Iterable[PlanState], to_state: PlanState, *,
                         fence: Fence | None = None, **fields: Any) -> bool:
        olds = [str(s) for s in from_states]
        sets = {"state": str(to_state), "updated_at": time.time(), **fields}

        async def work(c: Connection) -> bool:
            try:
                return await c.execute(f"UPDATE plans SET {assignments(sets)} WHERE id = ? AND {among('state', olds)}",
                                       [*sets.values(), plan_id, *olds], savepoint=True) == 1
            except Conflict:
                return False  # another plan of the cluster is open
        return await self._fenced(fence, work)

    async def update_plan(self, plan_id: str, *, fence: Fence | None = None, **fields: Any) -> None:
        sets = {**fields, "updated_at": time.time()}

        async def work(c: Connection) -> None:
            if await c.execute(f"UPDATE plans SET {assignments(sets)} WHERE id = ?", [*sets.values(), plan_id]) != 1:
                raise StoreError(f"database {self.name}: no plan {plan_id}")
        await self._fenced(fence, work)

    # -- steps ----------------------------------------------------------

    async def step_started(self, plan_id: str, idx: int, key: str, *, fence: Fence | None = None) -> None:
        async def work(c: Connection) -> None:
            now = time.time()
            await c.execute("INSERT INTO steps (plan_id, idx, key, state, started_at) VALUES (?, ?, ?, 'running', ?) "
                            "ON CONFLICT (plan_id, idx) DO UPDATE SET state = 'running', "
                            "started_at = excluded.started_at, finished_at = NULL, error = NULL, "
                            "attempts = steps.attempts + 1", [plan_id, idx, key, now])
            await c.execute("UPDATE plans SET current_step = ?, updated_at = ? WHERE id = ?", [idx, now, plan_id])
        await self._fenced(fence, work, transaction=True)

    async def step_finished(self, plan_id: str, idx: int, state: str, detail: str = "",
                            error: str | None = None, *, fence: Fence | None = None) -> None:
        async def work(c: Connection) -> None:
            await c.execute("UPDATE steps SET state = ?, finished_at = ?, detail = ?, error = ? "
                            "WHERE plan_id = ? AND idx = ?", [state, time.time(), detail, error, plan_id, idx])
        await self._fenced(fence, work)

    async def steps(self, plan_id: str) -> list[StepRecord]:
        return [StepRecord.of(r) for r in await self._rows("SELECT * FROM steps WHERE plan_id = ? ORDER BY idx",
                                                           [plan_id])]

    # -- leases: the database's clock -----------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        async def work(c: Connection) -> Lease | None:
            await c.execute("INSERT INTO leases (name, holder, token, expires_at) VALUES (?, '', 0, 0) "
                            "ON CONFLICT (name) DO NOTHING", [name])
            row = await c.row(f"SELECT holder, token, expires_at, {self.dialect.now} AS now FROM leases "
                              f"WHERE name = ?{self.dialect.for_update}", [name])
            assert row is not None
            held = row["expires_at"] > row["now"]
            if held and row["holder"] != holder:
                return None
            token = int(row["token"]) + (0 if held else 1)
            expires = float(row["now"]) + ttl
            await c.execute("UPDATE leases SET holder = ?, token = ?, expires_at = ? WHERE name = ?",
                            [holder, token, expires, name])
            return Lease(name, holder, token, expires)
        return await self._run(work, transaction=True)

    async def release_lease(self, name: str, holder: str) -> None:
        await self._exec("UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ?", [name, holder])

    async def lease(self, name: str) -> Lease | None:
        row = await self._row(f"SELECT * FROM leases WHERE name = ? AND expires_at > {self.dialect.now}", [name])
        return Lease(row["name"], row["holder"], int(row["token"]), float(row["expires_at"])) if row else None

    # -- events ---------------------------------------------------------

    async def first_delivery(self, event_id: str) -> bool:
        now = time.time()
        first = await self._exec("INSERT INTO events (event_id, received_at) VALUES (?, ?) "
                                 "ON CONFLICT (event_id) DO NOTHING", [event_id, now]) == 1
        if now - self._events_swept > 3600:
            self._events_swept = now
            await self._exec("DELETE FROM events WHERE received_at < ?", [now - 86400])
        return first

    # -- snapshots ------------------------------------------------------

    async def record_snapshot(self, snapshot: NewSnapshot) -> int:
        values = columns_of(snapshot, NewSnapshot)
        return int(await self._value(insert("snapshots", values) + " RETURNING id", list(values.values())))

    async def snapshots(self, cluster: str, limit: int = 10, include_pruned: bool = False) -> list[SnapshotRecord]:
        pruned = "" if include_pruned else " AND pruned_at IS NULL"
        return [SnapshotRecord.of(r) for r in await self._rows(f"SELECT * FROM snapshots WHERE cluster = ?{pruned} "
                                                               "ORDER BY created_at DESC, id DESC LIMIT ?",
                                                               [cluster, limit])]

    async def last_snapshot_at(self, cluster: str, reason: str) -> float | None:
        at: float | None = await self._value("SELECT MAX(created_at) FROM snapshots WHERE cluster = ? AND reason = ?",
                                             [cluster, reason])
        return at

    async def snapshot_for_plan(self, snapshot_id: int, plan_id: str) -> None:
        await self._exec("UPDATE snapshots SET plan_id = ? WHERE id = ? AND plan_id IS NULL", [plan_id, snapshot_id])

    async def mark_pruned(self, snapshot_id: int) -> None:
        await self._exec("UPDATE snapshots SET pruned_at = ? WHERE id = ?", [time.time(), snapshot_id])

    async def update_snapshot(self, snapshot_id: int, **fields: Any) -> None:
        sets = known_columns(fields, SNAPSHOT_UPDATABLE, "update_snapshot")
        if sets:
            await self._exec(f"UPDATE snapshots SET {assignments(sets)} WHERE id = ?", [*sets.values(), snapshot_id])

    # -- restore drills ---------------------------------------------------

    async def record_drill(self, drill: DrillRecord) -> None:
        values = columns_of(drill)
        await self._exec(insert("drills", values), list(values.values()))

    async def last_drills(self, cluster: str) -> dict[int, DrillRecord]:
        rows = await self._rows("SELECT * FROM drills WHERE cluster = ? ORDER BY at, id", [cluster])
        return {r["snapshot_id"]: DrillRecord.of(r) for r in rows}

    async def last_drill_at(self, cluster: str, requested_by: str) -> float | None:
        at: float | None = await self._value("SELECT MAX(at) FROM drills WHERE cluster = ? AND requested_by = ?",
                                             [cluster, requested_by])
        return at

    # -- memberships ----------------------------------------------------

    async def record_membership(self, cluster: str, members: Iterable[Member]) -> None:
        text = membership_text(members)

        async def work(c: Connection) -> None:
            await c.lock(MEMBERSHIP_LOCK, cluster)
            last = await c.row("SELECT id, members FROM memberships WHERE cluster = ? ORDER BY id DESC LIMIT 1",
                               [cluster])
            if last is not None and last["members"] == text:
                await c.execute("UPDATE memberships SET recorded_at = ? WHERE id = ?", [time.time(), last["id"]])
            else:
                await c.execute("INSERT INTO memberships (cluster, members, recorded_at) VALUES (?, ?, ?)",
                                [cluster, text, time.time()])
        await self._run(work, transaction=True)

    async def last_membership(self, cluster: str) -> MembershipRecord | None:
        row = await self._row("SELECT members, recorded_at FROM memberships WHERE cluster = ? ORDER BY id DESC LIMIT 1",
                              [cluster])
        return MembershipRecord.of(row) if row else None

    # -- watch: alerts and mutes -------------------------------------------

    async def open_alert(self, alert: NewAlert) -> int:
        now = time.time()
        values = {**columns_of(alert), "state": "open",
                  "opened_at": now if alert.opened_at is None else alert.opened_at,
                  "updated_at": now if alert.updated_at is None else alert.updated_at}
        return int(await self._value(insert("alerts", values) + " RETURNING id", list(values.values())))

    async def update_alert(self, alert_id: int, **fields: Any) -> None:
        sets = known_columns({"updated_at": time.time(), **fields}, ALERT_COLUMNS, "update_alert")
        await self._exec(f"UPDATE alerts SET {assignments(sets)} WHERE id = ?", [*sets.values(), alert_id])

    async def open_alerts(self, cluster: str | None = None) -> list[AlertRecord]:
        where, params = ("state = 'open' AND cluster = ?", [cluster]) if cluster else ("state = 'open'", [])
        return [AlertRecord.of(r) for r in await self._rows(f"SELECT * FROM alerts WHERE {where} ORDER BY id", params)]

    async def prune_alerts(self, resolved_before: float) -> int:
        return await self._exec("DELETE FROM alerts WHERE state = 'resolved' AND resolved_at < ?", [resolved_before])

    async def close_alerts(self, keep: Collection[str], at: float) -> int:
        names = list(keep)
        return await self._exec(f"UPDATE alerts SET state = 'resolved', resolved_at = ?, updated_at = ? "
                                f"WHERE state = 'open' AND NOT {among('cluster', names)}", [at, at, *names])

    async def receive_alert(self, alert: ReceivedAlert) -> bool:
        values = {**alert.columns(), "received_at": time.time()}
        changed = [c for c in values if c not in ("cluster", "fingerprint")]
        return await self._exec(
            insert("received_alerts", values) + " ON CONFLICT (cluster, fingerprint) DO UPDATE SET "
            + ", ".join(f"{quoted(c)} = excluded.{quoted(c)}" for c in changed)
            + " WHERE excluded.starts_at > received_alerts.starts_at OR (excluded.starts_at = received_alerts.starts_at"
              " AND received_alerts.status = 'firing' AND excluded.status = 'resolved')", list(values.values())) == 1

    async def received_alerts(self, cluster: str) -> list[ReceivedAlert]:
        return [ReceivedAlert.of(r) for r in await self._rows(
            "SELECT * FROM received_alerts WHERE cluster = ? AND status = 'firing' ORDER BY starts_at, fingerprint",
            [cluster])]

    async def prune_received(self, resolved_before: float) -> int:
        return await self._exec("DELETE FROM received_alerts WHERE status = 'resolved' AND received_at < ?",
                                [resolved_before])

    async def set_mute(self, cluster: str, until: float, reason: str, by: str) -> None:
        await self._exec('INSERT INTO mutes (cluster, "until", reason, "by", at) VALUES (?, ?, ?, ?, ?) '
                         'ON CONFLICT (cluster) DO UPDATE SET "until" = excluded."until", reason = excluded.reason, '
                         '"by" = excluded."by", at = excluded.at', [cluster, until, reason, by, time.time()])

    async def clear_mute(self, cluster: str) -> bool:
        return await self._exec('DELETE FROM mutes WHERE cluster = ? AND "until" > ?', [cluster, time.time()]) == 1

    async def mutes(self) -> list[Mute]:
        return [Mute.of(r) for r in await self._rows('SELECT * FROM mutes WHERE "until" > ? ORDER BY cluster',
                                                     [time.time()])]

    # -- manual stages: the database's clock ------------------------------

    async def open_stage(self, plan_id: str, key: str, *, fence: Fence | None = None) -> Stage:
        now = self.dialect.now

        async def work(c: Connection) -> Stage:
            await c.execute(f"UPDATE stages SET closed_at = {now} WHERE plan_id = ? AND stage <> ? "
                            "AND closed_at IS NULL", [plan_id, key])
            row = await c.row(f"INSERT INTO stages (plan_id, stage, opened_at) VALUES (?, ?, {now}) "
                              "ON CONFLICT (plan_id, stage) DO UPDATE SET opened_at = excluded.opened_at, "
                              "closed_at = NULL, confirmed_by = NULL, confirmed_at = NULL RETURNING *", [plan_id, key])
            assert row is not None
            return Stage.of(row)
        return await self._fenced(fence, work, transaction=True)

    async def close_stage(self, plan_id: str, key: str, *, fence: Fence | None = None) -> Stage | None:
        async def work(c: Connection) -> Stage | None:
            await c.execute(f"UPDATE stages SET closed_at = {self.dialect.now} WHERE plan_id = ? AND stage = ? "
                            "AND closed_at IS NULL", [plan_id, key])
            row = await c.row("SELECT * FROM stages WHERE plan_id = ? AND stage = ?", [plan_id, key])
            return Stage.of(row) if row else None
        return await self._fenced(fence, work, transaction=True)

    async def stage(self, plan_id: str, key: str) -> Stage | None:
        row = await self._row("SELECT * FROM stages WHERE plan_id = ? AND stage = ?", [plan_id, key])
        return Stage.of(row) if row else None

    async def cancel_stage(self, plan_id: str, user: str, reason: str) -> Stage | None:
        async def work(c: Connection) -> Stage | None:
            # The stage rows locked first, as confirm_stage locks them: of a cancel and a confirmation, one wins.
            rows = await c.rows("SELECT * FROM stages WHERE plan_id = ? AND closed_at IS NULL AND confirmed_by IS NULL"
                                f"{self.dialect.for_update}", [plan_id])
            if not rows:
                return None
            now = float(await c.value(f"SELECT {self.dialect.now}"))
            sets = {"state": str(PlanState.CANCELLED), "decided_by": user, "decided_at": now, "error": reason,
                    "finished_at": now, "updated_at": now}
            if await c.execute(f"UPDATE plans SET {assignments(sets)} WHERE id = ? AND state = ?",
                               [*sets.values(), plan_id, str(PlanState.RUNNING)]) != 1:
                return None
            stage = Stage.of(rows[0])
            await c.execute("UPDATE stages SET closed_at = ? WHERE plan_id = ? AND stage = ?",
                            [now, plan_id, stage.key])
            return replace(stage, closed_at=now)
        return await self._run(work, transaction=True)

    async def confirm_stage(self, plan_id: str, user: str, key: str | None, settle: float) -> StageAnswer:
        async def work(c: Connection) -> StageAnswer:
            # The plan's stage rows locked first: a racing confirmation, or the stage opening, waits for this one.
            rows = await c.rows(f"SELECT * FROM stages WHERE plan_id = ?{self.dialect.for_update}", [plan_id])
            stages = [Stage.of(r) for r in rows]
            now = float(await c.value(f"SELECT {self.dialect.now}"))
            refused = judge_confirmation(stages, key, now, settle)
            if refused is not None:
                return refused
            current = max(stages, key=lambda s: s.opened_at)
            await c.execute("UPDATE stages SET confirmed_by = ?, confirmed_at = ? WHERE plan_id = ? AND stage = ?",
                            [user, now, plan_id, current.key])
            return StageAnswer(Confirmation.CONFIRMED, replace(current, confirmed_by=user, confirmed_at=now), now)
        return await self._run(work, transaction=True)

    # -- outbox -----------------------------------------------------------

    async def queue_post(self, channel: str, plan_id: str | None, text: str) -> None:
        await self._exec("INSERT INTO outbox (at, channel, plan_id, text) VALUES (?, ?, ?, ?)",
                         [time.time(), channel, plan_id, text])

    async def queued_posts(self, limit: int = 50) -> list[QueuedPost]:
        rows = await self._rows("SELECT * FROM outbox WHERE posted_at IS NULL ORDER BY id LIMIT ?", [limit])
        return [QueuedPost.of(r) for r in rows]

    async def mark_posted(self, post_id: int) -> None:
        await self._exec("UPDATE outbox SET posted_at = ? WHERE id = ?", [time.time(), post_id])

    # -- audit ----------------------------------------------------------

    async def audit(self, action: str, *, user: str = "", channel: str = "", cluster: str = "",
                    detail: dict[str, Any] | None = None) -> int:
        detail_text = audit_detail_text(detail)

        async def work(c: Connection) -> int:
            # The lock before the read: each writer, in any replica, reads the tail the last one committed.
            await c.lock(AUDIT_LOCK)
            last = await c.row("SELECT id, hash, key_id FROM audit ORDER BY id DESC LIMIT 1")
            self._check_key(last)
            entry = AuditEntry(id=int(last["id"]) + 1 if last else 1, ts=round(time.time(), 6), user=user,
                               channel=channel, cluster=cluster, action=action, detail=detail_text)
            prev = last["hash"] if last else GENESIS
            values = columns_of(AuditRecord(**columns_of(entry), prev_hash=prev,
                                            hash=audit_hash(prev, entry, self._audit_key), key_id=self._audit_key_id))
            await c.execute(insert("audit", values), list(values.values()))
            return entry.id
        return await self._run(work, transaction=True)

    async def continue_audit_chain(self) -> None:
        tail = await self._row("SELECT id, key_id FROM audit ORDER BY id DESC LIMIT 1")
        self._check_key(tail)
        if self._audit_key and tail is not None and not tail["key_id"]:
            await self.audit("audit_keyed", detail={"unkeyed_rows": tail["id"]})

    def _check_key(self, tail: Row | None) -> None:
        if tail is None or not tail["key_id"] or tail["key_id"] == self._audit_key_id:
            return
        problem = ("no audit key is configured (audit_key_env or audit_key_file)" if not self._audit_key
                   else "the configured audit key is not the one it was written with")
        raise StoreError(f"database {self.name}: the audit chain is keyed with HMAC up to row {tail['id']}, "
                         f"but {problem}")

    async def acted_before(self, action: str, user: str, plan_id: str) -> bool:
        return await self._row(f'SELECT 1 FROM audit WHERE action = ? AND "user" = ? '
                               f"AND {self.dialect.json_field('detail', 'plan')} = ? LIMIT 1",
                               [action, user, plan_id]) is not None

    async def audit_rows(self, since: float | None = None) -> list[AuditRecord]:
        return [AuditRecord.of(r) for r in await self._rows("SELECT * FROM audit WHERE ts >= ? ORDER BY id",
                                                            [since or 0])]

    async def verify_audit(self) -> tuple[int, str | None]:
        async def work(c: Connection) -> tuple[int, str | None]:
            verifier = AuditVerifier(self._audit_key, self._audit_key_id)
            problem = await c.scan("SELECT * FROM audit ORDER BY id", (), lambda r: verifier.check(AuditRecord.of(r)))
            return (verifier.n, problem) if problem is not None else verifier.result(())
        return await self._run(work)

    async def audit_keyed_from(self) -> int | None:
        first = await self._value("SELECT MIN(id) FROM audit WHERE key_id != ''")
        return int(first) if first is not None else None
