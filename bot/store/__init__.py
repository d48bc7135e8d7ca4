"""The bot's state: plans, approvals, stages, steps, events, the snapshots catalog, drills, memberships,
leases, alerts, mutes and the audit chain. The contract is base.py (`Store`); sql.py implements it once,
over a connection and a dialect that sqlite.py and postgres.py supply; schema.py holds the tables and their
migrations, written once; backends.py opens the configured one. Leases run on the database's clock.

What it may import is the import contracts' business (pyproject.toml, drawn in docs/architecture.md).
"""
