"""Restoring every member from a verified snapshot after a quorum loss: `plan` (the pure planner and the
proposal), `quorum` (the evidence that quorum is lost), `run` (the operation's steps)."""
