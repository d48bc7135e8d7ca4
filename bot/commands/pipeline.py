"""`/etcd <subcommand>`, whatever carried it: one pipeline for every command: parse, route,
authorize, audit, run.

Parsing and routing need no I/O, so bad input is answered in the
acknowledgement itself (Slack shows it only to the person who typed it);
the rest runs after the ack, and its answer is a channel message, or an
ephemeral one for refusals. The pipeline ends in an `Answer`; `conclude`
is the one place commands are counted and refusals audited. The Slack
listener (handlers/slash.py) only translates: a request into an
`Invocation`, an answer into Slack calls.

The audit rule: a command whose audit row cannot be written does not run
(the person is told the state store is unavailable); a refusal is audited
quietly (if the row cannot be written, the log keeps it), because the
refusal itself changes nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any

from bot.commands.grammar import Command, UsageError
from bot.commands.table import COMMANDS, general_usage, parse
from bot.config import ClusterConfig
from bot.domain.mrkdwn import Mrkdwn
from bot.ops.context import BotContext
from bot.ops.outcome import Outcome
from bot.ops.routing import RoutingError, resolve_cluster
from bot.output import blocks
from bot.store.base import StoreError

log = logging.getLogger(__name__)


class Result(Enum):
    """How a command ended, as the metrics count it."""

    OK = "ok"
    USAGE_ERROR = "usage_error"
    REFUSED = "refused"
    ERROR = "error"


@dataclass(frozen=True)
class Invocation:
    """One `/etcd` as Slack delivered it."""

    text: str
    user: str
    channel: str


@dataclass(frozen=True)
class Routed:
    """A parsed command and its cluster (None: the plan it names decides, as for cancel and resume)."""

    cmd: Command
    cluster: ClusterConfig | None


@dataclass(frozen=True)
class AuditNote:
    """A refusal to keep in the audit log."""

    action: str
    cluster: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class Answer:
    """How one command ended: what the person sees, how it counts, and what the audit keeps."""

    command: str               # the metrics label ("invalid" when it did not parse)
    result: Result
    outcome: Outcome
    refusal: AuditNote | None = None


def admit(ctx: BotContext, inv: Invocation) -> Routed | Answer:
    """Parse and route. No I/O: an answer here is given in the acknowledgement."""
    try:
        cmd = parse(inv.text)
    except UsageError as e:
        return Answer("invalid", Result.USAGE_ERROR, Outcome(ephemeral=blocks.error_reply(e.reason, e.usage)),
                       AuditNote("usage_error", "", {"text": inv.text, "reason": e.reason}))
    if cmd.name == "menu" and not inv.text.strip() and not ctx.config.clusters_for_channel(inv.channel):
        cmd = Command(COMMANDS["help"].spec)   # `/etcd` alone where no cluster is bound: what there is to know
    if cmd.name == "help":
        topic = cmd.args.get("topic")
        usage = f"`{COMMANDS[topic].spec.usage}`" if topic else general_usage()
        bound = [c.name for c in ctx.config.clusters_for_channel(inv.channel)]
        return Answer("help", Result.OK, Outcome(ephemeral=blocks.help_reply(usage, bound)))
    try:
        if not COMMANDS[cmd.name].names_plan:
            return Routed(cmd, resolve_cluster(ctx.config, inv.channel, cmd.cluster))
        if not ctx.config.clusters_for_channel(inv.channel):
            raise RoutingError("this channel is not bound to any etcd cluster")
    except RoutingError as e:
        return Answer(cmd.name, Result.REFUSED, Outcome(ephemeral=blocks.error_reply(str(e), cmd.spec.usage)),
                       AuditNote("refused", cmd.cluster or "", {"command": cmd.name, "reason": str(e)}))
    return Routed(cmd, None)


async def execute(ctx: BotContext, inv: Invocation, routed: Routed) -> Answer:
    """Authorize, audit, run. Nothing runs unaudited, and nothing raises: a store
    that is held, corrupt or foreign, or a bug, ends in an answer too."""
    cmd, cluster = routed.cmd, routed.cluster
    cluster_name = cluster.name if cluster else ""
    declared = COMMANDS[cmd.name]
    work = declared.work
    assert work is not None  # only help has none, and admit answers it
    try:
        checked = cluster or await _plan_cluster(ctx, cmd)
        role = declared.role
        if role is not None and checked is not None and not await ctx.access.allowed(checked, inv.user, role):
            # The holders' mentions are deliberate (config IDs, in an ephemeral reply); the rest is fixed words.
            reason = Mrkdwn(ctx.access.refusal(checked, role, f"/etcd {cmd.name}"))
            return Answer(cmd.name, Result.REFUSED, Outcome(ephemeral=blocks.error_reply(reason, cmd.spec.usage)),
                           AuditNote("refused", checked.name, {"command": cmd.name, "missing_role": role.value}))
        await ctx.store.audit("command", user=inv.user, channel=inv.channel, cluster=cluster_name,
                              detail={"command": cmd.name, "args": cmd.args, "flags": sorted(cmd.flags)})
        log.info("command", extra={"ctx_command": cmd.name, "ctx_user": inv.user, "ctx_channel": inv.channel,
                                   "ctx_cluster": cluster_name})
        outcome = await work(ctx, cmd, cluster, inv.user, inv.channel)
    except StoreError as e:
        log.error("command stopped: state store unavailable", extra={"ctx_command": cmd.name, "ctx_error": str(e)})
        return Answer(cmd.name, Result.ERROR, Outcome(ephemeral=blocks.error_reply(
            f"/etcd {cmd.name} did not run: the bot's state store is unavailable: {e}")))
    except Exception:
        log.exception("command failed", extra={"ctx_command": cmd.name, "ctx_cluster": cluster_name})
        return Answer(cmd.name, Result.ERROR, Outcome(ephemeral=blocks.error_reply(
            f"/etcd {cmd.name} failed inside the bot; the details are in its log")))
    refused = outcome.ephemeral is not None and outcome.channel is None
    return Answer(cmd.name, Result.REFUSED if refused else Result.OK, outcome)


async def conclude(ctx: BotContext, inv: Invocation, answer: Answer) -> None:
    """Count the command; audit a refusal quietly (if the database is held, the log keeps the row)."""
    ctx.metrics.commands.labels(command=answer.command, outcome=answer.result.value).inc()
    note = answer.refusal
    if note is None:
        return
    try:
        await ctx.store.audit(note.action, user=inv.user, channel=inv.channel, cluster=note.cluster, detail=note.detail)
    except StoreError as e:
        row = {"user": inv.user, "channel": inv.channel, "cluster": note.cluster, "detail": note.detail}
        log.error("audit row not written", extra={"ctx_action": note.action, "ctx_row": row, "ctx_error": str(e)})


async def _plan_cluster(ctx: BotContext, cmd: Command) -> ClusterConfig | None:
    """The cluster of the plan a command names (cancel, resume)."""
    record = await ctx.store.plan(cmd.args.get("plan_id", ""))
    return ctx.config.cluster(record.cluster) if record else None
