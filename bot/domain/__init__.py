"""The domain: what etcd-chatops reasons about, as plain values and pure functions (members and their
health, plans and their states and kinds, snapshots, the quorum evidence, the errors they raise), with
mrkdwn escaping and shell quoting as leaves anyone may use. At the bottom: it imports nothing of ours and
loads without gRPC, Slack or a database.

What it may import is the import contracts' business (pyproject.toml, drawn in docs/architecture.md).
"""
