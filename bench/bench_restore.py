"""A restore's wall time: the bot (from the second approval to `done`) against
the same procedure scripted by hand with etcdutl and etcd, on one 3-member
cluster holding a database of at least 300 MB; and the restore drill's time
against a drill scripted by hand, on the same snapshot file.

Why: the bot adds safety to a restore (the snapshot's sha256, trailer, bbolt
structure and status checked against the catalog, the quorum gate, every
member stopped and checked, old data moved aside, HashKV compared on every
member at the end); the issue's goal is at most 1.2x the scripted procedure.

By hand (timed from the same point, after the same two members died):
`etcdutl snapshot status` on the file, stop the last member, on each member
(at once) move the data aside and `etcdutl snapshot restore` with a new token,
start every member (at once, through the same launcher), wait until every
member reports healthy, `etcdctl endpoint hashkv` on all.

    .venv/bin/python bench/bench_restore.py [--size-mb 310] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_snapshot_save import MB, BigCluster, db_size, fill

from bot.config import load_config
from bot.etcd.binaries import find_binary
from bot.server import BotServer
from bot.settings import SlackSettings
from bot.testing.cluster import LocalCluster, free_port
from bot.testing.slack import SlackStandIn
from bot.testing.workspace import (
    CHANNEL,
    CHANNELS,
    LEAD,
    LEAD2,
    ONCALL,
    USERGROUPS,
    USERS,
    SlackSecrets,
    cluster_table,
    launcher_argv,
    write_config,
)
from common import row, write  # (also puts the repository on sys.path)

TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", 900))


async def by_bot(cluster: LocalCluster, work: Path) -> tuple[float, float, str]:
    """(restore seconds, drill seconds, the snapshot's path); leaves the cluster restored and running."""
    creds = SlackSecrets()
    table = cluster_table("prod", cluster, launcher={"kind": "command", "argv": launcher_argv(cluster.base_dir),
                                                     "timeout_seconds": TIMEOUT})
    config = load_config(write_config(work, [table], approval={"approvers": [LEAD, LEAD2]}))
    async with SlackStandIn(bot_token=creds.bot_token, signing_secret=creds.signing_secret, users=USERS,
                            channels=CHANNELS, usergroups=USERGROUPS) as slack:
        settings = SlackSettings(bot_token=creds.bot_token, signing_secret=creds.signing_secret, api_url=slack.api_url)
        async with BotServer(config, settings) as bot:
            slack.bot_url = bot.url

            async def say(text: str, match: str) -> float:
                start, began = len(slack.messages), time.perf_counter()
                await slack.send_command(text, user_id=ONCALL, channel_id=CHANNEL)
                try:
                    await slack.wait_for_message(lambda m: m.text.startswith(match), after=start, timeout=TIMEOUT,
                                                 what=f"/etcd {text}")
                except TimeoutError:
                    seen = [m.text for m in slack.messages]
                    raise SystemExit(f"/etcd {text}: no answer; the channel: {seen}") from None
                return time.perf_counter() - began

            await say("status", "cluster prod")   # records the membership
            await say("snapshot", "Snapshot of prod")
            drill = await say("drill", ":white_check_mark: Restore drill")
            path = (await bot.ctx.store.snapshots("prod"))[0].path
            cluster.kill("member1")
            cluster.kill("member2")
            start = len(slack.messages)
            await slack.send_command("restore", user_id=ONCALL, channel_id=CHANNEL)
            plan = await slack.wait_for_message(lambda m: m.text.startswith("Plan "), after=start, timeout=60)
            await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction="white_check_mark")
            await slack.wait_for(lambda: any("Approval 1 of 2" in m.text for m in slack.messages), timeout=60)
            began = time.perf_counter()
            await slack.react(user=LEAD2, channel=CHANNEL, ts=plan.ts, reaction="white_check_mark")
            await slack.wait_for(lambda: any(" is done" in m.text or m.text.startswith(":x: Plan")
                                             for m in slack.messages),
                                 timeout=TIMEOUT, what="the restore to finish")
            took = time.perf_counter() - began
            if not any(" is done" in m.text for m in slack.messages):
                raise SystemExit("the restore plan failed: " + next(m.text for m in slack.messages
                                                                    if m.text.startswith(":x: Plan")))
            return took, drill, path


