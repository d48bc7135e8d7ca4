"""The bot's memory in SQLite (through sqlite-utils), the embedded default:
plans, their steps, seen Slack events, snapshots, leases, alerts and a
hash-chained audit log (the contract: bot/store/base.py).

All SQL of a store runs on one dedicated thread: the event loop never waits
on the disk, and writes are serialized. Several stores (processes) on one
file are serialized by SQLite's lock: read-then-write goes in BEGIN
IMMEDIATE, and the guarded state transitions (one UPDATE with the old state
in its WHERE) are the only way a plan changes state, so two approvals racing
execute once.
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from bot.store.base import (
    ALERT_COLUMNS,
    GENESIS,
    SNAPSHOT_UPDATABLE,
    AuditVerifier,
    LeaseLost,
    OpenPlanExists,
    Store,
    StoreBusy,
    StoreError,
    audit_detail_text,
    audit_hash,
    audit_key_id,
    judge_confirmation,
    known_columns,
    membership_text,
)
from bot.store.records import (
    OPEN_STATES,
    Confirmation,
    Fence,
    Lease,
    PlanRecord,
    PlanState,
    Stage,
    StageAnswer,
)

T = TypeVar("T")
__all__ = ["GENESIS", "OpenPlanExists", "SqliteStore", "StoreBusy", "StoreError", "audit_hash"]

# Version 1: the schema of the releases before versioned migrations (with the columns they added on open).
BASELINE = """
CREATE TABLE IF NOT EXISTS plans (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL DEFAULT 'replace',  -- a PlanKind
    cluster TEXT NOT NULL,
    state TEXT NOT NULL,           -- a PlanState
    channel TEXT NOT NULL,
    message_ts TEXT,
    proposer TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    fingerprint TEXT NOT NULL,
    plan TEXT NOT NULL,            -- the Plan as JSON
    current_step INTEGER NOT NULL DEFAULT 0,
    decided_by TEXT,
    decided_at REAL,
    finished_at REAL,
    error TEXT,
    new_member_id TEXT,
    updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_open_plan_per_cluster ON plans(cluster)
    WHERE state IN (@OPEN_STATES@);
CREATE TABLE IF NOT EXISTS approvals (
    plan_id TEXT NOT NULL,
    user TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (plan_id, user)    -- each approver counts once
);
CREATE TABLE IF NOT EXISTS steps (
    plan_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    key TEXT NOT NULL,
    state TEXT NOT NULL,           -- running | done | failed
    started_at REAL NOT NULL,
    finished_at REAL,
    detail TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (plan_id, idx)
);
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    path TEXT NOT NULL,
    member TEXT NOT NULL,
    revision INTEGER NOT NULL,
    hash TEXT NOT NULL,
    total_keys INTEGER NOT NULL,
    live_keys INTEGER,
    total_size INTEGER NOT NULL,
    file_size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    encrypted INTEGER NOT NULL DEFAULT 0,
    requested_by TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    duration REAL NOT NULL,
    created_at REAL NOT NULL,
    pruned_at REAL,
    plan_id TEXT                   -- the plan this is the pre-change snapshot of (retention keeps it)
);
CREATE INDEX IF NOT EXISTS snapshots_by_cluster ON snapshots(cluster, created_at);
CREATE TABLE IF NOT EXISTS probe (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    user TEXT NOT NULL,
    channel TEXT NOT NULL,
    cluster TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    key_id TEXT NOT NULL DEFAULT ''  -- '' : hash is a sha256; else: an HMAC-SHA256 with the key of this id
);
CREATE TABLE IF NOT EXISTS memberships (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    members TEXT NOT NULL,         -- JSON: [{id, name, peer_urls, client_urls, is_learner}]
    recorded_at REAL NOT NULL      -- the last time the bot saw exactly this membership
);
CREATE INDEX IF NOT EXISTS memberships_by_cluster ON memberships(cluster, id);
CREATE TABLE IF NOT EXISTS drills (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    snapshot_id INTEGER NOT NULL,  -- snapshots.id
    ok INTEGER NOT NULL,
    detail TEXT NOT NULL,          -- what the restored etcd showed, or why the drill failed
    seconds REAL NOT NULL,
    at REAL NOT NULL,
    requested_by TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS drills_by_cluster ON drills(cluster, at);
""".replace("@OPEN_STATES@", ", ".join(f"'{s}'" for s in OPEN_STATES))
# Columns added after the first release: databases created before get them in migration 1.
ADDED_COLUMNS = {("snapshots", "plan_id"): "TEXT", ("audit", "key_id"): "TEXT NOT NULL DEFAULT ''",
                 ("plans", "kind"): "TEXT NOT NULL DEFAULT 'replace'"}

LEASES_ALERTS_MUTES = """
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token INTEGER NOT NULL,        -- one per tenure; fenced writes compare it
    expires_at REAL NOT NULL       -- time.time() of the writer (SQLite has no server clock)
);
CREATE TABLE alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    condition TEXT NOT NULL,
    subject TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,           -- open | resolved
    opened_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    resolved_at REAL,
    channel TEXT,
    message_ts TEXT,
    detail TEXT,
    flaps INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX alerts_open ON alerts(state, cluster);
