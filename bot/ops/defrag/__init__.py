"""Rolling defragmentation (and NOSPACE recovery): `rule` (which members), `plan` (the pure planner and the
proposal), `run` (the operation's steps)."""
