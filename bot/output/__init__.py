"""Printers: one model per answer (model.py: status, members, snapshot, perf, alerts, catalog), rendered as
plain text, the CLI table and JSON (text.py, tables.py), as etcdctl's printers do, and as Block Kit with its
plain-text fallback (blocks.py: Slack's markup, no Slack SDK). Values reach a message only through
bot.domain.mrkdwn (escape, code, mention).

What it may import is the import contracts' business (pyproject.toml, drawn in docs/architecture.md).
"""
