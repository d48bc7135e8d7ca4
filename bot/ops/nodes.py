"""The ssh launcher's steps, host by host: etcd-chatops-node on every host a step concerns, at once.

Before a plan changes any host, `require_hosts` has connected to every host it will touch (the
pinned host key checked) and asked the node program for its status: an unknown or changed key,
a refused key, an unreachable host or a node that does not answer stops the plan there, in one
line per host, with nothing changed anywhere. Each step then runs its node action on each of its
hosts over one connection per host (a restore copies the snapshot over the same connection,
unless the host has it already), and reports per host what ran and what the node answered.
Every changing action carries the run's fencing token (`--fence`), and the lease is checked
right before each host's changing actions. The node's actions are idempotent and look before
they change, so a step that a dropped connection cut short is finished by repeating it on resume.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.config import ClusterConfig, LauncherConfig
from bot.domain.cluster import ClusterHealth
from bot.domain.errors import EtcdError, StepFailed
from bot.ops import ssh
from bot.ops.context import BotContext
from bot.ops.launcher import STATUS_TIMEOUT, Fencing
from bot.ops.ssh import Host, HostError, NodeAnswer, NodeSession

RESUME = "fix what the line says, then /etcd resume the plan (etcd-chatops-node's actions are idempotent)"
Work = Callable[[NodeSession], Awaitable[list[NodeAnswer]]]


@dataclass(frozen=True)
class HostCheck:
    """A host's dry run: connected with its pinned key, and what the node program said of its member."""

    host: Host
    ok: bool
    line: str            # one line: what the node said, or why the host cannot be used


def status_timeout(launcher: LauncherConfig) -> float:
    return min(launcher.timeout_seconds, STATUS_TIMEOUT)


async def check_host(launcher: LauncherConfig, host: Host) -> HostCheck:
    """Connect (pinned key), run `status`; ready when the node answers and runs the launcher's recipe."""
    began = time.monotonic()
    try:
        async with ssh.session(launcher, host) as node:
            answer = await node.run("status", timeout=status_timeout(launcher))
    except (HostError, ValueError) as e:
        return HostCheck(host, False, str(e) if isinstance(e, HostError) else f"{host.shown}: {e}")
    a = answer.answer
    took = f"{time.monotonic() - began:.1f} s"
    if not answer.ok:
        return HostCheck(host, False, f"{host.shown}: {answer.result} ({took})")
    if a.get("recipe") != launcher.recipe:
        return HostCheck(host, False, f"{host.shown}: the node runs the {a.get('recipe')} recipe, the launcher "
                                      f"{launcher.recipe} ({took})")
    etcdutl = a.get("etcdutl_version") or f"not usable: {a.get('etcdutl_error', '?')}"
    where = (f"etcd.yaml {a.get('manifest', '?')}, kube-apiserver.yaml {a.get('apiserver', '?')}"
             if launcher.recipe == "static-pod" else f"unit {a.get('unit', '?')} {a.get('unit_state', '?')}")
    return HostCheck(host, a.get("etcdutl_version") is not None,
                     f"{host.shown}: etcd-chatops-node {a.get('node_version', '?')} ({a.get('recipe')}), member "
                     f"{a.get('state', '?')}, {where}, etcdutl {etcdutl} ({took})")


async def check_hosts(launcher: LauncherConfig, hosts: Sequence[Host]) -> list[HostCheck]:
    """Every host's dry run at once: one host that hangs costs its own deadline."""
    return list(await asyncio.gather(*(check_host(launcher, h) for h in hosts)))


async def require_hosts(launcher: LauncherConfig, hosts: Sequence[Host]) -> str:
    """The check before a plan's first change (and again on resume): StepFailed naming every host that is
    not ready, else every host's line."""
    checks = await check_hosts(launcher, hosts)
    bad = [c for c in checks if not c.ok]
    if bad:
        raise StepFailed(f"{len(bad)} of {len(checks)} hosts not ready, nothing was changed on any host: "
                         + "; ".join(c.line for c in bad), RESUME)
    return "every host ready: " + "; ".join(c.line for c in checks)


async def launcher_hosts(ctx: BotContext, cluster: ClusterConfig, health: ClusterHealth | None = None) -> list[Host]:
    """The hosts of a cluster's ssh launcher: each member's (`health`'s member list, else a fresh one, else the
    membership the bot last recorded), and every other host the launcher's `hosts` names (a spare)."""
    try:
        members = [h.member for h in (health or await ctx.check(cluster)).members]
    except EtcdError:
        last = await ctx.store.last_membership(cluster.name)
        members = list(last.members) if last else []
    launcher = cluster.launcher
    hosts = [ssh.host_for(launcher, m.name, m.peer_urls[0]) for m in members if m.name and m.peer_urls]
    named = {h.member for h in hosts}
    return hosts + [ssh.host_for(launcher, name, "") for name in launcher.hosts if name not in named]