CREATE TABLE mutes (
    cluster TEXT PRIMARY KEY,
    "until" REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    "by" TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL
);
ALTER TABLE snapshots ADD COLUMN remote_url TEXT;
ALTER TABLE snapshots ADD COLUMN remote_state TEXT NOT NULL DEFAULT '';  -- '' | uploading | verified | failed
ALTER TABLE snapshots ADD COLUMN remote_error TEXT;
ALTER TABLE snapshots ADD COLUMN remote_verified_at REAL;
ALTER TABLE snapshots ADD COLUMN remote_pruned_at REAL;
"""

STAGES = """
CREATE TABLE stages (
    plan_id TEXT NOT NULL,
    stage TEXT NOT NULL,           -- readable: the step it belongs to (stop, restore, start)
    opened_at REAL NOT NULL,       -- SQLite's own clock (NOW), as every time in this table
    closed_at REAL,                -- the wait ended
    confirmed_by TEXT,             -- the approver whose /etcd continue confirmed it
    confirmed_at REAL,
    PRIMARY KEY (plan_id, stage)
);
"""
# The database's clock, in seconds since the epoch (with milliseconds): the time every process sharing
# the file reads, not the time.time() of the process that happens to write.
NOW = "((julianday('now') - 2440587.5) * 86400.0)"


def statements(script: str) -> list[str]:
    """A script as single statements: executescript would COMMIT the migration's transaction."""
    out, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            out.append(buffer.strip())
            buffer = ""
    assert not buffer.strip(), f"incomplete statement: {buffer!r}"
    return out


def _baseline(db: sqlite_utils.Database) -> None:
    """Creates what is missing: a new file gets it all, a file of the releases before
    versioning keeps its rows and gains the columns added since."""
    for statement in statements(BASELINE):
        db.execute(statement)
    for (table, column), decl in ADDED_COLUMNS.items():
        if column not in db.table(table).columns_dict:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


def _script(script: str) -> Callable[[sqlite_utils.Database], None]:
    def apply(db: sqlite_utils.Database) -> None:
        for statement in statements(script):
            db.execute(statement)
    return apply


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[sqlite_utils.Database], None]


# In order; a released migration is never edited, a change is a new one at the end.
MIGRATIONS = (
    Migration(1, "plans, approvals, steps, events, snapshots, audit, memberships, drills", _baseline),
    Migration(2, "leases, alerts, mutes; snapshots' off-site copy", _script(LEASES_ALERTS_MUTES)),
    Migration(3, "stages: the manual stage a plan waits on, and who confirmed it", _script(STAGES)),
)
LATEST = MIGRATIONS[-1].version
MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                    "applied_at REAL NOT NULL)")


