"""The etcd layer: the async client over aetcd's gRPC stubs (deadlines, TLS, auth,
fail-over), the health fan-out and quorum math, the snapshot stream and the
bbolt reader, URLs.

May import: nothing of ours but `bot.output` (units and tables for etcdutl's
table). `model`, `race`, `health`, `bbolt` and `urls` are pure: no gRPC.
"""
