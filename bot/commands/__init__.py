"""The `/etcd` commands, each declared once on its handler (`registry`), in families as etcdctl groups its
commands: reading a cluster (`cluster`), plans (`plans`), snapshots (`snapshots`), alerts (`alerts`).
Handlers return what to show (bot.ops.outcome), never Slack calls, so any edge runs them through
`pipeline`. `table` imports every family: the registry whole, and the parser over it."""
