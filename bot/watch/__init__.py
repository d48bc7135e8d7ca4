"""The watch: the bot notices first. Per cluster, a loop runs the health fan-out every
`[clusters.watch] interval`, decides which conditions are open (conditions.py: pure functions of one
round's facts), applies grace and flapping (tracker.py, pure), and posts one message per open condition,
edits it while the condition lasts and replies in its thread when it clears (watcher.py). How to add a
condition or a probe: see conditions.py's docstring.

What it may import is the import contracts' business (pyproject.toml, drawn in docs/architecture.md).
"""
