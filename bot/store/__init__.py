"""The bot's state: plans, approvals, steps, events, the snapshots catalog,
leases, alerts and the audit chain. The contract is base.py (`Store`,
`store_for`/`open_store`); sqlite.py and postgres.py implement it.

May import: the plan's data shape (`bot.ops.replace`, pure), so the store
returns typed records (`records.py`); `bot.config` (types only); the
database drivers (sqlite-utils; psycopg, only when PostgreSQL is configured).
"""
