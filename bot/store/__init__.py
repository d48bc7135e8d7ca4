"""The bot's state: plans, approvals, steps, events, the snapshots catalog,
leases, alerts and the audit chain. The contract is base.py (`Store`,
`store_for`/`open_store`); sql.py implements it once, over a connection and a
dialect that sqlite.py and postgres.py supply; schema.py holds the tables and
their migrations, written once.

May import: the plan's data shape (`bot.ops.replace.plan`, pure), so the store
returns typed records (`records.py`); `bot.config` (types only); the
database drivers (sqlite3; psycopg, only when PostgreSQL is configured).
"""
