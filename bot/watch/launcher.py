"""The launcher condition: the ssh launcher's dry run fails on a host.

Once a day per cluster with an ssh launcher (PROBE_EVERY), the probe does what `/etcd
launcher-check` does: it connects to every host with its pinned key and asks etcd-chatops-node
for its status (bot.ops.nodes.check_hosts). A launcher that would stop a restore at its first
step (a changed host key, a key no longer in authorized_keys, a node program gone, etcdutl
missing) is then an alert days before the incident that needs it, not during it. One alert per
cluster lists every host that fails, each in its own line.
"""
from __future__ import annotations

from bot.config import ClusterConfig
from bot.domain.cluster import ClusterHealth
from bot.ops.context import BotContext
from bot.ops.launcher import STATUS_TIMEOUT
from bot.ops.nodes import HostCheck, check_hosts, launcher_hosts
from bot.watch.conditions import Condition, Facts, Finding, register

PROBE = "launcher"
PROBE_EVERY = 86400.0                  # daily
PROBE_TIMEOUT = 60.0 + STATUS_TIMEOUT  # a host's connect deadline (10 s by default) and its status, at most


async def fetch(ctx: BotContext, cluster: ClusterConfig, health: ClusterHealth | None) -> list[HostCheck] | None:
    """Every host's dry run, at once (None: not an ssh launcher, or no host known yet: asked again next round)."""
    if cluster.launcher.kind != "ssh":
        return None
    hosts = await launcher_hosts(ctx, cluster, health)
    return await check_hosts(cluster.launcher, hosts) if hosts else None


def launcher(f: Facts) -> list[Finding] | None:
    if f.cluster.launcher.kind != "ssh":
        return []
    checks: list[HostCheck] | None = f.extra.get(PROBE)
    if checks is None:
        return None   # not probed yet
    bad = [c for c in checks if not c.ok]
    if not bad:
        return []
    summary = (f"{len(bad)} of {len(checks)} hosts fail the ssh launcher's dry run, so a restore or replacement "
               f"would stop at its first step: {bad[0].line}")
    return [Finding("launcher", "ssh launcher", summary, figures=tuple((c.host.shown, c.line) for c in bad),
                    suggestions=(f"/etcd launcher-check {f.cluster.name}",),
                    members=tuple(c.host.member for c in bad))]


register(Condition("launcher", "launcher broken", launcher))
