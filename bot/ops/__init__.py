"""Operations: planning, the plan engine and its steps, approvals, the snapshot
service, schedule, launcher, access and routing, command parsing.

May import: `bot.etcd`, `bot.store`, `bot.output`, `bot.backup`, `bot.config`. Never
`bot.slack`, slack_sdk, slack_bolt or aiohttp: it reports through the Notifier port (`notify.py`) that
`bot.slack.notifier` implements, and asks the Directory port for user groups
(tests/test_layers.py checks this).
"""
