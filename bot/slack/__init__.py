"""The Slack edge, engine side: the bolt app and its transports (Socket Mode, HTTP), the Web API client with
its retry rules, the Notifier and Directory ports implemented with Slack (chat.postMessage, chat.update,
threads, ephemeral messages, users and user groups), the readiness probe.

What it may import is the import contracts' business (pyproject.toml, drawn in docs/architecture.md).
"""