def by_hand(cluster: LocalCluster, snapshot: str) -> float:
    etcdutl = str(find_binary("etcdutl"))
    members = cluster.members
    cluster.kill("member1")
    cluster.kill("member2")
    began = time.perf_counter()
    subprocess.run([etcdutl, "snapshot", "status", snapshot], check=True, capture_output=True)
    cluster.stop("member3")
    token = "by-hand-" + secrets.token_hex(4)
    initial = ",".join(f"{n}={m.peer_url}" for n, m in members.items())
    restores = []
    for n, m in members.items():
        Path(m.data_dir).rename(f"{m.data_dir}.by-hand-{token}")
        restores.append(subprocess.Popen([etcdutl, "snapshot", "restore", snapshot, "--name", n, "--initial-cluster",
                                          initial, "--initial-cluster-token", token, "--initial-advertise-peer-urls",
                                          m.peer_url, "--data-dir", m.data_dir], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL))
    assert [p.wait(TIMEOUT) for p in restores] == [0] * len(restores)
    starts = []
    for n, m in members.items():
        env = {**os.environ, "ETCD_NAME": n, "ETCD_INITIAL_CLUSTER": initial, "ETCD_INITIAL_CLUSTER_STATE": "new",
               "ETCD_INITIAL_ADVERTISE_PEER_URLS": m.peer_url, "ETCD_LISTEN_PEER_URLS": m.peer_url,
               "ETCD_ADVERTISE_CLIENT_URLS": m.client_url, "ETCD_LISTEN_CLIENT_URLS": m.client_url}
        argv = [a.format(name=n, action="start") for a in launcher_argv(cluster.base_dir)]
        starts.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    assert [p.wait(TIMEOUT) for p in starts] == [0] * len(starts)
    urls = [m.client_url for m in members.values()]
    deadline = time.monotonic() + TIMEOUT
    while (health := subprocess.run([*cluster.etcdctl_args(urls), "endpoint", "health"], capture_output=True,
                                    text=True)).returncode:
        if time.monotonic() > deadline:
            raise SystemExit(f"by hand: the members did not become healthy: {health.stdout} {health.stderr}")
        time.sleep(0.05)
    subprocess.run([*cluster.etcdctl_args(urls), "endpoint", "hashkv"], check=True, capture_output=True)
    return time.perf_counter() - began


def drill_by_hand(snapshot: str) -> float:
    """etcdutl restore into a scratch dir, boot one etcd on loopback, count the keys, stop it, remove it."""
    etcd, etcdutl, etcdctl = (str(find_binary(n)) for n in ("etcd", "etcdutl", "etcdctl"))
    began = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bench-drill-"))
    peer, client = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    try:
        subprocess.run([etcdutl, "snapshot", "restore", snapshot, "--name", "d", "--initial-cluster", f"d={peer}",
                        "--initial-advertise-peer-urls", peer, "--data-dir", str(scratch / "data")], check=True,
                       capture_output=True)
        proc = subprocess.Popen([etcd, "--name", "d", "--data-dir", str(scratch / "data"), "--listen-client-urls",
                                 client, "--advertise-client-urls", client, "--listen-peer-urls", peer,
                                 "--initial-advertise-peer-urls", peer, "--initial-cluster", f"d={peer}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + TIMEOUT
            while subprocess.run([etcdctl, f"--endpoints={client}", "get", "", "--prefix", "--count-only", "-w",
                                  "fields"], capture_output=True).returncode:
                if time.monotonic() > deadline:
                    raise SystemExit("drill by hand: the restored etcd did not serve")
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=310, help="MB of values to write (default 310: a DB over 300 MB)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-restore-"))
    try:
        with BigCluster(3, base_dir=work / "cluster") as cluster:
            print(f"filling a 3-member cluster with {args.size_mb} MB ...", file=sys.stderr)
            asyncio.run(fill(cluster.endpoints, args.size_mb * MB, 1024 * 1024))
            size = db_size(cluster)
            bot_s, drill_s, snapshot = asyncio.run(by_bot(cluster, work))
            print(f"bot: restore {bot_s:.2f} s, drill {drill_s:.2f} s", file=sys.stderr)
            hand_s = by_hand(cluster, snapshot)
            hand_drill_s = drill_by_hand(snapshot)
            print(f"by hand: restore {hand_s:.2f} s, drill {hand_drill_s:.2f} s", file=sys.stderr)
        write(args.json, "Restoring a cluster from a snapshot", [
            row(f"restore 3 members from a {size / MB:,.0f} MB snapshot (second approval to done)", bot_s, hand_s, "s",
                "the same procedure scripted with etcdutl and etcd"),
            row("restore drill of the same snapshot (command to posted result)", drill_s, hand_drill_s, "s",
                "etcdutl restore + one etcd booted + key count, scripted"),
        ], "The bot's restore includes verifying the snapshot (sha256 of the file, trailer, bbolt walk and status "
           "against the catalog), the quorum re-check, stopping and checking every member, moving the old data "
           "aside, and comparing HashKV on every member; by hand: etcdutl snapshot status, stop, restore x3, "
           "start x3, wait healthy, etcdctl endpoint hashkv. Goal for the restore: ratio <= 1.2. The bot's drill "
           "also verifies the snapshot (sha256 and bbolt walk) before restoring it.")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
