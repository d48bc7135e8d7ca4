"""What the buttons, the forms and the App Home tab do, without Slack: a click that stands for a command runs
as that `/etcd` command would (one pipeline: its role checked, audited, the same answer), a form is checked
field by field before it closes, the menu offers what the cluster needs now, and the Home tab's facts are
gathered. handlers/interactions.py is the Slack side: it acknowledges, opens the modals and says the rest."""
from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass

from bot.commands.menu import MUTE_FOR
from bot.commands.pipeline import Answer, Invocation, admit, conclude, execute
from bot.config import ClusterConfig
from bot.domain.cluster import Member
from bot.domain.errors import EtcdError
from bot.domain.mrkdwn import Mrkdwn, escape
from bot.domain.plan import OPEN_STATES
from bot.domain.replace import ReplaceRequest
from bot.ops.access import Role
from bot.ops.context import BotContext
from bot.ops.notify import NotifyFailed
from bot.ops.outcome import Outcome
from bot.ops.replace.plan import new_member_problems
from bot.ops.restorable import restorable
from bot.output import blocks, interactive
from bot.output.blocks import PlanLine, ago, slack_date
from bot.output.interactive import HomeCluster, SnapshotChoice
from bot.output.model import Verdict, status_view
from bot.output.units import humanize_bytes
from bot.watch.watcher import open_views

CLUSTER = ("[cluster]",), ("--cluster",)



# ---------------------------------------------------------------- a click as its command

async def run(ctx: BotContext, text: str, user: str, channel: str) -> Answer:
    """`/etcd text` by `user` in `channel`, as the slash command runs it (parse, route, role, audit, work)."""
    inv = Invocation(text, user, channel)
    step = admit(ctx, inv)
    answer = step if isinstance(step, Answer) else await execute(ctx, inv, step)
    await conclude(ctx, inv, answer)
    return answer


async def deliver(ctx: BotContext, outcome: Outcome, channel: str, user: str) -> None:
    """An outcome where a command's would go: the channel part in the channel, the rest to `user` alone."""
    if outcome.ephemeral is not None:
        await ctx.notifier.private_message(channel, user, outcome.ephemeral)
    if outcome.channel is not None:
        try:
            await ctx.notifier.channel_message(channel, outcome.channel)
        except NotifyFailed as e:   # the bot may not be in the channel: the person still gets the answer
            await ctx.notifier.private_message(channel, user, outcome.channel)
            await ctx.notifier.private_message(channel, user, blocks.error_reply(
                f"could not post in the channel: {e}"))


async def mute_from_alert(ctx: BotContext, cluster: str, user: str, channel: str) -> Answer:
    return await run(ctx, shlex.join(["mute", cluster, MUTE_FOR, "muted from an alert's button"]), user, channel)


async def refusal(ctx: BotContext, cluster: ClusterConfig | None, user: str, role: Role, what: str) -> str | None:
    """Why `user` may not do `what` on `cluster` (mrkdwn), or None when they may."""
    if cluster is None:
        return "that cluster is no longer in the bot's configuration"
    if await ctx.access.allowed(cluster, user, role):
        return None
    return ctx.access.refusal(cluster, role, what)


# ---------------------------------------------------------------- the replacement form

def replace_text(cluster: str, fields: Mapping[str, str]) -> str:
    """The `/etcd replace` a filled-in form stands for."""
    words = ["replace", fields.get(interactive.FAILED, ""), fields.get(interactive.NEW_NAME, ""),
             fields.get(interactive.NEW_PEER_URL, "")]
    if client := fields.get(interactive.CLIENT_URL):
        words += ["--client-url", client]
    return shlex.join([*words, "--cluster", cluster])


