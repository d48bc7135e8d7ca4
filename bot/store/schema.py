"""The tables, written once: versioned migrations whose DDL each dialect renders
($REAL, $BIGINT, $ID, $CHAIN_ID: its type names and autoincrement, dialect.py).
A released migration is never edited (each database keeps the schema its
versions produced; tests/store_schemas/ holds them as released); a change is a
new migration at the end."""
from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from string import Template

from bot.domain.plan import OPEN_STATES
from bot.store.dialect import SQLITE, Dialect

# Version 1: the schema of the releases before versioned migrations (with the columns they
# added on open); it creates only what is missing, so such a SQLite file is adopted as it is.
BASELINE = """
CREATE TABLE IF NOT EXISTS plans (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL DEFAULT 'replace',  -- a PlanKind
    cluster TEXT NOT NULL,
    state TEXT NOT NULL,           -- a PlanState
    channel TEXT NOT NULL,
    message_ts TEXT,
    proposer TEXT NOT NULL,
    created_at $REAL NOT NULL,
    expires_at $REAL NOT NULL,
    fingerprint TEXT NOT NULL,
    plan TEXT NOT NULL,            -- the Plan as JSON
    current_step INTEGER NOT NULL DEFAULT 0,
    decided_by TEXT,
    decided_at $REAL,
    finished_at $REAL,
    error TEXT,
    new_member_id TEXT,
    updated_at $REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_open_plan_per_cluster ON plans(cluster)
    WHERE state IN ($OPEN_STATES);
CREATE TABLE IF NOT EXISTS approvals (
    plan_id TEXT NOT NULL,
    "user" TEXT NOT NULL,
    at $REAL NOT NULL,
    PRIMARY KEY (plan_id, "user")  -- each approver counts once
);
CREATE TABLE IF NOT EXISTS steps (
    plan_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    key TEXT NOT NULL,
    state TEXT NOT NULL,           -- running | done | failed
    started_at $REAL NOT NULL,
    finished_at $REAL,
    detail TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (plan_id, idx)
);
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    received_at $REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id $ID,
    cluster TEXT NOT NULL,
    path TEXT NOT NULL,
    member TEXT NOT NULL,
    revision $BIGINT NOT NULL,
    hash TEXT NOT NULL,
    total_keys $BIGINT NOT NULL,
    live_keys $BIGINT,
    total_size $BIGINT NOT NULL,
    file_size $BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    encrypted INTEGER NOT NULL DEFAULT 0,
    requested_by TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    duration $REAL NOT NULL,
    created_at $REAL NOT NULL,
    pruned_at $REAL,
    plan_id TEXT                   -- the plan this is the pre-change snapshot of (retention keeps it)
);
CREATE INDEX IF NOT EXISTS snapshots_by_cluster ON snapshots(cluster, created_at);
CREATE TABLE IF NOT EXISTS probe (
    id INTEGER PRIMARY KEY,
    at $REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id $CHAIN_ID,                  -- gap-free: the writer holding the audit lock takes the tail's + 1
    ts $REAL NOT NULL,
    "user" TEXT NOT NULL,
    channel TEXT NOT NULL,
    cluster TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,          -- JSON as hashed (text, not jsonb: the hash covers these bytes)
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    key_id TEXT NOT NULL DEFAULT ''  -- '' : hash is a sha256; else: an HMAC-SHA256 with the key of this id
);
CREATE TABLE IF NOT EXISTS memberships (
    id $ID,
    cluster TEXT NOT NULL,
    members TEXT NOT NULL,         -- JSON: [{id, name, peer_urls, client_urls, is_learner}]
    recorded_at $REAL NOT NULL     -- the last time the bot saw exactly this membership
);
CREATE INDEX IF NOT EXISTS memberships_by_cluster ON memberships(cluster, id);
CREATE TABLE IF NOT EXISTS drills (
    id $ID,
    cluster TEXT NOT NULL,
    snapshot_id $BIGINT NOT NULL,  -- snapshots.id
    ok INTEGER NOT NULL,
    detail TEXT NOT NULL,          -- what the restored etcd showed, or why the drill failed
    seconds $REAL NOT NULL,
    at $REAL NOT NULL,
    requested_by TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS drills_by_cluster ON drills(cluster, at);
"""

LEASES_ALERTS_MUTES = """
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token $BIGINT NOT NULL,        -- one per tenure; fenced writes compare it
    expires_at $REAL NOT NULL      -- the database's clock (dialect.py: now)
);
CREATE TABLE alerts (
    id $ID,
    cluster TEXT NOT NULL,
    condition TEXT NOT NULL,
    subject TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,           -- open | resolved
    opened_at $REAL NOT NULL,
    updated_at $REAL NOT NULL,
    resolved_at $REAL,
    channel TEXT,
    message_ts TEXT,
    detail TEXT,
    flaps INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX alerts_open ON alerts(state, cluster);
CREATE TABLE mutes (
    cluster TEXT PRIMARY KEY,
    "until" $REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    "by" TEXT NOT NULL DEFAULT '',
    at $REAL NOT NULL
);
ALTER TABLE snapshots ADD COLUMN remote_url TEXT;
ALTER TABLE snapshots ADD COLUMN remote_state TEXT NOT NULL DEFAULT '';  -- '' | uploading | verified | failed
ALTER TABLE snapshots ADD COLUMN remote_error TEXT;
ALTER TABLE snapshots ADD COLUMN remote_verified_at $REAL;
ALTER TABLE snapshots ADD COLUMN remote_pruned_at $REAL;
"""

