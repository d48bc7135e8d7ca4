"""Starting the replacement member (runbook step 4).

`manual`: a human starts etcd on the new machine with the environment the
plan shows; the bot waits for the member to appear. `command`: the bot runs
a configured argv (never through a shell), with the runbook's ETCD_*
environment, and reports its exit status and the tail of its output.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from bot.config import LauncherConfig
from bot.ops.replace import Plan
from bot.output import shell

OUTPUT_TAIL = 4000  # characters of the command's output kept for the report


@dataclass(frozen=True)
class LaunchResult:
    ok: bool
    exit_status: int | None
    output_tail: str
    summary: str


def command_argv(template: tuple[str, ...] | list[str], plan: Plan, action: str = "start") -> list[str]:
    """Substitute {name}, {peer_url}, {client_url} and {action} in each element (no shell)."""
    return fill_argv(template, {"name": plan.new_name, "peer_url": plan.new_peer_url,
                                "client_url": plan.new_client_url or "", "action": action})


def fill_argv(template: tuple[str, ...] | list[str], values: dict[str, str]) -> list[str]:
    return [arg.format_map(values) for arg in template]


def child_environment(extra: dict[str, str], secrets: list[str]) -> dict[str, str]:
    """Our environment minus Slack credentials and any secret value, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLACK_") and v not in secrets and not k.startswith("ETCD_")}
    return {**env, **extra}


async def run_command(launcher: LauncherConfig, plan: Plan, secrets: list[str]) -> LaunchResult:
    """The replacement's start: argv without {action} means start, as it always did."""
    return await run_argv(launcher, command_argv(launcher.argv, plan),
                          {**plan.environment, "ETCD_CHATOPS_ACTION": "start"}, secrets)


async def run_argv(launcher: LauncherConfig, argv: list[str], environment: dict[str, str],
                   secrets: list[str]) -> LaunchResult:
    """Run the launcher once (start, stop or restore one member); exit status 0 means done."""
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
        await asyncio.wait_for(asyncio.gather(drain(), proc.wait()), launcher.timeout_seconds)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        text = tail.decode(errors="replace")
        return LaunchResult(False, None, text,
                            f"{argv[0]} did not return within {launcher.timeout_seconds:g}s and was killed")
    text = tail.decode(errors="replace")
    ok = proc.returncode == 0
    return LaunchResult(ok, proc.returncode, text, f"{argv[0]} exited with status {proc.returncode}")


def manual_instructions(plan: Plan) -> str:
    """The runbook's step 4 as a shell block for the operator on the new machine, every value quoted."""
    return "\n".join([*shell.assignments(plan.environment, export=True),
                      "etcd [flags]   # your usual data dir, TLS and client flags"])
