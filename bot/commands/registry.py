"""The command registry: a command is declared once, on its handler (like bolt's `@app.command` or errbot's
`@botcmd`), with its grammar (name, arguments, usage, summary), the role it needs and whether it names a
cluster or a plan. The parser, the help, the role check and the pipeline all read this one table."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bot.commands.grammar import Spec
from bot.ops.access import Role
from bot.ops.context import BotContext
from bot.ops.outcome import Outcome

# (ctx, command, cluster, user, channel) -> what the person sees. `cluster` is the ClusterConfig the command
# was routed to when it names one, else None (the plan it names decides); Any lets each handler say which.
Work = Callable[[BotContext, Any, Any, str, str], Awaitable[Outcome]]


@dataclass(frozen=True)
class CommandDef:
    spec: Spec
    role: Role | None           # None: checked against the plan instead (its proposer or an approver)
    work: Work | None           # None: answered by the pipeline itself, without I/O (help)
    names_plan: bool = False    # the command names a plan, whose cluster decides (cancel, resume, ...)


COMMANDS: dict[str, CommandDef] = {}


def command(name: str, positionals: tuple[str, ...] = (), options: tuple[str, ...] = (),
            flags: tuple[str, ...] = (), *, summary: str, role: Role | None, names_plan: bool = False,
            urls: tuple[str, ...] = (), rest: bool = False,
            durations: tuple[str, ...] = ()) -> Callable[[Work], Work]:
    """Declare `/etcd <name>` on its handler. A handler may carry several (status and members)."""
    spec = Spec(name, positionals, options, flags, summary=summary, urls=urls, rest=rest, durations=durations)

    def add(work: Work) -> Work:
        if name in COMMANDS:
            raise ValueError(f"/etcd {name} is declared twice")
        COMMANDS[name] = CommandDef(spec, role, work, names_plan)
        return work
    return add


def specs() -> dict[str, Spec]:
    return {name: c.spec for name, c in COMMANDS.items()}


COMMANDS["help"] = CommandDef(Spec("help", summary="this help"), None, None)
