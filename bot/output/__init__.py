"""Printers: one model per answer (model.py: status, members, snapshot),
rendered as plain text, the CLI table and JSON (text.py), as etcdctl's
printer.go does, and as Block Kit with its plain-text fallback (blocks.py:
Slack's markup, but no Slack SDK); units and tables as etcd's tools print
them. `escape()`, `code()` and `mention()` in blocks.py are the only way a
value or a mention reaches a message.

May import: the data models below it: bot.etcd's values, the planner's Plan
(bot.ops.replace.plan) and the store's records. No gRPC client, no Slack SDK.
"""
