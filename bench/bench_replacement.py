"""A replacement's wall time: the bot (from the approval reaction to `done`)
against the runbook done by hand with etcdctl, scripted without pauses.

Why: the bot adds safety (re-check, a verified snapshot, learner catch-up,
a final verification); this shows what that costs. Each run uses a fresh
3-member cluster whose member1 is killed, and the same `command` launcher
starts member4. Clusters are left 6 s old first (etcd 3.5 accepts a member
add only after its leader has seen every peer for 5 s).

    .venv/bin/python bench/bench_replacement.py [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bot.config import load_config
from bot.server import BotServer
from bot.settings import SlackSettings
from bot.testing.cluster import LocalCluster, free_port
from bot.testing.slack import SlackStandIn
from bot.testing.workspace import (
    CHANNEL,
    CHANNELS,
    LEAD,
    ONCALL,
    USERS,
    SlackSecrets,
    cluster_table,
    launcher_argv,
    write_config,
)
from common import row, write  # (also puts the repository on sys.path)

SETTLE = 6.0


def fresh_cluster() -> LocalCluster:
    cluster = LocalCluster(3).start()
    time.sleep(SETTLE)
    cluster.kill("member1")
    return cluster


async def by_bot(no_learner: bool) -> float:
    creds = SlackSecrets()
    cluster = await asyncio.to_thread(fresh_cluster)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = load_config(write_config(Path(tmp), [cluster_table("prod", cluster)]))
            async with SlackStandIn(bot_token=creds.bot_token, signing_secret=creds.signing_secret,
                                    users=USERS, channels=CHANNELS) as slack:
                settings = SlackSettings(bot_token=creds.bot_token, signing_secret=creds.signing_secret,
                                         api_url=slack.api_url)
                async with BotServer(config, settings) as bot:
                    slack.bot_url = bot.url
                    peer, client = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
                    flag = " --no-learner" if no_learner else ""
                    await slack.send_command(f"replace member1 member4 {peer} --client-url {client}{flag}",
                                             user_id=ONCALL, channel_id=CHANNEL)
                    plan = await slack.wait_for_message(lambda m: m.text.startswith("Plan "), timeout=30)
                    started = time.perf_counter()
                    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction="white_check_mark")
                    await slack.wait_for(lambda: any(" is done" in m.text for m in slack.messages), timeout=300,
                                         what="the plan to finish")
                    return time.perf_counter() - started
    finally:
        cluster.close()


def by_hand() -> float:
    """The runbook, steps 1-4, as fast as a script can type them."""
    cluster = fresh_cluster()
    try:
        live = [m.client_url for n, m in cluster.members.items() if n != "member1"]
        ctl = cluster.etcdctl_args(live)
        started = time.perf_counter()
        listing = subprocess.run([*ctl, "member", "list"], capture_output=True, text=True, check=True).stdout
        member_id = next(line.split(",")[0] for line in listing.splitlines() if ", member1," in line)
        subprocess.run([*ctl, "member", "remove", member_id], capture_output=True, check=True)
        peer, client = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        added = subprocess.run([*ctl, "member", "add", "member4", f"--peer-urls={peer}"], capture_output=True,
                               text=True, check=True).stdout
        initial = next(line.split("=", 1)[1].strip('"') for line in added.splitlines()
                       if line.startswith("ETCD_INITIAL_CLUSTER="))
        env = {**os.environ, "ETCD_NAME": "member4", "ETCD_INITIAL_CLUSTER": initial,
               "ETCD_INITIAL_CLUSTER_STATE": "existing", "ETCD_INITIAL_ADVERTISE_PEER_URLS": peer,
               "ETCD_LISTEN_PEER_URLS": peer, "ETCD_ADVERTISE_CLIENT_URLS": client, "ETCD_LISTEN_CLIENT_URLS": client}
        argv = [a.format(name="member4", action="start") for a in launcher_argv(cluster.base_dir)]
        subprocess.run(argv, env=env, capture_output=True, check=True)
        while subprocess.run([*cluster.etcdctl_args([client]), "endpoint", "health"], capture_output=True).returncode:
            time.sleep(0.05)
        return time.perf_counter() - started
    finally:
        cluster.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    args = p.parse_args(argv)
    hand = by_hand()
    learner = asyncio.run(by_bot(no_learner=False))
    voting = asyncio.run(by_bot(no_learner=True))
    write(args.json, "Replacing a failed member", [
        row("replacement, bot with learner + promote (default)", learner, hand, "s", "runbook by hand with etcdctl"),
        row("replacement, bot with --no-learner", voting, hand, "s", "runbook by hand with etcdctl"),
    ], "The bot's time includes the membership re-check, a verified snapshot, waiting for a live leader, the "
       "learner's catch-up and promotion (default), and verifying every member healthy; by hand: member list, "
       "remove, add, start, wait until the new member reports healthy.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
