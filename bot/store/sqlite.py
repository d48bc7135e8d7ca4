"""The bot's memory in SQLite (through sqlite-utils): plans, their steps,
seen Slack events, snapshots and a hash-chained audit log.

All SQL runs on one dedicated thread: the event loop never waits on the
disk, writes are serialized, and the guarded state transitions (one UPDATE
with the old state in its WHERE) are the only way a plan changes state, so
two approvals racing execute once.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import sqlite_utils

T = TypeVar("T")

OPEN_STATES = ("proposed", "approved", "running", "interrupted")
GENESIS = "0" * 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (
    id TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    state TEXT NOT NULL,
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
    WHERE state IN ('proposed', 'approved', 'running', 'interrupted');
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
    pruned_at REAL
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
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS memberships (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    members TEXT NOT NULL,         -- JSON: [{id, name, peer_urls, client_urls, is_learner}]
    recorded_at REAL NOT NULL      -- the last time the bot saw exactly this membership
);
CREATE INDEX IF NOT EXISTS memberships_by_cluster ON memberships(cluster, id);
"""


class StoreError(Exception):
    """The database could not do what was asked; one line saying why."""


class StoreBusy(StoreError):
    """Another writer holds the database lock beyond our bounded wait."""


class OpenPlanExists(StoreError):
    def __init__(self, plan_id: str, state: str):
        super().__init__(f"plan {plan_id} is {state}")
        self.plan_id, self.state = plan_id, state


