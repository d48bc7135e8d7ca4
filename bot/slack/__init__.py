"""The Slack edge: the bolt app and its transports (Socket Mode, HTTP), the
Web API client, Block Kit rendering, the readiness probe.

May import: `bot.ops`, `bot.output`, `bot.etcd`, `bot.store`, `bot.config`.
"""
