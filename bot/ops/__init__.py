"""Operations: planning, the plan engine and its steps, approvals, the snapshot
service, schedule, launcher, access and routing, command parsing.

May import: `bot.etcd`, `bot.store`, `bot.output`, `bot.config`. Never Slack:
it reports through the Notifier port that `bot.slack` implements.
"""
