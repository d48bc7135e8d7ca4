"""`/etcd menu` (and `/etcd` alone): the cluster's state in one line and its common actions as buttons,
offering the way out the cluster needs now and never one that would be refused. Each click runs as its
command would (bot.commands.actions)."""
from __future__ import annotations

import shlex

from bot.commands.grammar import Command
from bot.commands.registry import command
from bot.config import ClusterConfig
from bot.domain.cluster import ClusterHealth
from bot.domain.errors import EtcdError
from bot.domain.mrkdwn import escape
from bot.ops.access import Role
from bot.ops.context import BotContext
from bot.ops.outcome import Outcome
from bot.output import blocks, interactive
from bot.output.interactive import Action, MenuItem
from bot.output.model import status_view
from bot.output.text import headline

CLUSTER = ("[cluster]",), ("--cluster",)
MUTE_FOR = "1h"   # what the alerts' and the menu's mute buttons hold new alerts back for


def menu_items(cluster: str, health: ClusterHealth | None) -> list[MenuItem]:
    """The common actions, and the way out the cluster needs now: a replacement while a member is down and
    quorum holds, a restore once quorum is lost (never what would be refused)."""
    items = [MenuItem("Status", f"status {cluster}"), MenuItem("Alerts", f"alerts {cluster}"),
             MenuItem("Plans", f"plans {cluster}"), MenuItem("Snapshots", f"snapshots {cluster}"),
             MenuItem("Take a snapshot", f"snapshot {cluster}")]
    down = [h.member.name or h.member.hex_id for h in health.members if not h.reachable] if health else []
    if health is not None and health.quorum.ok and down:
        items.append(MenuItem("Propose replacement…", "", Action.PROPOSE_REPLACE, member=down[0]))
    if health is not None and not health.quorum.ok:
        items.append(MenuItem("Propose restore…", "", Action.PROPOSE_RESTORE))
    items += [MenuItem(f"Mute {MUTE_FOR}", shlex.join(["mute", cluster, MUTE_FOR, "muted from the /etcd menu"])),
              MenuItem("Help", "help")]
    return items


@command("menu", *CLUSTER, role=Role.READER,
         summary="the common actions for this channel's cluster, as buttons (also `/etcd` alone)")
async def menu(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    try:
        health: ClusterHealth | None = await ctx.check(cluster)
        state = headline(status_view(health)) if health else ""
    except EtcdError as e:
        health, state = None, f"cluster {cluster.name}: UNREACHABLE: {e}"
    return Outcome(ephemeral=blocks.Reply(text=escape(state),
                                          blocks=interactive.menu_blocks(cluster.name, state,
                                                                         menu_items(cluster.name, health))))
