-- The SQLite schema as released: every statement the releases' code ran to create a
-- database, by version, verbatim (bot/store/sqlite.py before the store was written once).
-- tests/test_store_contract.py builds databases from it and opens them with today's code.
-- Never edit a section; a released migration adds one.

-- the migrations record
CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL);

-- version 1: plans, approvals, steps, events, snapshots, audit, memberships, drills
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
    WHERE state IN ('proposed', 'approved', 'running', 'interrupted');
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

-- version 2: leases, alerts, mutes; snapshots' off-site copy
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

-- version 3: stages: the manual stage a plan waits on, and who confirmed it
CREATE TABLE stages (
    plan_id TEXT NOT NULL,
    stage TEXT NOT NULL,           -- readable: the step it belongs to (stop, restore, start)
    opened_at REAL NOT NULL,       -- SQLite's own clock (NOW), as every time in this table
    closed_at REAL,                -- the wait ended
    confirmed_by TEXT,             -- the approver whose /etcd continue confirmed it
    confirmed_at REAL,
    PRIMARY KEY (plan_id, stage)
);

-- version 4: outbox: what was done from a shell while Slack was down, to post once it answers
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,             -- when it happened
    channel TEXT NOT NULL,
    plan_id TEXT,                  -- a note in the plan's thread; NULL: a message in the channel
    text TEXT NOT NULL,            -- mrkdwn, every value escaped already
    posted_at REAL                -- NULL until a replica posted it
);

-- version 5: received_alerts: the newest state of each alert Alertmanager sent
CREATE TABLE received_alerts (
    cluster TEXT NOT NULL,
    fingerprint TEXT NOT NULL,     -- Alertmanager's: the alert's name and labels
    alertname TEXT NOT NULL,
    status TEXT NOT NULL,          -- firing | resolved: the newest state received
    starts_at REAL NOT NULL,      -- the episode (a new one starts later): what a redelivery repeats
    ends_at REAL,
    labels TEXT NOT NULL,          -- JSON
    annotations TEXT NOT NULL,     -- JSON
    received_at REAL NOT NULL,
    PRIMARY KEY (cluster, fingerprint)
);
CREATE INDEX received_alerts_firing ON received_alerts(cluster, status);
