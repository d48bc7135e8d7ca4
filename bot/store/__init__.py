"""The bot's state: plans, approvals, steps, events, the snapshots catalog and
the audit chain.

May import: nothing of ours.
"""