STAGES = """
CREATE TABLE stages (
    plan_id TEXT NOT NULL,
    stage TEXT NOT NULL,           -- readable: the step it belongs to (stop, restore, start)
    opened_at $REAL NOT NULL,      -- the database's clock (dialect.py: now), as every time in this table
    closed_at $REAL,               -- the wait ended
    confirmed_by TEXT,             -- the approver whose /etcd continue confirmed it
    confirmed_at $REAL,
    PRIMARY KEY (plan_id, stage)
);
"""

OUTBOX = """
CREATE TABLE outbox (
    id $ID,
    at $REAL NOT NULL,             -- when it happened
    channel TEXT NOT NULL,
    plan_id TEXT,                  -- a note in the plan's thread; NULL: a message in the channel
    text TEXT NOT NULL,            -- mrkdwn, every value escaped already
    posted_at $REAL                -- NULL until a replica posted it
);
"""

RECEIVED_ALERTS = """
CREATE TABLE received_alerts (
    cluster TEXT NOT NULL,
    fingerprint TEXT NOT NULL,     -- Alertmanager's: the alert's name and labels
    alertname TEXT NOT NULL,
    status TEXT NOT NULL,          -- firing | resolved: the newest state received
    starts_at $REAL NOT NULL,      -- the episode (a new one starts later): what a redelivery repeats
    ends_at $REAL,
    labels TEXT NOT NULL,          -- JSON
    annotations TEXT NOT NULL,     -- JSON
    received_at $REAL NOT NULL,
    PRIMARY KEY (cluster, fingerprint)
);
CREATE INDEX received_alerts_firing ON received_alerts(cluster, status);
"""

MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                    "applied_at $REAL NOT NULL)")


@dataclass(frozen=True)
class Migration:
    """One change of the schema, its DDL written once for every dialect."""

    version: int
    name: str
    ddl: str
    # Columns to add where a table lacks them (those the releases before versioning added on open).
    add_missing: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # Statements of one dialect only: each released schema is kept as it was.
    only: Mapping[str, str] = field(default_factory=dict)

    def statements(self, dialect: Dialect) -> list[str]:
        return statements(render(self.ddl + self.only.get(dialect.name, ""), dialect))


@dataclass(frozen=True)
class AppliedMigration:
    """A row of the migrations record: a migration applied to this database, and when."""

    version: int
    name: str
    applied_at: float


ADDED_COLUMNS = {("snapshots", "plan_id"): "TEXT", ("audit", "key_id"): "TEXT NOT NULL DEFAULT ''",
                 ("plans", "kind"): "TEXT NOT NULL DEFAULT 'replace'"}

# In order; a released migration is never edited, a change is a new one at the end.
MIGRATIONS = (
    Migration(1, "plans, approvals, steps, events, snapshots, audit, memberships, drills", BASELINE,
              add_missing=ADDED_COLUMNS,
              only={"postgresql": "CREATE INDEX plans_by_message ON plans(channel, message_ts);\n"}),
    Migration(2, "leases, alerts, mutes; snapshots' off-site copy", LEASES_ALERTS_MUTES),
    Migration(3, "stages: the manual stage a plan waits on, and who confirmed it", STAGES),
    Migration(4, "outbox: what was done from a shell while Slack was down, to post once it answers", OUTBOX),
    Migration(5, "received_alerts: the newest state of each alert Alertmanager sent", RECEIVED_ALERTS),
)
LATEST = MIGRATIONS[-1].version


def render(ddl: str, dialect: Dialect) -> str:
    return Template(ddl).substitute(dialect.types, OPEN_STATES=", ".join(f"'{s}'" for s in OPEN_STATES))


def statements(script: str) -> list[str]:
    """A script as single statements (SQLite's tokenizer: it knows comments and quotes)."""
    out, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            out.append(buffer.strip())
            buffer = ""
    assert not buffer.strip(), f"incomplete statement: {buffer!r}"
    return out


@cache
def expected_columns(version: int) -> dict[str, list[str]]:
    """Every table of the schema at `version` and its columns, in order, read from SQLite
    itself (0: the releases before versioning, less the columns they added on open)."""
    if version == 0:
        return {t: [c for c in cs if (t, c) not in ADDED_COLUMNS] for t, cs in expected_columns(1).items()
                if t != "schema_migrations"}
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for statement in [render(MIGRATIONS_TABLE, SQLITE), *(s for m in MIGRATIONS[:version]
                                                             for s in m.statements(SQLITE))]:
            conn.execute(statement)
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                             "AND name NOT LIKE 'sqlite_%'")]
        return {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        conn.close()


def mismatch(have: Mapping[str, set[str]], version: int) -> str | None:
    """Why the tables `have` (name: columns) are not ours at `version`: the first of our
    tables present without a column of that version; None when each one present has them all."""
    for table, columns in expected_columns(version).items():
        missing = [c for c in columns if table in have and c not in have[table]]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            return f"table {table} does not match this version of the bot (no column {shown})"
    return None
