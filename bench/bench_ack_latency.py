"""Slash-command acknowledgement latency while one etcd member is dead.

Why: Slack gives a slash command 3 s; the bot acknowledges before it talks to
etcd, so a dead member must not slow the ack. 200 signed `/etcd status`
requests, 20 in flight, go to the bot running as its own process (as in
production); its peer is a bare slack-bolt app that only acks, measured the
same way in the same run, so the ratio is the bot's own overhead.

    .venv/bin/python bench/bench_ack_latency.py [--requests 200] [--concurrency 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

from bot.testing.cluster import LocalCluster, free_port
from bot.testing.slack import SlackStandIn
from bot.testing.workspace import (
    CHANNEL,
    CHANNELS,
    ONCALL,
    USERS,
    BotProcess,
    SlackSecrets,
    cluster_table,
    write_config,
)
from common import percentile, row, write  # (also puts the repository on sys.path)

BARE_BOLT = '''
import os, sys
from aiohttp import web
from slack_bolt.async_app import AsyncApp
from slack_bolt.adapter.aiohttp import to_bolt_request, to_aiohttp_response
from slack_sdk.web.async_client import AsyncWebClient
app = AsyncApp(client=AsyncWebClient(token=os.environ["SLACK_BOT_TOKEN"], base_url=os.environ["SLACK_API_URL"]),
               signing_secret=os.environ["SLACK_SIGNING_SECRET"])
@app.command("/etcd")
async def etcd(ack):
    await ack()
async def events(request):
    return await to_aiohttp_response(await app.async_dispatch(await to_bolt_request(request)))
async def healthz(request):
    return web.Response(text="ok")
w = web.Application(); w.router.add_post("/slack/events", events); w.router.add_get("/healthz", healthz)
web.run_app(w, host="127.0.0.1", port=int(sys.argv[1]), print=None)
'''


async def measure(slack: SlackStandIn, url: str, requests: int, concurrency: int) -> list[float]:
    slack.bot_url = url
    gate = asyncio.Semaphore(concurrency)

    async def one() -> float:
        async with gate:
            d = await slack.send_command("status", user_id=ONCALL, channel_id=CHANNEL)
            if d.status != 200:
                raise RuntimeError(f"HTTP {d.status}: {d.body}")
            return d.elapsed

    for _ in range(10):  # warm-up: connections, auth.test cache
        await one()
    return list(await asyncio.gather(*(one() for _ in range(requests))))


async def run(requests: int, concurrency: int) -> list[dict[str, Any]]:
    creds = SlackSecrets()
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(3) as cluster:
        cluster.kill("member1")
        directory = Path(tmp)
        config = write_config(directory, [cluster_table("prod", cluster)])
        async with SlackStandIn(bot_token=creds.bot_token, signing_secret=creds.signing_secret,
                                users=USERS, channels=CHANNELS) as slack:
            bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, directory / "bot.log").start)
            try:
                ours = await measure(slack, bot.url, requests, concurrency)
            finally:
                await asyncio.to_thread(bot.stop)
            bare = BotProcess(config, slack.api_url, creds, directory / "bare.log", port=free_port())
            bare.argv = [sys.executable, "-c", BARE_BOLT, str(bare.port)]
            await asyncio.to_thread(bare.start)
            try:
                peer = await measure(slack, bare.url, requests, concurrency)
            finally:
                await asyncio.to_thread(bare.stop)
    ms = 1000.0
    return [row(f"ack latency p50 ({requests} requests, {concurrency} in flight, 1 of 3 members dead)",
                percentile(ours, 50) * ms, percentile(peer, 50) * ms, "ms", "bare slack-bolt ack"),
            row("ack latency p99", percentile(ours, 99) * ms, percentile(peer, 99) * ms, "ms", "bare slack-bolt ack"),
            row("ack latency max", max(ours) * ms, max(peer) * ms, "ms", "bare slack-bolt ack")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args(argv)
    write(args.json, "Slash-command ack latency", asyncio.run(run(args.requests, args.concurrency)),
          "Measured by the Slack stand-in from sending the signed request to the HTTP answer; the bot and the "
          "bare app each run as their own process.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
