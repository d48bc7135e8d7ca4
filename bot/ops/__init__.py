"""Operations on clusters: each kind of plan as a package (`replace`, `restore`, `defrag`: what it plans,
how it runs), the one plan engine, a plan's life (lifecycle), the snapshot service and drills, launchers,
access and routing, the context every handler gets, and the ports the core reports through (notify.py:
the Notifier and Directory that the Slack edge implements). No Slack here.

What it may import is the import contracts' business (pyproject.toml, drawn in docs/architecture.md).
"""
