"""The bot's state: plans, approvals, steps, events, the snapshots catalog and
the audit chain.

May import: the plan's data shape (`bot.ops.replace`, pure), so the store
returns typed records (`records.py`); nothing else of ours.
"""