async def replace_form_errors(ctx: BotContext, cluster: ClusterConfig, fields: Mapping[str, str]) -> dict[str, str]:
    """Each field's problem, by its block: what a person can fix in the form before it closes. The members
    are those the bot last recorded (a database read, no etcd call: the answer is due within 3 s); the
    proposal checks the live cluster again."""
    errors: dict[str, str] = {}
    failed = fields.get(interactive.FAILED, "").strip()
    recorded = await ctx.store.last_membership(cluster.name)
    members: list[Member] = list(recorded.members) if recorded else []
    known = [m for m in members if failed.lower() in (m.name.lower(), m.hex_id)]
    if members and not known:
        names = ", ".join(m.name or m.hex_id for m in members)
        errors[interactive.FAILED] = f"no member {failed!r} in {cluster.name} (members: {names})"
    request = ReplaceRequest(failed, fields.get(interactive.NEW_NAME, ""), fields.get(interactive.NEW_PEER_URL, ""),
                             fields.get(interactive.CLIENT_URL) or None)
    for key, refused in new_member_problems(members, request).items():
        errors[key] = refused.reason
    return errors


# ---------------------------------------------------------------- the restore form

async def snapshot_choices(ctx: BotContext, cluster: ClusterConfig) -> list[SnapshotChoice]:
    """The bot's own verified snapshots a restore may use, newest first (a foreign one only by name, with
    --force: never offered)."""
    now = time.time()
    return [SnapshotChoice(r.file_name, f"rev {r.revision} · {r.total_keys} keys · {humanize_bytes(r.file_size)} · "
                                        f"{ago(now - r.created_at)} ago" + (" · store" if r.from_store else ""))
            for r in await restorable(ctx, cluster) if not r.foreign]


def restore_text(cluster: str, snapshot: str) -> str:
    return shlex.join(["restore", snapshot, "--cluster", cluster])


# ---------------------------------------------------------------- the App Home tab

@dataclass(frozen=True)
class Home:
    clusters: tuple[HomeCluster, ...]
    checked: str


async def home(ctx: BotContext, user: str) -> Home:
    """Every cluster `user` may read, each read at once under its own deadline: one dead cluster costs its
    own line, not the tab."""
    readable = [c for c in ctx.config.clusters if await ctx.access.allowed(c, user, Role.READER)]
    started = time.monotonic()
    found = await asyncio.gather(*(_home_cluster(ctx, c) for c in readable))
    return Home(tuple(found), f"read {time.strftime('%H:%M:%S UTC', time.gmtime())} in "
                              f"{time.monotonic() - started:.1f} s; it is drawn again each time you open this tab")


async def _home_cluster(ctx: BotContext, cluster: ClusterConfig) -> HomeCluster:
    now = time.time()
    try:
        health = await asyncio.wait_for(ctx.check(cluster), 2 * cluster.timeout_seconds + 1)
        view = status_view(health)
        state, healthy = f"{view.verdict}: {view.quorum_line}", view.verdict is Verdict.HEALTHY
    except (EtcdError, TimeoutError) as e:
        state, healthy = f"UNREACHABLE: {e or 'no answer in time'}", False
    alerts = tuple(f"{v.title} {v.subject}: {v.summary}" for v in
                   open_views(cluster.name, await ctx.store.open_alerts(cluster.name), now))
    plans = tuple(f"`{p.id}` {p.state} · {p.what}" for p in map(PlanLine.of, await ctx.store.plans(
        cluster.name, limit=5, states=OPEN_STATES)))
    newest = await ctx.store.snapshots(cluster.name, limit=1)
    snapshot = (f"newest snapshot {escape(newest[0].path.rsplit('/', 1)[-1])} · rev {newest[0].revision} · "
                f"{slack_date(newest[0].created_at)}" if newest else "no verified snapshot recorded: `/etcd snapshot`")
    drills = sorted((await ctx.store.last_drills(cluster.name)).values(), key=lambda d: d.at, reverse=True)
    drill = (f"newest drill {'passed' if drills[0].ok else 'FAILED'} {slack_date(drills[0].at)}" if drills
             else "no restore drill yet: `/etcd drill`")
    return HomeCluster(cluster.name, state, healthy, alerts, plans, Mrkdwn(snapshot), Mrkdwn(drill))
