"""Replacing a failed member: `plan` (the pure planner and the proposal), `run` (the operation's steps)."""
