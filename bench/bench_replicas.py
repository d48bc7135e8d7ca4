"""Several replicas: failover time, and the ack latency two replicas give.

Why: a second replica is there so the bot survives the loss of its node during
an incident. (1) Failover: a replacement is held between its remove and add
steps, its leader is SIGKILLed, and the time until the next step runs (on
whichever replica leads next) is measured from the step log. Two replicas on
PostgreSQL against its peer, one replica on SQLite restarted at once (as if its
supervisor restarted it with no delay, and its plan resumed with no person in
the loop): the new leader must wait for the dead one's lease to lapse either
way. (2) Ack latency under 200 concurrent `/etcd status`, sent round-robin to
two replicas, against one replica in the same run (same database).

    .venv/bin/python bench/bench_replicas.py [--requests 200] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bot.config import load_config
from bot.ops.leadership import LEASE
from bot.store.backends import open_store
from bot.store.base import Store
from bot.testing.cluster import LocalCluster, free_port
from bot.testing.postgres import PASSWORD_ENV, LocalPostgres
from bot.testing.slack import SlackStandIn
from bot.testing.workspace import (
    CHANNEL,
    CHANNELS,
    LEAD,
    ONCALL,
    USERS,
    BotProcess,
    SlackSecrets,
    cluster_table,
    write_config,
)
from common import percentile, row, write  # (also puts the repository and tests/ on sys.path)
from helpers import announcing

SETTLE = 6.0  # etcd 3.5 accepts a member add only after its leader has seen every peer for 5 s


def _stand_in(creds: SlackSecrets) -> SlackStandIn:
    return SlackStandIn(bot_token=creds.bot_token, signing_secret=creds.signing_secret, users=USERS,
                        channels=CHANNELS)


async def failover(pg: LocalPostgres | None) -> float:
    """Seconds from SIGKILL of the leader to the start of the next step by the new leader."""
    creds = SlackSecrets()
    cluster = await asyncio.to_thread(LocalCluster(3).start)
    bots: list[BotProcess] = []
    try:
        await asyncio.sleep(SETTLE)
        cluster.kill("member1")
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            top: dict[str, Any]
            if pg is not None:
                top = {"database": pg.create_database(), "database_password_env": PASSWORD_ENV}
            else:  # a restarted single replica resumes by itself too, so only the restart is compared
                top = {"replicas": {"resume_on_takeover": True}}
            config = write_config(directory, [cluster_table("prod", cluster)], **top)
            env = pg.env() if pg is not None else {}
            os.environ.update(env)  # this process reads the step log with the bots' configuration
            async with _stand_in(creds) as slack:
                bots = [BotProcess(config, slack.api_url, creds, directory / f"bot-{i}.log", env=env)
                        for i in range(2 if pg is not None else 1)]
                await asyncio.gather(*(asyncio.to_thread(b.start) for b in bots))
                store = await open_store(load_config(config))
                try:
                    return await _kill_between_remove_and_add(slack, store, bots, config, directory, env)
                finally:
                    await store.close()
    finally:
        await asyncio.gather(*(asyncio.to_thread(b.stop) for b in bots))
        cluster.close()


async def _kill_between_remove_and_add(slack: SlackStandIn, store: Store, bots: list[BotProcess], config: Path,
                                       directory: Path, env: dict[str, str]) -> float:
    slack.fail_next("chat.update", status=429, retry_after=300, match=announcing(3))  # holds it before the add
    peer, client = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    await slack.send_command(f"replace member1 member4 {peer} --client-url {client}", user_id=ONCALL,
                             channel_id=CHANNEL, to=bots[0].url)
    plan = await slack.wait_for_message(lambda m: m.text.startswith("Plan "), timeout=30)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction="white_check_mark", to=bots[-1].url)
    await slack.wait_for(lambda: any(c.status == 429 for c in slack.calls_to("chat.update")), timeout=120,
                         what="the add step to be announced")
    record = await store.plan_by_message(CHANNEL, plan.ts)
    assert record is not None
    lease = await store.lease(LEASE)
    leader = next(b for b in bots if lease and b.proc and lease.holder.endswith(f"-{b.proc.pid}"))
    killed_at = time.time()
    leader.kill()
    if len(bots) == 1:  # the supervisor restarts it at once
        bots[0] = BotProcess(config, slack.api_url, leader.creds, directory / "bot-restarted.log", env=env)
        await asyncio.to_thread(bots[0].start)

    async def resumed() -> float | None:
        step = next((s for s in await store.steps(record.id) if s.idx == 3), None)
        return step.started_at - killed_at if step and step.started_at > killed_at else None
    deadline = time.monotonic() + 120
    while (took := await resumed()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError("no replica resumed the plan within 120 s")
        await asyncio.sleep(0.05)
    await slack.wait_for(lambda: any(" is done" in m.text for m in slack.messages), timeout=300,
                         what="the plan to finish")
    return took


async def acks(pg: LocalPostgres, requests: int) -> tuple[list[float], list[float]]:
    """Ack times of `requests` concurrent commands: to one replica, then round-robin to two."""
    creds = SlackSecrets()
    with LocalCluster(3) as cluster, tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        config = write_config(directory, [cluster_table("prod", cluster)], database=pg.create_database(),
                              database_password_env=PASSWORD_ENV)
        async with _stand_in(creds) as slack:
            bots = [BotProcess(config, slack.api_url, creds, directory / f"bot-{i}.log", env=pg.env())
                    for i in range(2)]
            try:
                await asyncio.to_thread(bots[0].start)
                one = await _burst(slack, bots[:1], requests)
                await asyncio.to_thread(bots[1].start)
                two = await _burst(slack, bots, requests)
            finally:
                await asyncio.gather(*(asyncio.to_thread(b.stop) for b in bots))
    return one, two


async def _burst(slack: SlackStandIn, bots: list[BotProcess], requests: int) -> list[float]:
    async def one(i: int) -> float:
        d = await slack.send_command("status", user_id=ONCALL, channel_id=CHANNEL, to=bots[i % len(bots)].url)
        if d.status != 200:
            raise RuntimeError(f"HTTP {d.status}: {d.body} {d.error}")
        return d.elapsed

    for i in range(10 * len(bots)):  # warm-up: connections, auth.test cache
        await one(i)
    times = list(await asyncio.gather(*(one(i) for i in range(requests))))
    expected = requests + 10 * len(bots)
    with contextlib.suppress(TimeoutError):  # the next burst starts on a quiet bot
        await slack.wait_for(lambda: len(slack.calls_to("chat.postMessage")) >= expected, timeout=120)
    answered = len(slack.calls_to("chat.postMessage"))
    if answered < expected:
        print(f"only {answered} of {expected} commands were answered within 120 s", file=sys.stderr)
    slack.calls.clear()
    return times


async def run(requests: int) -> list[dict[str, Any]]:
    with LocalPostgres() as pg:
        os.environ.update(pg.env())
        one, two = await acks(pg, requests)
        ha = await failover(pg)
    single = await failover(None)
    ms = 1000.0
    return [
        row("failover: SIGKILL of the leader to the next step run (2 replicas, PostgreSQL, lease 10 s)", ha, single,
            "s", "1 replica on SQLite restarted at once"),
        row(f"ack latency p99, {requests} concurrent commands round-robin to 2 replicas", percentile(two, 99) * ms,
            percentile(one, 99) * ms, "ms", f"1 replica, {requests} concurrent commands"),
        row("ack latency p50, same", percentile(two, 50) * ms, percentile(one, 50) * ms, "ms",
            f"1 replica, {requests} concurrent commands"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args(argv)
    write(args.json, "Several replicas", asyncio.run(run(args.requests)),
          "Failover is read from the step log: the add step's start by the new leader minus the time of the SIGKILL. "
          "A dead leader's lease must lapse (lease_seconds = 10, tried every 10/3 s) before anyone takes it, so both "
          "are bounded by 13.3 s; the issue's goal is 15 s. A restarted single replica has a new replica id "
          "(hostname-pid) and waits for the lapse too, and it needs its node back; the second replica does not. "
          "Acks are measured by the Slack stand-in, from sending the signed request to the HTTP answer.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
