"""Talking to etcd: the async client over aetcd's gRPC stubs (deadlines, TLS, auth, fail-over), the health
fan-out, a member's /metrics, HashKV agreement, the snapshot stream, the bbolt reader of snapshot files, and
where the etcd binaries are. `health`, `bbolt` and `member_metrics` load without gRPC.

What it may import is the import contracts' business (pyproject.toml, drawn in docs/architecture.md).
"""
