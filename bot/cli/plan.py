"""`etcd-chatops plan ...`: break glass. When Slack is down, the plans the channel would make are proposed,
approved and run from a shell, over the same engine, checks and store as the bot's.

Whoever runs these holds the bot's configuration and its database, so the shell is the authority: roles are
not checked (there is no Slack to ask who is in a group), the approval rules are. A person is named with
`--as NAME` and recorded as `shell:NAME` (bot.domain.mrkdwn.shell_user), never as a Slack user: each name counts
as one approver, a proposer never approves their own plan unless its kind allows it, and a restore still needs
two names. Every action is audited as `break_glass` (the name, the reason, the shell's user and host) and
queued in the store's outbox, which a bot replica posts in the channel once Slack answers (bot.runtime.relay).
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TextIO

from bot.cli import EXIT_FAILED, EXIT_OK, UsageFailure, _load_config
from bot.commands.grammar import UsageError, free_text
from bot.commands.pipeline import Invocation, Routed, execute
from bot.commands.table import parse
from bot.config import ClusterConfig, Config
from bot.domain.mrkdwn import escape, mention, shell_user
from bot.domain.plan import PlanKind, PlanState
from bot.domain.record import PlanRecord
from bot.ops import lifecycle
from bot.ops.access import Access, Role
from bot.ops.context import BotContext
from bot.ops.engine import start_plan
from bot.ops.kinds import plan_view, render_plan
from bot.ops.leadership import LEASE
from bot.ops.notify import PlainDirectory
from bot.ops.outcome import Outcome
from bot.ops.restore import run as restore_run
from bot.output.blocks import Reply
from bot.output.text import plain
from bot.runtime import Runtime
from bot.runtime.leader import PICKUP_SECONDS
from bot.store.base import Store, StoreError

log = logging.getLogger(__name__)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")
PROPOSALS = tuple(kind.value for kind in PlanKind)  # the /etcd commands that propose a plan
FOLLOW_SECONDS = 0.5


class ShellAccess(Access):
    """The shell is the authority: whoever runs `etcd-chatops plan` holds the bot's configuration and database."""

    async def allowed(self, cluster: ClusterConfig, user: str, role: Role) -> bool:
        return True


RUN_ENDS = (PlanState.DONE, PlanState.FAILED, PlanState.INTERRUPTED)


@dataclass
class ShellNotifier:
    """The Notifier of a shell: prints what the channel would read, as it happens, and queues what the channel
    must learn in the store's outbox (posted once Slack answers)."""

    config: Config
    out: TextIO = field(default_factory=lambda: sys.stdout)
    store: Store | None = None
    _states: dict[str, str] = field(default_factory=dict)

    def show(self, text: str, blocks: list[dict[str, object]] | None = None) -> None:
        print(plain(text, blocks or ()), file=self.out, flush=True)

    async def queue(self, channel: str, plan_id: str | None, text: str) -> None:
        if self.store is None:
            return
        try:
            await self.store.queue_post(channel, plan_id, text)
        except StoreError as e:  # the action itself is audited; the channel misses this line only
            log.warning("not queued for the channel", extra={"ctx_plan": plan_id, "ctx_error": str(e)})

    async def post_plan(self, record: PlanRecord) -> str:
        reply = render_plan(record, plan_view(self.config, record, {}))
        self.show(reply.text, reply.blocks)
        return ""  # no message yet: the relay posts one once Slack answers

    async def plan_details(self, record: PlanRecord) -> None:
        details = render_plan(record, plan_view(self.config, record, {})).details
        if details is not None:  # the long part (commands, environment) is what a shell acts on
            self.show(details.text, details.blocks)

    async def plan_changed(self, record: PlanRecord, step_states: Mapping[int, str]) -> None:
        # How a run ended is its last line (_run says it, also for a plan another replica ran), so not here too.
        if self._states.get(record.id) != record.state and record.state not in RUN_ENDS:
            self._states[record.id] = record.state
            self.show(f"plan {record.id} is {record.state}" + (f": {record.error}" if record.error else ""))

    async def thread_note(self, record: PlanRecord, text: str) -> None:
        self.show(text)
        await self.queue(record.channel, record.id, text)

    async def thread_post(self, record: PlanRecord, text: str) -> None:
        await self.thread_note(record, text)

    async def private_note(self, record: PlanRecord, user: str, text: str) -> None:
        self.show(text)

    async def private_message(self, channel: str, user: str, reply: Reply) -> None:
        self.show(reply.text, reply.blocks)

    async def channel_message(self, channel: str, reply: Reply) -> str:
        self.show(reply.text, reply.blocks)
        await self.queue(channel, None, reply.text)
        return ""

    async def update_message(self, channel: str, ts: str, reply: Reply) -> None:
        self.show(reply.text, reply.blocks)

    async def thread_message(self, channel: str, ts: str, reply: Reply) -> None:
        self.show(reply.text, reply.blocks)


