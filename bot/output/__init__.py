"""Printers: one model per answer (model.py: status, members, snapshot),
rendered as plain text, the CLI table and JSON (text.py), as etcdctl's
printer.go does; units and tables as etcd's tools print them. Block Kit
(bot/slack/blocks.py) renders the same models.

May import: the etcd layer's data models only.
"""
