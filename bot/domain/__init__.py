"""The domain: what etcd-chatops reasons about, as plain values and pure functions (members and their
health, plans and their states and kinds, snapshots, alerts, the errors they raise, mrkdwn escaping).

At the bottom of the package graph: it imports nothing of ours, loads without gRPC, Slack or a database,
and every other layer builds on it (the import contracts in pyproject.toml).
"""