@asynccontextmanager
async def _context(config: Config) -> AsyncIterator[BotContext]:
    notifier = ShellNotifier(config)
    ctx = await BotContext.open(config, notifier, PlainDirectory())
    ctx.access = ShellAccess(ctx.access.directory)
    notifier.store = ctx.store
    try:
        yield ctx
    finally:
        await ctx.close()


def _person(args: argparse.Namespace) -> tuple[str, str]:
    """The acting person (as the store records them) and the reason, both checked."""
    if not NAME.fullmatch(args.person):
        raise UsageFailure(f"--as: {args.person!r} is not a name (1-40 letters, digits, '.', '_', '-')")
    reason = free_text(args.reason)
    if not reason:
        raise UsageFailure("--reason: say why this is done from a shell")
    return shell_user(args.person), reason


async def _break_glass(ctx: BotContext, args: argparse.Namespace, user: str, reason: str, cluster: str,
                       channel: str, plan_id: str) -> None:
    """The action flagged: audited with who, why, and the shell's user and host; said in the plan's thread."""
    await ctx.store.audit("break_glass", user=user, channel=channel, cluster=cluster,
                          detail={"command": f"plan {args.plan_cmd}", "plan": plan_id, "reason": reason,
                                  "os_user": getpass.getuser(), "host": socket.gethostname()})
    notifier = ctx.notifier
    if isinstance(notifier, ShellNotifier):
        await notifier.queue(channel, plan_id, f":rotating_light: {mention(user)} ran `plan {args.plan_cmd}` "
                                               f"from a shell: {escape(reason)}")


def _said(outcome: Outcome) -> int:
    """Print what the person would have been told; a refusal (bot.output.blocks.error_reply) exits 1."""
    for reply in (outcome.ephemeral, outcome.channel):
        if reply is not None:
            print(plain(reply.text, reply.blocks), flush=True)
    return EXIT_FAILED if outcome.ephemeral is not None and outcome.ephemeral.refusal else EXIT_OK


async def _plan(ctx: BotContext, plan_id: str) -> PlanRecord:
    record = await ctx.store.plan(plan_id)
    if record is None:
        raise UsageFailure(f"no plan {plan_id!r} in {ctx.config.source} (see: etcd-chatops plan show)")
    return record


