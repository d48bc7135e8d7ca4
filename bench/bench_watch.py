"""One bot watching a fleet: 20 clusters of 3 members, each member on a host of its own (the netns bed), one
cluster black-holed, one with a member 300 ms away.

Why: the watch runs a status fan-out per cluster per interval, forever; it must
cost little per cluster, and one dead cluster must not delay another's alert.
The bot runs as its own process (as in production), against the Slack stand-in.

1. CPU (utime + stime from /proc/<pid>/stat) and RSS of the bot over --window
   seconds at the default interval, per watched cluster. Peer, in the same run:
   what a cron job of `etcdctl endpoint status --cluster` per cluster per interval
   costs (CPU of those processes over the same window).
   Its RSS against the same bot with the watch off.
2. The time from a member's SIGKILL to the alert message in the stand-in, on
   the black-holed cluster's neighbour, on the cluster halfway down the fleet
   whose third member is 300 ms away (every frame its host sends is held that
   long), and on a plain healthy cluster, killed at the same moment; then one
   member of each other cluster, the kills spread over one interval: the worst
   of all against the goal.

    .venv/bin/python bench/bench_watch.py [--release 3.6] [--clusters 20] [--window 120] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bot.etcd.binaries import find_binary
from bot.testing.netbed import Link, NetnsCluster
from bot.testing.slack import SlackStandIn
from bot.testing.versions import binary_version, etcd_bin_dir
from bot.testing.workspace import CHANNEL, CHANNELS, USERS, BotProcess, SlackSecrets, cluster_table, write_config
from common import cpu_seconds, proc_memory, row, write  # (also puts the repository on sys.path)

INTERVAL, GRACE = 15.0, 45.0  # the watch's defaults
DELAY = 0.3  # the far member's distance
BUDGET = INTERVAL + GRACE + 5  # the goal for every alert
# 60 members on 2 cores: a slower raft tick keeps elections quiet under the load (etcd takes the last flag given).
CALM = ("--heartbeat-interval", "300", "--election-timeout", "3000")
def start_fleet(n: int, size: int) -> list[NetnsCluster]:
    clusters = [NetnsCluster(size, prefix=f"c{i:02d}m", extra_args=CALM) for i in range(n)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda c: c.start(60.0), clusters))
    return clusters


async def alert_after(slack: SlackStandIn, cluster: str, member: str, after: int, since: float,
                      timeout: float) -> float:
    """Seconds from `since` (monotonic) until the stand-in holds the alert for `member` (polled every few ms)."""
    await slack.wait_for_message(
        lambda m: m.channel == CHANNEL and m.thread_ts is None and cluster in m.text and member in m.text,
        after=after, timeout=timeout, what=f"the alert for {member} of {cluster}")
    return time.monotonic() - since


async def etcdctl_cron(fleet: list[NetnsCluster], window: float) -> tuple[float, int]:
    """CPU (cores, as the bot's) and peak RSS of `etcdctl endpoint status --cluster` for every cluster every
    interval, over `window` seconds."""
    etcdctl = str(find_binary("etcdctl"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    while time.monotonic() - started < window:
        tick = time.monotonic()
        procs = [await asyncio.create_subprocess_exec(
            etcdctl, f"--endpoints={','.join(c.all_endpoints)}", "--dial-timeout=2s", "--command-timeout=2s",
            "endpoint", "status", "--cluster", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in fleet]
        await asyncio.gather(*(p.wait() for p in procs))
        await asyncio.sleep(max(0.0, INTERVAL - (time.monotonic() - tick)))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return used / (time.monotonic() - started), after.ru_maxrss * 1024


async def bot_window(config: Path, slack: SlackStandIn, creds: SlackSecrets, log: Path, window: float,
                     then: Callable[[], Awaitable[list[float]]] | None = None) -> tuple[float, int, list[float]]:
    """Start the bot, let it warm up for one interval, then its CPU (cores) over `window` and its RSS;
    `then` runs while it still watches (the kills)."""
    bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, log).start)
    assert bot.proc is not None
    try:
        await asyncio.sleep(INTERVAL)  # warm-up: channels open, first rounds done
        cpu0, t0 = cpu_seconds(bot.proc.pid), time.monotonic()
        await asyncio.sleep(window)
        cpu = (cpu_seconds(bot.proc.pid) - cpu0) / (time.monotonic() - t0)
        rss = proc_memory(bot.proc.pid).get("VmRSS", 0)
        return cpu, rss, (await then() if then else [])
    finally:
        await asyncio.to_thread(bot.stop)


async def run(n: int, window: float) -> tuple[list[dict[str, Any]], str]:
    creds = SlackSecrets()
    fleet = await asyncio.to_thread(start_fleet, n, 3)
    names = [f"fleet-{i:02d}" for i in range(n)]
    far = max(3, n // 2)
    try:
        for m in fleet[0].members:  # black-holed: its hosts answer nothing, not even a refusal
            fleet[0].isolate(m)
        fleet[far].impair(f"c{far:02d}m3", Link.CLIENT, delay=DELAY)
        peer_cpu, peer_rss = await etcdctl_cron(fleet, window)
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)

            def config(watch: bool) -> Path:
                return write_config(directory, [cluster_table(name, c, watch={"enabled": watch})  # default timings
                                                for name, c in zip(names, fleet, strict=True)])
            async with SlackStandIn(bot_token=creds.bot_token, signing_secret=creds.signing_secret,
                                    users=USERS, channels=CHANNELS) as slack:
                _, idle_rss, _ = await bot_window(config(False), slack, creds, directory / "idle.log", window / 2)

                async def kills() -> list[float]:
                    """One member of every healthy cluster, the kills spread over one interval (so they land at
                    every phase of the rounds); the black-holed cluster's neighbour, the cluster with a far member
                    and a plain one at the same moment first."""
                    after, tasks = len(slack.messages), []
                    order = [1, far, 2] + [i for i in range(3, n) if i != far]
                    for k, i in enumerate(order):
                        await asyncio.sleep(0 if k < 3 else INTERVAL / (n - 3))
                        killed = time.monotonic()
                        await asyncio.to_thread(fleet[i].kill, f"c{i:02d}m2")
                        tasks.append(asyncio.ensure_future(
                            alert_after(slack, names[i], f"c{i:02d}m2", after, killed, 3 * BUDGET)))
                    return list(await asyncio.gather(*tasks))

                cpu, rss, latencies = await bot_window(config(True), slack, creds, directory / "bot.log", window,
                                                       kills)
    finally:
        for c in fleet:
            await asyncio.to_thread(c.close)
    rows = [
        row(f"bot CPU per watched cluster, % of one core ({n} clusters × 3 members, 1 black-holed, "
            f"{INTERVAL:g} s interval, {window:g} s window)", 100 * cpu / n, 100 * peer_cpu / n, "%",
            "etcdctl endpoint status --cluster per cluster per interval"),
        row(f"bot RSS, watching {n} clusters", rss / 1e6, idle_rss / 1e6, "MB", "the same bot, watch off"),
        row("member kill → alert, the black-holed cluster's neighbour", latencies[0], latencies[2], "s",
            "the same kill at the same moment, a plain healthy cluster"),
        row(f"member kill → alert, a cluster whose third member is {DELAY * 1000:.0f} ms away", latencies[1],
            latencies[2], "s", "the same kill at the same moment, a plain healthy cluster"),
        row(f"member kill → alert, worst of {n - 1} clusters (kills spread over one interval)", max(latencies),
            BUDGET, "s", "goal: interval + grace + 5 s"),
    ]
    notes = (f"etcd {binary_version(find_binary('etcd'))}, every member on a host of its own (bot/testing/netbed.py). "
             f"The bot runs as its own process with the watch's defaults (interval {INTERVAL:g} s, grace {GRACE:g} s); "
             f"CPU from /proc/<pid>/stat (utime + stime) over the window, RSS at its end: "
             f"{(rss - idle_rss) / n / 1e6:.2f} MB per watched cluster over the bot with its watch off "
             f"({rss / n / 1e6:.1f} MB per cluster counting the whole process). The peer's CPU is that of the etcdctl "
             f"processes (peak RSS of one: {peer_rss / 1e6:.0f} MB). Kill → alert: median "
             f"{statistics.median(latencies):.1f} s, min {min(latencies):.1f} s over {n - 1} clusters. The {3 * n} "
             f"etcd members run with a {CALM[1]} ms heartbeat and {CALM[3]} ms election timeout, so that they stay "
             f"quiet on this machine.")
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--release", default="3.6")
    p.add_argument("--clusters", type=int, default=20)
    p.add_argument("--window", type=float, default=120.0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.clusters < 4:
        p.error("--clusters: at least 4 (one black-holed, its neighbour, one with a far member, a plain one)")
    os.environ["ETCD_BIN_DIR"] = str(etcd_bin_dir(args.release))
    rows, notes = asyncio.run(run(args.clusters, args.window))
    write(args.json, "Watching a fleet", rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
