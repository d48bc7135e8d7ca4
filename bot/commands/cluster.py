"""Reading a cluster: status, members, alarms, perf, consistency. Each read under the cluster's deadline."""
from __future__ import annotations

from bot.commands.grammar import Command
from bot.commands.registry import command
from bot.config import ClusterConfig
from bot.domain.errors import EtcdError
from bot.etcd.consistency import check_consistency
from bot.etcd.member_metrics import cluster_metrics
from bot.ops import nodes
from bot.ops.access import Role
from bot.ops.context import BotContext
from bot.ops.outcome import Outcome, refused
from bot.output import blocks
from bot.output.model import perf_view

CLUSTER = ("[cluster]",), ("--cluster",)


@command("status", *CLUSTER, summary="every member's health and the quorum margin", role=Role.READER)
@command("members", *CLUSTER, summary="the member list, as `etcdctl member list`", role=Role.READER)
async def status(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    try:
        health = await ctx.check(cluster)
    except EtcdError as e:
        return Outcome(channel=blocks.unreachable_reply(cluster.name, str(e)))
    if cmd.name == "members":
        return Outcome(channel=blocks.members_reply(health))
    metrics = await cluster_metrics(ctx.client(cluster), health, for_quota=True)
    return Outcome(channel=blocks.status_reply(health, requested_by=user, metrics=metrics))


@command("alarms", *CLUSTER, summary="the active alarms (NOSPACE, CORRUPT) and what to run", role=Role.READER)
@command("perf", *CLUSTER, role=Role.READER,
         summary="disk latency, leader changes, slow applies, proposals, apply lag per member against etcd's guidance")
@command("consistency", *CLUSTER, role=Role.READER,
         summary="HashKV on every member at one revision: agreement, or the member that differs")
async def check(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    try:
        health = await ctx.check(cluster)
    except EtcdError as e:
        return Outcome(channel=blocks.unreachable_reply(cluster.name, str(e)))
    client = ctx.client(cluster)
    if cmd.name == "alarms":
        return Outcome(channel=blocks.alarms_reply(health))
    if cmd.name == "perf":
        return Outcome(channel=blocks.perf_reply(perf_view(health, await cluster_metrics(client, health))))
    try:
        return Outcome(channel=blocks.consistency_reply(await check_consistency(client, health)))
    except EtcdError as e:
        return Outcome(channel=blocks.unreachable_reply(cluster.name, str(e)))


@command("launcher-check", *CLUSTER, role=Role.READER,
         summary="the ssh launcher's dry run: SSH with each pinned host key, etcd-chatops-node's status on every host")
async def launcher_check(ctx: BotContext, cmd: Command, cluster: ClusterConfig, user: str, channel: str) -> Outcome:
    if cluster.launcher.kind != "ssh":
        return refused(f"cluster {cluster.name} has the {cluster.launcher.kind} launcher: only an ssh launcher has "
                       "hosts to check", "see deploy/README.md on the ssh launcher")
    hosts = await nodes.launcher_hosts(ctx, cluster)
    if not hosts:
        return refused(f"no member of {cluster.name} answers, the bot never recorded its membership and the "
                       "launcher names no hosts", "name them in the launcher's hosts table")
    checks = await nodes.check_hosts(cluster.launcher, hosts)
    return Outcome(channel=blocks.launcher_check_reply(cluster.name, [(c.ok, c.line) for c in checks]))
