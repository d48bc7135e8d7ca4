"""Starting the replacement member (runbook step 4), and the launcher's other actions.

`manual`: a human starts etcd on the new machine with the environment the
plan shows; the bot waits for the member to appear. `command`: the bot runs
a configured argv (never through a shell), with the runbook's ETCD_*
environment, and reports its exit status and the tail of its output.

`ssh`: etcd-chatops-node on each member's host (bot.ops.ssh; the steps host by host are
bot.ops.nodes). An argv with `{action}` also stops a member, restores its data and reports
whether it runs (`status`: exit 0 running, 3 stopped, as `systemctl status`
and LSB init scripts answer, or the `state` of a JSON answer line; anything
else is unknown). Every action a plan
runs carries the run's fencing token (ETCD_CHATOPS_FENCE), and the lease is
checked right before each launcher process starts.
"""
from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from bot.config import LauncherConfig
from bot.domain import shell
from bot.domain.launch_env import FENCE_VARIABLE
from bot.domain.quorum import MemberState
from bot.domain.replace import ReplacePlan
from bot.ops import ssh

OUTPUT_TAIL = 4000  # characters of the command's output kept for the report
STATUS_TIMEOUT = 30.0  # a status is a read of a host: it gets a deadline shorter than an action's


STATUS_EXIT = {0: MemberState.RUNNING, 3: MemberState.STOPPED}  # systemctl status / LSB: 3 is "not running"


@dataclass(frozen=True)
class LauncherStatus:
    state: MemberState
    detail: str  # the launcher's last output line, or why the state is unknown


@dataclass(frozen=True)
class Fencing:
    """A plan run's fencing token for its launcher processes, and the lease check made right before each one
    starts: a leader deposed meanwhile starts nothing, and a launcher that saw a newer token refuses."""

    token: int
    check: Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class LaunchResult:
    ok: bool
    exit_status: int | None
    output_tail: str
    summary: str


def command_argv(template: tuple[str, ...] | list[str], plan: ReplacePlan, action: str = "start") -> list[str]:
    """Substitute {name}, {peer_url}, {client_url} and {action} in each element (no shell)."""
    return fill_argv(template, {"name": plan.new_name, "peer_url": plan.new_peer_url,
                                "client_url": plan.new_client_url or "", "action": action})


def fill_argv(template: tuple[str, ...] | list[str], values: dict[str, str]) -> list[str]:
    return [arg.format_map(values) for arg in template]


def member_argv(template: tuple[str, ...] | list[str], name: str, peer_url: str, client_urls: Sequence[str],
                action: str) -> list[str]:
    """The argv of one action on one member of the cluster."""
    return fill_argv(template, {"name": name, "peer_url": peer_url, "client_url": ",".join(client_urls),
                                "action": action})


def child_environment(extra: dict[str, str], secrets: list[str]) -> dict[str, str]:
    """Our environment minus Slack credentials and any secret value, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLACK_") and v not in secrets and not k.startswith("ETCD_")}
    return {**env, **extra}


async def run_command(launcher: LauncherConfig, plan: ReplacePlan, secrets: list[str],
                      fencing: Fencing | None = None) -> LaunchResult:
    """The replacement's start: argv without {action} means start, as it always did."""
    return await run_argv(launcher, command_argv(launcher.argv, plan),
                          {**plan.environment, "ETCD_CHATOPS_ACTION": "start"}, secrets, fencing=fencing)


