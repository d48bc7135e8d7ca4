"""The watch: the bot notices first. Per cluster, a background loop runs the
health fan-out every `[clusters.watch] interval`, decides which conditions are
open (conditions.py: pure functions of one round's facts), applies grace and
flapping (tracker.py, pure), and posts one message per open condition to the
cluster's channels, edits it while the condition lasts and replies in its
thread when it clears (watcher.py). How to add a condition or a probe: see
conditions.py's docstring.

May import: `bot.ops` (the context, the Notifier port, metrics), `bot.etcd`,
`bot.store`, `bot.output`, `bot.config`. Never `bot.slack`, slack_sdk,
slack_bolt or aiohttp (tests/test_layers.py checks this); conditions.py and
tracker.py import no gRPC either.
"""