def audit_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """sha256 over the previous row's hash and this row's content."""
    content = json.dumps([row["id"], row["ts"], row["user"], row["channel"], row["cluster"], row["action"],
                          row["detail"]], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{prev_hash}\n{content}".encode()).hexdigest()


class Store:
    """Async facade; every method runs its SQL on the store's own thread."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0, retries: int = 3):
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.retries = retries
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._db: sqlite_utils.Database | None = None
        self._events_swept = 0.0

    # -- plumbing -------------------------------------------------------

    async def open(self) -> "Store":
        await self._run(self._open)
        return self

    def _open(self, _db=None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        db = sqlite_utils.Database(conn)
        db.enable_wal()
        conn.execute("PRAGMA synchronous = FULL")  # a step's outcome is on disk before the next step
        db.executescript(SCHEMA)
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._run(lambda db: db.conn.close())
            self._db = None
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        for attempt in range(self.retries):
            try:
                return await loop.run_in_executor(self._executor, self._call, fn, args)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise StoreError(f"database {self.path}: {e}") from None
                if attempt == self.retries - 1:
                    raise StoreBusy(f"database {self.path} is locked by another writer "
                                    f"(waited {self.busy_timeout * self.retries:g}s); nothing was changed") from None
        raise AssertionError("unreachable")

    def _call(self, fn: Callable[..., T], args: tuple) -> T:
        if self._db is None and fn != self._open:
            raise StoreError(f"database {self.path} is not open")
        return fn(self._db, *args)

    async def probe(self) -> None:
        """A real write, for the readiness check: raises when the disk or lock refuses."""
        await self._run(lambda db: db.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", [time.time()]))

    async def plan_counts(self) -> dict[str, int]:
        return await self._run(lambda db: {r["state"]: r["n"] for r in db.query(
            "SELECT state, COUNT(*) AS n FROM plans GROUP BY state")})

    # -- plans ----------------------------------------------------------

    async def insert_plan(self, row: dict[str, Any]) -> None:
        """Insert a proposed plan; OpenPlanExists if the cluster has one open."""
        def fn(db: sqlite_utils.Database) -> None:
            try:
                with db.atomic():
                    db["plans"].insert({**row, "updated_at": time.time()})
            except sqlite3.IntegrityError:
                open_plan = next(db.query(
                    f"SELECT id, state FROM plans WHERE cluster = ? AND state IN ({_marks(OPEN_STATES)})",
                    [row["cluster"], *OPEN_STATES]), None)
                if open_plan is None:
                    raise
                raise OpenPlanExists(open_plan["id"], open_plan["state"]) from None
        await self._run(fn)

    async def plan(self, plan_id: str) -> dict[str, Any] | None:
        return await self._run(lambda db: next(db.query("SELECT * FROM plans WHERE id = ?", [plan_id]), None))

    async def plan_by_message(self, channel: str, ts: str) -> dict[str, Any] | None:
        return await self._run(lambda db: next(db.query(
            "SELECT * FROM plans WHERE channel = ? AND message_ts = ?", [channel, ts]), None))

    async def open_plan(self, cluster: str) -> dict[str, Any] | None:
        return await self._run(lambda db: next(db.query(
            f"SELECT * FROM plans WHERE cluster = ? AND state IN ({_marks(OPEN_STATES)})", [cluster, *OPEN_STATES]), None))

    async def plans(self, cluster: str | None = None, limit: int = 10, states: Iterable[str] | None = None) -> list[dict[str, Any]]:
        def fn(db: sqlite_utils.Database) -> list[dict[str, Any]]:
            where, params = [], []
            if cluster:
                where.append("cluster = ?")
                params.append(cluster)
            if states is not None:
                st = list(states)
                where.append(f"state IN ({_marks(st)})")
                params += st
            sql = "SELECT * FROM plans" + (" WHERE " + " AND ".join(where) if where else "")
            return list(db.query(sql + " ORDER BY created_at DESC LIMIT ?", [*params, limit]))
        return await self._run(fn)

    async def transition(self, plan_id: str, from_states: Iterable[str], to_state: str, **fields: Any) -> bool:
        """The guarded state change: True only for the one caller that made it."""
        olds = list(from_states)
        sets = {"state": to_state, "updated_at": time.time(), **fields}

        def fn(db: sqlite_utils.Database) -> bool:
            assignments = ", ".join(f"{k} = ?" for k in sets)
            try:
                cur = db.execute(f"UPDATE plans SET {assignments} WHERE id = ? AND state IN ({_marks(olds)})",
                                 [*sets.values(), plan_id, *olds])
            except sqlite3.IntegrityError:
                return False  # another plan of the cluster is open
            return cur.rowcount == 1
        return await self._run(fn)

    async def update_plan(self, plan_id: str, **fields: Any) -> None:
        await self._run(lambda db: db["plans"].update(plan_id, {**fields, "updated_at": time.time()}))

    # -- steps ----------------------------------------------------------

    async def step_started(self, plan_id: str, idx: int, key: str) -> None:
        def fn(db: sqlite_utils.Database) -> None:
            with db.atomic():
                db.execute("INSERT INTO steps (plan_id, idx, key, state, started_at) VALUES (?, ?, ?, 'running', ?) "
                           "ON CONFLICT(plan_id, idx) DO UPDATE SET state = 'running', started_at = excluded.started_at, "
                           "finished_at = NULL, error = NULL, attempts = attempts + 1", [plan_id, idx, key, time.time()])
                db.execute("UPDATE plans SET current_step = ?, updated_at = ? WHERE id = ?", [idx, time.time(), plan_id])
        await self._run(fn)

    async def step_finished(self, plan_id: str, idx: int, state: str, detail: str = "", error: str | None = None) -> None:
        await self._run(lambda db: db.execute(
            "UPDATE steps SET state = ?, finished_at = ?, detail = ?, error = ? WHERE plan_id = ? AND idx = ?",
            [state, time.time(), detail, error, plan_id, idx]))

    async def steps(self, plan_id: str) -> list[dict[str, Any]]:
        return await self._run(lambda db: list(db.query("SELECT * FROM steps WHERE plan_id = ? ORDER BY idx", [plan_id])))

    # -- events ---------------------------------------------------------

    async def first_delivery(self, event_id: str) -> bool:
        """True the first time an event ID is seen (Slack redelivers within minutes;
        IDs older than a day are forgotten, at most one sweep an hour)."""
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
            f"SELECT * FROM snapshots WHERE cluster = ?{pruned} ORDER BY created_at DESC, id DESC LIMIT ?", [cluster, limit])))

    async def last_snapshot_at(self, cluster: str, reason: str) -> float | None:
        return await self._run(lambda db: next(db.query(
            "SELECT MAX(created_at) AS t FROM snapshots WHERE cluster = ? AND reason = ?", [cluster, reason]), {}).get("t"))

    async def mark_pruned(self, snapshot_id: int) -> None:
        await self._run(lambda db: db.execute("UPDATE snapshots SET pruned_at = ? WHERE id = ?", [time.time(), snapshot_id]))

    # -- memberships ----------------------------------------------------

    async def record_membership(self, cluster: str, members: list[dict[str, Any]]) -> None:
        """The membership a status or plan check saw: a new row when it changed,
        else the last row's time moves on (one row per change, not per check)."""
        text = json.dumps(sorted(members, key=lambda m: (m["name"], m["id"])), sort_keys=True, separators=(",", ":"))

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
        """The last membership the bot recorded for `cluster` and when it last saw it."""
        row = await self._run(lambda db: next(db.query(
            "SELECT members, recorded_at FROM memberships WHERE cluster = ? ORDER BY id DESC LIMIT 1", [cluster]), None))
        return (json.loads(row["members"]), row["recorded_at"]) if row else None

    # -- audit ----------------------------------------------------------

    async def audit(self, action: str, *, user: str = "", channel: str = "", cluster: str = "",
                    detail: dict[str, Any] | None = None) -> int:
        """Append one row to the hash chain (atomically with reading its tail)."""
        detail_text = json.dumps(detail or {}, sort_keys=True, separators=(",", ":"), default=str)

        def fn(db: sqlite_utils.Database) -> int:
            with _immediate(db):
                last = next(db.query("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1"), None)
                row = {"id": (last["id"] + 1) if last else 1, "ts": round(time.time(), 6), "user": user,
                       "channel": channel, "cluster": cluster, "action": action, "detail": detail_text}
                prev = last["hash"] if last else GENESIS
                db["audit"].insert({**row, "prev_hash": prev, "hash": audit_hash(prev, row)})
                return row["id"]
        return await self._run(fn)

    async def audit_rows(self, since: float | None = None) -> list[dict[str, Any]]:
        return await self._run(lambda db: list(db.query(
            "SELECT * FROM audit WHERE ts >= ? ORDER BY id", [since or 0])))

    async def verify_audit(self) -> tuple[int, str | None]:
        """(rows checked, None) when the chain holds, else the first problem."""
        def fn(db: sqlite_utils.Database) -> tuple[int, str | None]:
            prev, expected_id, n = GENESIS, 1, 0
            for row in db.query("SELECT * FROM audit ORDER BY id"):
                n += 1
                if row["id"] != expected_id:
                    return n, f"row {expected_id} is missing (next is {row['id']})"
                if row["prev_hash"] != prev:
                    return n, f"row {row['id']}: previous hash does not match row {row['id'] - 1}"
                if audit_hash(prev, row) != row["hash"]:
                    return n, f"row {row['id']}: content does not match its hash (changed after it was written)"
                prev, expected_id = row["hash"], expected_id + 1
            return n, None
        return await self._run(fn)


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


def _marks(values: Iterable[Any]) -> str:
    return ", ".join("?" for _ in values)