class SqliteStore(Store):
    """Async facade; every method runs its SQL on the store's own thread."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0, retries: int = 3, audit_key: str | None = None):
        self.path = Path(path)
        self.name = str(self.path)
        self._audit_key = audit_key.encode() if audit_key else None
        self._audit_key_id = audit_key_id(self._audit_key) if self._audit_key else ""
        self.busy_timeout = busy_timeout
        self.retries = retries
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._db: sqlite_utils.Database | None = None
        self._schema_cookie = -1   # SQLite's counter of schema changes, when our tables were last checked
        self._events_swept = 0.0

    # -- plumbing -------------------------------------------------------

    async def open(self) -> SqliteStore:
        await self._run(self._open)
        return self

    def _open(self, _db: sqlite_utils.Database | None = None) -> None:
        """Connect, then check the tables already there (against the schema of the
        version the file records) before migrating: a file of another program or a
        newer bot is refused by name, never half-altered. Migrations run in one
        BEGIN IMMEDIATE, so of several processes opening at once one migrates."""
        if self.path.is_dir():
            raise StoreError(f"database {self.path}: is a directory, not a database file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            db = sqlite_utils.Database(conn)
            self._check_schema(db, _version(db))
            db.enable_wal()
            conn.execute("PRAGMA synchronous = FULL")  # a step's outcome is on disk before the next step
            with _immediate(db):
                db.execute(MIGRATIONS_TABLE)
                version = _version(db)
                self._check_version(version)
                for migration in MIGRATIONS[version:]:
                    migration.apply(db)
                    db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                               [migration.version, migration.name, time.time()])
            self._schema_cookie = _schema_cookie(db)
        except BaseException:
            conn.close()
            raise
        self._db = db

    def _check_version(self, version: int) -> None:
        if version > LATEST:
            raise StoreError(f"database {self.path}: schema version {version} is newer than this bot's ({LATEST}); "
                             "run the newer bot, or restore a backup")

    def _check_schema(self, db: sqlite_utils.Database, version: int = LATEST) -> None:
        """Each of our tables that exists has every column of schema `version`."""
        self._check_version(version)
        for table, columns in expected_columns(version).items():
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})").fetchall()}
            missing = [c for c in columns if c not in have]
            if have and missing:
                shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                raise StoreError(f"database {self.path}: table {table} does not match this version of the bot "
                                 f"(no column {shown}); another program's or an old file?")

    async def close(self) -> None:
        """Close even an unusable database (no schema check, nothing to retry)."""
        try:
            if self._db is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._db.conn.close)
        finally:
            self._db = None
            self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        for attempt in range(self.retries):
            try:
                return await loop.run_in_executor(self._executor, self._call, fn, args)
            except OSError as e:
                raise StoreError(f"database {self.path}: {e.strerror or e}") from None
            except sqlite3.DatabaseError as e:  # corrupt ("file is not a database"), I/O, SQL on a foreign schema
                if not isinstance(e, sqlite3.OperationalError) or ("locked" not in str(e) and "busy" not in str(e)):
                    raise StoreError(f"database {self.path}: {e}") from None
                if attempt == self.retries - 1:
                    raise StoreBusy(f"database {self.path} is locked by another writer "
                                    f"(waited {self.busy_timeout * self.retries:g}s); nothing was changed") from None
        raise AssertionError("unreachable")

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._db is None:
            if fn != self._open:
                raise StoreError(f"database {self.path} is not open")
        elif (cookie := _schema_cookie(self._db)) != self._schema_cookie:
            self._check_schema(self._db)  # someone changed the tables under us: check them again
            self._schema_cookie = cookie
        return fn(self._db, *args)

    async def probe(self) -> None:
        await self._run(lambda db: db.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", [time.time()]))

    async def schema_version(self) -> int:
        return await self._run(_version)

    async def migrations_applied(self) -> list[dict[str, Any]]:
        return await self._run(lambda db: list(db.query("SELECT * FROM schema_migrations ORDER BY version")))

    async def plan_counts(self) -> dict[str, int]:
        return await self._run(lambda db: {r["state"]: r["n"] for r in db.query(
            "SELECT state, COUNT(*) AS n FROM plans GROUP BY state")})

    # -- plans ----------------------------------------------------------

    async def insert_plan(self, row: dict[str, Any]) -> None:
        def fn(db: sqlite_utils.Database) -> None:
            try:
                with db.atomic():
                    db.table("plans").insert({**row, "updated_at": time.time()})
            except sqlite3.IntegrityError:
                open_plan = next(db.query(
                    f"SELECT id, state FROM plans WHERE cluster = ? AND state IN ({_marks(OPEN_STATES)})",
                    [row["cluster"], *OPEN_STATES]), None)
                if open_plan is None:
                    raise
                raise OpenPlanExists(open_plan["id"], open_plan["state"]) from None
        await self._run(fn)

    async def plan(self, plan_id: str) -> PlanRecord | None:
        return await self._one("plans.id = ?", [plan_id])

    async def plan_by_message(self, channel: str, ts: str) -> PlanRecord | None:
        return await self._one("plans.channel = ? AND plans.message_ts = ?", [channel, ts])

    async def open_plan(self, cluster: str) -> PlanRecord | None:
        return await self._one(f"plans.cluster = ? AND plans.state IN ({_marks(OPEN_STATES)})", [cluster, *OPEN_STATES])

    async def _one(self, where: str, params: list[Any]) -> PlanRecord | None:
        rows = await self._run(lambda db: list(db.query(f"{PLAN_SELECT} WHERE {where} LIMIT 1", params)))
        return PlanRecord.of(rows[0]) if rows else None

    async def plans(self, cluster: str | None = None, limit: int = 10,
                    states: Iterable[PlanState] | None = None) -> list[PlanRecord]:
        def fn(db: sqlite_utils.Database) -> list[dict[str, Any]]:
            where: list[str] = []
            params: list[Any] = []
            if cluster:
                where.append("plans.cluster = ?")
                params.append(cluster)
            if states is not None:
                st = [str(s) for s in states]
                where.append(f"plans.state IN ({_marks(st)})")
                params += st
            sql = PLAN_SELECT + (" WHERE " + " AND ".join(where) if where else "")
            return list(db.query(sql + " ORDER BY plans.created_at DESC LIMIT ?", [*params, limit]))
        return [PlanRecord.of(r) for r in await self._run(fn)]

    async def add_approval(self, plan_id: str, user: str, needed: int) -> tuple[bool, int, bool]:
        def fn(db: sqlite_utils.Database) -> tuple[bool, int, bool]:
            with _immediate(db):
                state = next(db.query("SELECT state FROM plans WHERE id = ?", [plan_id]), {}).get("state")
                if state != PlanState.PROPOSED:
                    return False, 0, False
                new = db.execute("INSERT OR IGNORE INTO approvals (plan_id, user, at) VALUES (?, ?, ?)",
                                 [plan_id, user, time.time()]).rowcount == 1
                count = next(db.query("SELECT COUNT(*) AS n FROM approvals WHERE plan_id = ?", [plan_id]))["n"]
                won = False
                if new and count >= needed:
                    won = db.execute("UPDATE plans SET state = ?, decided_by = ?, decided_at = ?, updated_at = ? "
                                     "WHERE id = ? AND state = ?",
                                     [PlanState.APPROVED, user, time.time(), time.time(), plan_id,
                                      PlanState.PROPOSED]).rowcount == 1
                return new, count, won
        return await self._run(fn)

    async def transition(self, plan_id: str, from_states: Iterable[PlanState], to_state: PlanState, *,
                         fence: Fence | None = None, **fields: Any) -> bool:
        olds = [str(s) for s in from_states]
        sets = {"state": str(to_state), "updated_at": time.time(), **fields}

        def fn(db: sqlite_utils.Database) -> bool:
            assignments = ", ".join(f"{k} = ?" for k in sets)
            with _fenced(db, fence):
                try:
                    cur = db.execute(f"UPDATE plans SET {assignments} WHERE id = ? AND state IN ({_marks(olds)})",
                                     [*sets.values(), plan_id, *olds])
                except sqlite3.IntegrityError:
                    return False  # another plan of the cluster is open
                return cur.rowcount == 1
        return await self._run(fn)

    async def update_plan(self, plan_id: str, *, fence: Fence | None = None, **fields: Any) -> None:
        sets = {**fields, "updated_at": time.time()}

        def fn(db: sqlite_utils.Database) -> None:
            with _fenced(db, fence):
                if db.execute(f"UPDATE plans SET {', '.join(f'[{k}] = ?' for k in sets)} WHERE id = ?",
                              [*sets.values(), plan_id]).rowcount != 1:
                    raise StoreError(f"database {self.path}: no plan {plan_id}")
        await self._run(fn)

    # -- steps ----------------------------------------------------------

    async def step_started(self, plan_id: str, idx: int, key: str, *, fence: Fence | None = None) -> None:
        def fn(db: sqlite_utils.Database) -> None:
            with _fenced(db, fence, always=True):
                db.execute("INSERT INTO steps (plan_id, idx, key, state, started_at) "
                           "VALUES (?, ?, ?, 'running', ?) "
                           "ON CONFLICT(plan_id, idx) DO UPDATE SET state = 'running', "
                           "started_at = excluded.started_at, finished_at = NULL, error = NULL, "
                           "attempts = attempts + 1", [plan_id, idx, key, time.time()])
                db.execute("UPDATE plans SET current_step = ?, updated_at = ? WHERE id = ?",
                           [idx, time.time(), plan_id])
        await self._run(fn)

    async def step_finished(self, plan_id: str, idx: int, state: str, detail: str = "",
                            error: str | None = None, *, fence: Fence | None = None) -> None:
        def fn(db: sqlite_utils.Database) -> None:
            with _fenced(db, fence):
                db.execute("UPDATE steps SET state = ?, finished_at = ?, detail = ?, error = ? "
                           "WHERE plan_id = ? AND idx = ?", [state, time.time(), detail, error, plan_id, idx])
        await self._run(fn)

    async def steps(self, plan_id: str) -> list[dict[str, Any]]:
        return await self._run(lambda db: list(db.query("SELECT * FROM steps WHERE plan_id = ? ORDER BY idx",
                                                        [plan_id])))

    # -- leases ---------------------------------------------------------
    # The clock is each writer's time.time(): SQLite has no server; the processes sharing
    # a file share a host, hence a clock.

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        def fn(db: sqlite_utils.Database) -> Lease | None:
            with _immediate(db):
                now = time.time()
                row = next(db.query("SELECT * FROM leases WHERE name = ?", [name]), None)
                if row is None:
                    token = 1
                elif row["holder"] == holder and row["expires_at"] > now:
                    token = row["token"]
                elif row["expires_at"] > now:
                    return None
                else:
                    token = row["token"] + 1
                db.execute("INSERT INTO leases (name, holder, token, expires_at) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, token = excluded.token, "
                           "expires_at = excluded.expires_at", [name, holder, token, now + ttl])
                return Lease(name, holder, token, now + ttl)
        return await self._run(fn)

    async def release_lease(self, name: str, holder: str) -> None:
        await self._run(lambda db: db.execute("UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ?",
                                              [name, holder]))

    async def lease(self, name: str) -> Lease | None:
        row = await self._run(lambda db: next(db.query(
            "SELECT * FROM leases WHERE name = ? AND expires_at > ?", [name, time.time()]), None))
        return Lease(row["name"], row["holder"], row["token"], row["expires_at"]) if row else None

    # -- events ---------------------------------------------------------

    async def first_delivery(self, event_id: str) -> bool:
        def fn(db: sqlite_utils.Database) -> bool:
            now = time.time()
            cur = db.execute("INSERT OR IGNORE INTO events (event_id, received_at) VALUES (?, ?)", [event_id, now])
            if now - self._events_swept > 3600:
                db.execute("DELETE FROM events WHERE received_at < ?", [now - 86400])
                self._events_swept = now
            return cur.rowcount == 1
        return await self._run(fn)

    # -- snapshots ------------------------------------------------------

    async def record_snapshot(self, row: dict[str, Any]) -> int:
        return await self._run(lambda db: db["snapshots"].insert(row).last_pk)

    async def snapshots(self, cluster: str, limit: int = 10, include_pruned: bool = False) -> list[dict[str, Any]]:
        pruned = "" if include_pruned else " AND pruned_at IS NULL"
        return await self._run(lambda db: list(db.query(
            f"SELECT * FROM snapshots WHERE cluster = ?{pruned} ORDER BY created_at DESC, id DESC LIMIT ?",
            [cluster, limit])))

    async def last_snapshot_at(self, cluster: str, reason: str) -> float | None:
        return await self._run(lambda db: next(db.query(
            "SELECT MAX(created_at) AS t FROM snapshots WHERE cluster = ? AND reason = ?", [cluster, reason]),
            {"t": None})["t"])

    async def snapshot_for_plan(self, snapshot_id: int, plan_id: str) -> None:
        await self._run(lambda db: db.execute("UPDATE snapshots SET plan_id = ? WHERE id = ? AND plan_id IS NULL",
                                              [plan_id, snapshot_id]))

    async def mark_pruned(self, snapshot_id: int) -> None:
        await self._run(lambda db: db.execute("UPDATE snapshots SET pruned_at = ? WHERE id = ?",
                                              [time.time(), snapshot_id]))

    async def update_snapshot(self, snapshot_id: int, **fields: Any) -> None:
        sets = known_columns(fields, SNAPSHOT_UPDATABLE, "update_snapshot")
        if sets:
            await self._run(lambda db: db.execute(
                f"UPDATE snapshots SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                [*sets.values(), snapshot_id]))

    # -- restore drills ---------------------------------------------------

    async def record_drill(self, row: dict[str, Any]) -> None:
        await self._run(lambda db: db["drills"].insert(row))

    async def last_drills(self, cluster: str) -> dict[int, dict[str, Any]]:
        rows = await self._run(lambda db: list(db.query(
            "SELECT * FROM drills WHERE cluster = ? ORDER BY at, id", [cluster])))
        return {r["snapshot_id"]: r for r in rows}

    async def last_drill_at(self, cluster: str, requested_by: str) -> float | None:
        return await self._run(lambda db: next(db.query(
            "SELECT MAX(at) AS t FROM drills WHERE cluster = ? AND requested_by = ?", [cluster, requested_by]))["t"])

    # -- memberships ----------------------------------------------------

    async def record_membership(self, cluster: str, members: list[dict[str, Any]]) -> None:
        text = membership_text(members)

        def fn(db: sqlite_utils.Database) -> None:
            with _immediate(db):
                last = next(db.query("SELECT id, members FROM memberships WHERE cluster = ? ORDER BY id DESC LIMIT 1",
                                     [cluster]), None)
                if last is not None and last["members"] == text:
                    db.execute("UPDATE memberships SET recorded_at = ? WHERE id = ?", [time.time(), last["id"]])
                else:
                    db.execute("INSERT INTO memberships (cluster, members, recorded_at) VALUES (?, ?, ?)",
                               [cluster, text, time.time()])
        await self._run(fn)

    async def last_membership(self, cluster: str) -> tuple[list[dict[str, Any]], float] | None:
        row = await self._run(lambda db: next(db.query(
            "SELECT members, recorded_at FROM memberships WHERE cluster = ? ORDER BY id DESC LIMIT 1", [cluster]),
            None))
        return (json.loads(row["members"]), row["recorded_at"]) if row else None

    # -- watch: alerts and mutes -------------------------------------------

    async def open_alert(self, row: dict[str, Any]) -> int:
        now = time.time()
        values = known_columns({"state": "open", "opened_at": now, "updated_at": now, **row}, ALERT_COLUMNS,
                               "open_alert")
        return await self._run(lambda db: int(db.execute(
            f"INSERT INTO alerts ({', '.join(values)}) VALUES ({_marks(values)})", list(values.values())).lastrowid))

    async def update_alert(self, alert_id: int, **fields: Any) -> None:
        sets = known_columns({"updated_at": time.time(), **fields}, ALERT_COLUMNS, "update_alert")
        await self._run(lambda db: db.execute(f"UPDATE alerts SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                                              [*sets.values(), alert_id]))

    async def open_alerts(self, cluster: str | None = None) -> list[dict[str, Any]]:
        where, params = ("state = 'open' AND cluster = ?", [cluster]) if cluster else ("state = 'open'", [])
        return await self._run(lambda db: list(db.query(f"SELECT * FROM alerts WHERE {where} ORDER BY id", params)))

    async def prune_alerts(self, resolved_before: float) -> int:
        return await self._run(lambda db: db.execute(
            "DELETE FROM alerts WHERE state = 'resolved' AND resolved_at < ?", [resolved_before]).rowcount)

    async def close_alerts(self, keep: Collection[str], at: float) -> int:
        names = list(keep)
        return await self._run(lambda db: db.execute(
            f"UPDATE alerts SET state = 'resolved', resolved_at = ?, updated_at = ? WHERE state = 'open' "
            f"AND cluster NOT IN ({_marks(names)})", [at, at, *names]).rowcount)

    async def set_mute(self, cluster: str, until: float, reason: str, by: str) -> None:
        await self._run(lambda db: db.execute(
            'INSERT INTO mutes (cluster, "until", reason, "by", at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(cluster) '
            'DO UPDATE SET "until" = excluded."until", reason = excluded.reason, "by" = excluded."by", '
            'at = excluded.at',
            [cluster, until, reason, by, time.time()]))

    async def clear_mute(self, cluster: str) -> bool:
        return await self._run(lambda db: db.execute(
            'DELETE FROM mutes WHERE cluster = ? AND "until" > ?', [cluster, time.time()]).rowcount == 1)

    async def mutes(self) -> list[dict[str, Any]]:
        return await self._run(lambda db: list(db.query(
            'SELECT * FROM mutes WHERE "until" > ? ORDER BY cluster', [time.time()])))

    # -- manual stages --------------------------------------------------

    async def open_stage(self, plan_id: str, key: str, *, fence: Fence | None = None) -> Stage:
        def fn(db: sqlite_utils.Database) -> Stage:
            with _fenced(db, fence, always=True):
                db.execute(f"UPDATE stages SET closed_at = {NOW} WHERE plan_id = ? AND stage != ? "
                           "AND closed_at IS NULL", [plan_id, key])
                db.execute(f"INSERT INTO stages (plan_id, stage, opened_at) VALUES (?, ?, {NOW}) "
                           "ON CONFLICT(plan_id, stage) DO UPDATE SET opened_at = excluded.opened_at, "
                           "closed_at = NULL, confirmed_by = NULL, confirmed_at = NULL", [plan_id, key])
                return Stage.of(next(db.query("SELECT * FROM stages WHERE plan_id = ? AND stage = ?",
                                              [plan_id, key])))
        return await self._run(fn)

    async def close_stage(self, plan_id: str, key: str, *, fence: Fence | None = None) -> Stage | None:
        def fn(db: sqlite_utils.Database) -> Stage | None:
            with _fenced(db, fence, always=True):
                db.execute(f"UPDATE stages SET closed_at = {NOW} WHERE plan_id = ? AND stage = ? "
                           "AND closed_at IS NULL", [plan_id, key])
                row = next(db.query("SELECT * FROM stages WHERE plan_id = ? AND stage = ?", [plan_id, key]), None)
                return Stage.of(row) if row else None
        return await self._run(fn)

    async def stage(self, plan_id: str, key: str) -> Stage | None:
        row = await self._run(lambda db: next(db.query("SELECT * FROM stages WHERE plan_id = ? AND stage = ?",
                                                       [plan_id, key]), None))
        return Stage.of(row) if row else None

    async def confirm_stage(self, plan_id: str, user: str, key: str | None, settle: float) -> StageAnswer:
        def fn(db: sqlite_utils.Database) -> StageAnswer:
            with _immediate(db):
                now = float(db.execute(f"SELECT {NOW}").fetchone()[0])
                stages = [Stage.of(r) for r in db.query("SELECT * FROM stages WHERE plan_id = ?", [plan_id])]
                refused = judge_confirmation(stages, key, now, settle)
                if refused is not None:
                    return refused
                current = max(stages, key=lambda s: s.opened_at)
                db.execute("UPDATE stages SET confirmed_by = ?, confirmed_at = ? WHERE plan_id = ? AND stage = ?",
                           [user, now, plan_id, current.key])
                return StageAnswer(Confirmation.CONFIRMED, replace(current, confirmed_by=user, confirmed_at=now), now)
        return await self._run(fn)

    # -- audit ----------------------------------------------------------

    async def audit(self, action: str, *, user: str = "", channel: str = "", cluster: str = "",
                    detail: dict[str, Any] | None = None) -> int:
        detail_text = audit_detail_text(detail)

        def fn(db: sqlite_utils.Database) -> int:
            with _immediate(db):
                last = next(db.query("SELECT id, hash, key_id FROM audit ORDER BY id DESC LIMIT 1"), None)
                self._check_key(last)
                row: dict[str, Any] = {"id": (last["id"] + 1) if last else 1, "ts": round(time.time(), 6),
                                       "user": user, "channel": channel, "cluster": cluster, "action": action,
                                       "detail": detail_text}
                prev = last["hash"] if last else GENESIS
                db.table("audit").insert({**row, "prev_hash": prev, "hash": audit_hash(prev, row, self._audit_key),
                                          "key_id": self._audit_key_id})
                return int(row["id"])
        return await self._run(fn)

    async def continue_audit_chain(self) -> None:
        tail = await self._run(lambda db: next(db.query("SELECT id, key_id FROM audit ORDER BY id DESC LIMIT 1"),
                                               None))
        self._check_key(tail)
        if self._audit_key and tail is not None and not tail["key_id"]:
            await self.audit("audit_keyed", detail={"unkeyed_rows": tail["id"]})

    def _check_key(self, tail: dict[str, Any] | None) -> None:
        if tail is None or not tail["key_id"] or tail["key_id"] == self._audit_key_id:
            return
        problem = ("no audit key is configured (audit_key_env or audit_key_file)" if not self._audit_key
                   else "the configured audit key is not the one it was written with")
        raise StoreError(f"database {self.path}: the audit chain is keyed with HMAC up to row {tail['id']}, "
                         f"but {problem}")

    async def acted_before(self, action: str, user: str, plan_id: str) -> bool:
        return await self._run(lambda db: next(db.query(
            "SELECT 1 FROM audit WHERE action = ? AND user = ? AND json_extract(detail, '$.plan') = ? LIMIT 1",
            [action, user, plan_id]), None) is not None)

    async def audit_rows(self, since: float | None = None) -> list[dict[str, Any]]:
        return await self._run(lambda db: list(db.query(
            "SELECT * FROM audit WHERE ts >= ? ORDER BY id", [since or 0])))

    async def verify_audit(self) -> tuple[int, str | None]:
        return await self._run(lambda db: AuditVerifier(self._audit_key, self._audit_key_id).result(
            db.query("SELECT * FROM audit ORDER BY id")))

    async def audit_keyed_from(self) -> int | None:
        return await self._run(lambda db: next(db.query("SELECT MIN(id) AS id FROM audit WHERE key_id != ''"))["id"])


@contextmanager
def _immediate(db: sqlite_utils.Database) -> Iterator[None]:
    """A write transaction that takes the lock up front: read-then-write
    (the audit chain's tail) cannot be interleaved by another writer."""
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.conn.execute("ROLLBACK")
        raise
    db.conn.execute("COMMIT")


@contextmanager
def _fenced(db: sqlite_utils.Database, fence: Fence | None, always: bool = False) -> Iterator[None]:
    """With a fence: one transaction that first checks the lease (LeaseLost, nothing
    written, unless still held with the fence's token). Without: as the write was,
    in a transaction when `always` (several statements)."""
    if fence is None:
        if always:
            with db.atomic():
                yield
        else:
            yield
        return
    with _immediate(db):
        held = next(db.query("SELECT 1 FROM leases WHERE name = ? AND holder = ? AND token = ? AND expires_at > ?",
                             [fence.name, fence.holder, fence.token, time.time()]), None)
        if held is None:
            raise LeaseLost(fence)
        yield


def _schema_cookie(db: sqlite_utils.Database) -> int:
    return int(db.execute("PRAGMA schema_version").fetchone()[0])


def _version(db: sqlite_utils.Database) -> int:
    """The last migration applied: 0 for a new file or one of the releases before versioning."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_migrations'").fetchone():
        return 0
    return int(db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])


@cache
def expected_columns(version: int) -> dict[str, list[str]]:
    """Every table of the schema at `version` and its columns, read from SQLite itself
    (0: the releases before versioning, less the columns they added on open)."""
    if version == 0:
        return {t: [c for c in cs if (t, c) not in ADDED_COLUMNS] for t, cs in expected_columns(1).items()
                if t != "schema_migrations"}
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        db = sqlite_utils.Database(conn)
        db.execute(MIGRATIONS_TABLE)
        for migration in MIGRATIONS[:version]:
            migration.apply(db)
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                             "AND name NOT LIKE 'sqlite_%'")]
        return {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        conn.close()


PLAN_SELECT = ("SELECT plans.*, (SELECT group_concat(user) FROM (SELECT user FROM approvals "
               "WHERE approvals.plan_id = plans.id ORDER BY at)) AS approvals FROM plans")


def _marks(values: Iterable[Any]) -> str:
    return ", ".join("?" for _ in values)