async def main(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    if args.plan_cmd == "propose":
        return await _propose(config, args)
    async with _context(config) as ctx:
        if args.plan_cmd == "show":
            return await _show(ctx, args)
        user, reason = _person(args)
        if args.plan_cmd == "continue" and args.stage is not None and args.stage not in restore_run.MANUAL_STAGES:
            raise UsageFailure(f"{args.stage!r} is not a stage a restore waits on for a person; those are "
                               f"{', '.join(restore_run.MANUAL_STAGES)}")
        record = await _plan(ctx, args.plan)
        await _break_glass(ctx, args, user, reason, record.cluster, record.channel, record.id)
        if args.plan_cmd == "approve":
            counted = await lifecycle.approve(ctx, record, user)
            current = await _plan(ctx, record.id)
            if current.state == PlanState.APPROVED:
                print(f"plan {record.id} is approved: run it with `etcd-chatops plan run {record.id} --as NAME "
                      "--reason TEXT` (a bot replica that holds the executor lease runs it within a second)")
            return EXIT_OK if counted else EXIT_FAILED
        if args.plan_cmd == "run":
            return await _run(ctx, record)
        if args.plan_cmd == "resume":
            outcome = await lifecycle.resume(ctx, record.id, user, record.channel)
            return _said(outcome) or await _run(ctx, await _plan(ctx, record.id))
        if args.plan_cmd == "continue":
            return _said(await restore_run.continue_plan(ctx, record.id, args.stage, user, record.channel,
                                                         "etcd-chatops plan continue PLAN [STAGE] --as NAME --reason "
                                                         "TEXT"))
        if args.plan_cmd == "cancel":
            return _said(await lifecycle.cancel(ctx, record.id, user, record.channel, reason))
        return _said(await lifecycle.abandon(ctx, record.id, reason, user, record.channel))


async def _propose(config: Config, args: argparse.Namespace) -> int:
    """The words after `propose` are an /etcd proposal, parsed by the same grammar and run by the same pipeline
    (audited, the kind's own checks) as in the channel, for the cluster they name or the only one."""
    user, reason = _person(args)
    text = " ".join(args.words)
    try:
        cmd = parse(text)
    except UsageError as e:
        raise UsageFailure(f"{e.reason} (usage: {e.usage})") from None
    if cmd.name not in PROPOSALS:
        raise UsageFailure(f"propose takes {', '.join(PROPOSALS)} and their arguments, not {cmd.name!r}")
    if cmd.cluster is not None:
        cluster = config.cluster(cmd.cluster)
        if cluster is None:
            raise UsageFailure(f"--cluster: no cluster named {cmd.cluster!r} in {config.source}")
    elif len(config.clusters) == 1:
        cluster = config.clusters[0]
    else:
        raise UsageFailure(f"{config.source} names {len(config.clusters)} clusters: add --cluster NAME to the words")
    channel = cluster.channels[0] if cluster.channels else ""  # where the relay posts it
    async with _context(config) as ctx:
        answer = await execute(ctx, Invocation(text, user, channel), Routed(cmd, cluster))
        status = _said(answer.outcome)
        proposed = await ctx.store.open_plan(cluster.name)
        if status != EXIT_OK or proposed is None or proposed.proposer != user or proposed.state != PlanState.PROPOSED:
            return EXIT_FAILED
        await _break_glass(ctx, args, user, reason, cluster.name, channel, proposed.id)
        needed = config.approval.rule(proposed.kind).approvals_needed
        print(f"proposed plan {proposed.id}; it needs {needed} approver{'s' if needed > 1 else ''}: "
              f"etcd-chatops plan approve {proposed.id} --as NAME --reason TEXT")
        return EXIT_OK


async def _show(ctx: BotContext, args: argparse.Namespace) -> int:
    if args.plan is None:
        records = await ctx.store.plans(args.cluster, limit=20)
        for r in records:
            why = f"  {r.error.splitlines()[0]}" if r.error else ""
            print(f"{r.id}  {r.kind:<8} {r.cluster:<12} {r.state:<11} by {plain(mention(r.proposer))}{why}")
        if not records:
            print("no plans yet")
        return EXIT_OK
    record = await _plan(ctx, args.plan)
    steps = await ctx.store.steps(record.id)
    reply = render_plan(record, plan_view(ctx.config, record, {s.idx: s.state for s in steps}))
    print(plain(reply.text, reply.blocks))
    needed = ctx.config.approval.rule(record.kind).approvals_needed
    print(f"\napprovals ({len(record.approvals)} of {needed}): "
          + (", ".join(plain(mention(a)) for a in record.approvals) or "none"))
    for s in steps:
        print(f"  step {s.idx} {s.key:<10} {s.state:<9} {plain(s.error or s.detail or '')}")
    return EXIT_OK


async def _run(ctx: BotContext, record: PlanRecord) -> int:
    """Run an approved plan with this process's runtime (no watch, no schedules): it takes the executor lease
    and runs the plan as the bot would. When a live bot replica holds the lease, that replica runs it: follow
    its steps from the store until the plan ends."""
    if record.state not in (PlanState.APPROVED, PlanState.RUNNING):
        hint = {PlanState.PROPOSED: "approve it first", PlanState.INTERRUPTED: "resume it",
                PlanState.FAILED: "resume it, or abandon it"}.get(record.state, "it has ended")
        print(f"plan {record.id} is {record.state}, not approved: {hint}")
        return EXIT_FAILED
    # This plan is this person's to start, not the takeover's to report as left by a previous leader.
    ctx.running.add(record.id)
    runtime = await Runtime(ctx, watch=False, upkeep=False).start()
    began, started, following, printed = time.monotonic(), False, False, set()
    run: asyncio.Task[PlanState | None] | None = None
    try:
        while True:
            current = await _plan(ctx, record.id)
            if current.state not in (PlanState.APPROVED, PlanState.RUNNING):
                if run is not None:  # the run's last words (its audit row, the closing note) come after its state
                    await asyncio.gather(run, return_exceptions=True)
                break
            if not started and ctx.is_leader():
                started = True
                ctx.running.discard(record.id)
                run = start_plan(ctx, record.id, current.decided_by or "", from_states=(current.state,),
                                 start=current.current_step)
            elif not started and not following and time.monotonic() - began > 3 * PICKUP_SECONDS:
                lease = await ctx.store.lease(LEASE)
                if lease is not None and lease.holder != ctx.leadership.replica_id:
                    following = True
                    print(f"bot replica {lease.holder} holds the executor lease and runs plan {record.id}; "
                          "following its steps here", flush=True)
            if following:
                for s in await ctx.store.steps(record.id):
                    if s.state != "running" and (s.idx, s.state) not in printed:
                        printed.add((s.idx, s.state))
                        print(f"step {s.idx} ({s.key}) {s.state}: {s.error or s.detail or ''}", flush=True)
            await asyncio.sleep(FOLLOW_SECONDS)
    finally:
        await runtime.stop()
    final = await _plan(ctx, record.id)
    print(f"plan {record.id} is {final.state}" + (f": {final.error}" if final.error else ""))
    return EXIT_OK if final.state == PlanState.DONE else EXIT_FAILED
