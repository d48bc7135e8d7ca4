"""Every command, registered: importing this module imports each family, so the registry is whole, and
`parse` and `general_usage` read it. A test checks that every command is declared and handled."""
from __future__ import annotations

from bot.commands import alerts, cluster, grammar, menu, plans, snapshots  # noqa: F401  (each registers its commands)
from bot.commands.grammar import Command
from bot.commands.registry import COMMANDS, specs

__all__ = ["COMMANDS", "Command", "general_usage", "parse"]


def parse(text: str) -> Command:
    """The text after `/etcd`, by the registry's grammar; UsageError with the reason and the usage."""
    return grammar.parse(text, specs())


def general_usage() -> str:
    return grammar.general_usage(specs())