def fence_flags(fencing: Fencing | None) -> list[str]:
    if fencing is None:
        raise StepFailed("this run holds no fencing token, so no host would accept a change",
                         "/etcd resume the plan on the leader")
    return ["--fence", str(fencing.token)]


async def each_host(launcher: LauncherConfig, work: Mapping[Host, Work], what: str,
                    fencing: Fencing | None) -> str:
    """Run each host's work over its own connection, all at once; the lease is checked right before each
    host's connection (a deposed leader sends nothing). Returns one line per action on each host; StepFailed
    naming each host that failed, once every host has finished (none is left running unseen)."""
    async def one(host: Host, job: Work) -> list[NodeAnswer]:
        if fencing is not None:
            await fencing.check()
        async with ssh.session(launcher, host) as node:
            return await job(node)

    outcomes = await asyncio.gather(*(one(h, w) for h, w in work.items()), return_exceptions=True)
    done, failed = [], []
    for host, outcome in zip(work, outcomes, strict=True):
        if isinstance(outcome, HostError | ValueError):
            failed.append(str(outcome) if isinstance(outcome, HostError) else f"{host.shown}: {outcome}")
        elif isinstance(outcome, BaseException):
            raise outcome   # the lease was lost, or the bot stops: the plan stays running for the next leader
        elif all(a.ok for a in outcome):
            done += [a.line() for a in outcome]
        else:
            failed.append("; ".join(a.line() for a in outcome))
    if failed:
        raise StepFailed(f"{what} failed on {len(failed)} of {len(work)} hosts: " + "; ".join(failed)
                         + (f". Done on the others: {'; '.join(done)}" if done else ""), RESUME)
    return "; ".join(done)


def action(name: str, flags: Sequence[str], timeout: float) -> Work:
    """One node action as a host's work."""
    async def run(node: NodeSession) -> list[NodeAnswer]:
        return [await node.run(name, flags, timeout=timeout)]
    return run


@dataclass(frozen=True)
class Snapshot:
    """The snapshot a restore sends: the plaintext file on the bot's host, and how the hosts name it."""

    path: Path
    name: str       # the file name in the node's snapshot directory
    sha256: str
    size: int

    @classmethod
    async def of(cls, path: Path, cluster: str) -> Snapshot:
        """The file's sha256 (of the plaintext the hosts get) and size; named by both, so a host that has it
        from an earlier attempt is not sent it again."""
        def digest() -> tuple[str, int]:
            h, size = hashlib.sha256(), 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
            return h.hexdigest(), size
        sha, size = await asyncio.to_thread(digest)
        return cls(path, f"{cluster}-{sha[:16]}.db", sha, size)


def restore_work(launcher: LauncherConfig, snapshot: Snapshot, flags: Sequence[str], fencing: Fencing | None) -> Work:
    """Over one connection: is the snapshot on the host (sha256 checked)? if not, copy it (the node checks the
    sha256 on arrival); then restore with the plan's flags."""
    named = ["--snapshot", snapshot.name, "--sha256", snapshot.sha256]

    async def run(node: NodeSession) -> list[NodeAnswer]:
        have = await node.run("status", named, timeout=status_timeout(launcher))
        done = [have]
        if not have.ok:
            return done
        if have.answer.get("snapshot_present") is not True:
            if fencing is not None:
                await fencing.check()
            put = await node.run("put-snapshot", [*fence_flags(fencing), *named, "--size", str(snapshot.size)],
                                 timeout=launcher.timeout_seconds, stdin=snapshot.path)
            done.append(put)
            if not put.ok:
                return done
        if fencing is not None:
            await fencing.check()
        done.append(await node.run("restore", [*fence_flags(fencing), *named, *flags],
                                   timeout=launcher.timeout_seconds))
        return done
    return run


def join_work(launcher: LauncherConfig, flags: Sequence[str], template_from: Sequence[Host]) -> Work:
    """A new member's start: for the static-pod recipe, a survivor's etcd.yaml first (`status --show-manifest`,
    over its own connection), the first survivor that gives one; then `start --join` with it on stdin."""
    async def run(node: NodeSession) -> list[NodeAnswer]:
        template: bytes | None = None
        shown: list[NodeAnswer] = []
        for survivor in template_from:
            try:
                async with ssh.session(launcher, survivor) as other:
                    answer = await other.run("status", ["--show-manifest"], timeout=status_timeout(launcher))
            except HostError:
                continue
            if answer.ok and answer.answer.get("manifest_text"):
                template = str(answer.answer["manifest_text"]).encode()
                shown.append(NodeAnswer(answer.host, "status", ("--show-manifest",), answer.exit_status,
                                        {"ok": True, "detail": f"etcd.yaml read ({len(template)} bytes), the "
                                                               "template of the new member's"}, answer.seconds))
                break
        if template_from and template is None:
            raise HostError(node.host, "no surviving member's host gave its etcd.yaml (status --show-manifest), "
                                       "the template of the new member's")
        extra = ["--template-stdin"] if template is not None else []
        return [*shown, await node.run("start", [*flags, *extra], timeout=launcher.timeout_seconds, stdin=template)]
    return run