async def member_status(launcher: LauncherConfig, name: str, peer_url: str, client_urls: Sequence[str],
                        secrets: list[str]) -> LauncherStatus:
    """The launcher's `status` of one member. Read-only, so never fenced; a launcher without actions, a
    member that never started (no name) or any answer but exit 0 or 3 is unknown. The ssh launcher asks
    etcd-chatops-node on the member's host (a host it cannot use is unknown, and says why)."""
    if launcher.kind == "ssh" and name:
        return await ssh_status(launcher, ssh.host_for(launcher, name, peer_url))
    if launcher.kind != "command" or not launcher.has_actions:
        return LauncherStatus(MemberState.UNKNOWN, f"the {launcher.kind} launcher has no status action")
    if not name:
        return LauncherStatus(MemberState.UNKNOWN, "it never started (no name)")
    result = await run_argv(launcher, member_argv(launcher.argv, name, peer_url, client_urls, "status"),
                            {"ETCD_CHATOPS_ACTION": "status", "ETCD_NAME": name}, secrets,
                            timeout=min(launcher.timeout_seconds, STATUS_TIMEOUT))
    return read_status(result)


async def ssh_status(launcher: LauncherConfig, host: ssh.Host) -> LauncherStatus:
    """etcd-chatops-node's `status` on `host`: its `state` decides (running, stopped; anything else unknown)."""
    try:
        async with ssh.session(launcher, host) as node:
            answer = await node.run("status", timeout=min(launcher.timeout_seconds, STATUS_TIMEOUT))
    except ssh.HostError as e:
        return LauncherStatus(MemberState.UNKNOWN, str(e))
    return LauncherStatus(answer.state if answer.ok else MemberState.UNKNOWN, answer.line())


def read_status(result: LaunchResult) -> LauncherStatus:
    """A `status` answer: exit 0 running, 3 stopped; when the last output line is a JSON object with a `state`
    (etcd-chatops-node answers exit 0 and says it there), "running" or "stopped" decides and any other state
    is unknown. Any other exit, or an exit 3 that says running, is unknown."""
    lines = result.output_tail.strip().splitlines()
    last = lines[-1][-300:] if lines else ""
    if result.exit_status not in STATUS_EXIT:
        return LauncherStatus(MemberState.UNKNOWN, result.summary + (f": {last}" if last else ""))
    try:
        said = json.loads(last).get("state") if last.startswith("{") else None
    except (ValueError, AttributeError):
        said = None
    state = STATUS_EXIT[result.exit_status]
    if isinstance(said, str):
        told = {"running": MemberState.RUNNING, "stopped": MemberState.STOPPED}.get(said, MemberState.UNKNOWN)
        state = MemberState.UNKNOWN if state is MemberState.STOPPED and told is MemberState.RUNNING else told
    return LauncherStatus(state, last or result.summary)


async def run_argv(launcher: LauncherConfig, argv: list[str], environment: dict[str, str], secrets: list[str], *,
                   fencing: Fencing | None = None, timeout: float | None = None) -> LaunchResult:
    """Run the launcher once (start, stop, restore or status of one member); exit status 0 means done.
    With `fencing`: the lease is checked right before the process starts (LeaseLost: none starts), and the
    process gets the token in ETCD_CHATOPS_FENCE."""
    timeout = timeout or launcher.timeout_seconds
    if fencing is not None:
        await fencing.check()
        environment = {**environment, FENCE_VARIABLE: str(fencing.token)}
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=child_environment(environment, secrets), start_new_session=True)
    except OSError as e:
        return LaunchResult(False, None, "", f"could not run {argv[0]}: {e.strerror or e}")
    tail = bytearray()

    async def drain() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            tail.extend(chunk)
            del tail[:-OUTPUT_TAIL]

    try:
        await asyncio.wait_for(asyncio.gather(drain(), proc.wait()), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        text = tail.decode(errors="replace")
        return LaunchResult(False, None, text, f"{argv[0]} did not return within {timeout:g}s and was killed")
    text = tail.decode(errors="replace")
    ok = proc.returncode == 0
    return LaunchResult(ok, proc.returncode, text, f"{argv[0]} exited with status {proc.returncode}")


def manual_instructions(plan: ReplacePlan) -> str:
    """The runbook's step 4 as a shell block for the operator on the new machine, every value quoted."""
    return "\n".join([*shell.assignments(plan.environment, export=True),
                      "etcd [flags]   # your usual data dir, TLS and client flags"])
