"""/readyz: can this bot do its job right now?

Every check is run and reported: Slack auth, a usable database (a real
write, and the bot's tables as this version expects them), and each
cluster's reachability. Slack auth and the database decide readiness; etcd
does not: in an etcd outage the bot is what tells the incident channel
"prod is unreachable", and a failing readiness probe would take the only
replica out of its Service (HTTP mode) exactly then. etcd reachability is
also exported as a metric, for alerting. Results are cached briefly.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from slack_sdk.web.async_client import AsyncWebClient

from bot.config import ClusterConfig
from bot.domain.errors import EtcdError
from bot.ops.context import BotContext

CACHE_SECONDS = 5.0
SLACK_AUTH_SECONDS = 60.0


@dataclass
class Readiness:
    ready: bool
    checks: dict[str, str]


class ReadinessProbe:
    def __init__(self, ctx: BotContext, web: AsyncWebClient):
        self.ctx, self.web = ctx, web
        self._cached: tuple[float, Readiness] | None = None
        self._slack_ok_at = 0.0
        self._lock = asyncio.Lock()

    async def check(self) -> Readiness:
        async with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < CACHE_SECONDS:
                return self._cached[1]
            result = await self._check()
            self._cached = (time.monotonic(), result)
            return result

    async def _check(self) -> Readiness:
        checks: dict[str, str] = {}
        ready = True
        try:
            await self.ctx.store.probe()  # also re-checks the tables when another program changed them
            checks["database"] = "ok"
        except Exception as e:  # the bot keeps serving: commands answer that the store is unavailable
            checks["database"] = f"unavailable: {e}"
            ready = False
        if time.monotonic() - self._slack_ok_at > SLACK_AUTH_SECONDS:
            try:
                await self.web.auth_test()
                self._slack_ok_at = time.monotonic()
                checks["slack"] = "ok"
            except Exception as e:
                checks["slack"] = f"auth.test failed: {type(e).__name__}"
                ready = False
        else:
            checks["slack"] = "ok"

        checks["role"] = "leader" if self.ctx.is_leader() else "follower"  # informs only: a follower serves Slack

        async def one(cluster: ClusterConfig) -> tuple[str, str]:
            try:
                members = await self.ctx.client(cluster).member_list()
                return cluster.name, f"ok ({len(members)} members)"
            except EtcdError as e:
                return cluster.name, f"unreachable: {e}"

        results = await asyncio.gather(*(one(c) for c in self.ctx.config.clusters))
        for name, state in results:
            checks[f"etcd:{name}"] = state
            self.ctx.metrics.cluster_reachable.labels(cluster=name).set(1 if state.startswith("ok") else 0)
        return Readiness(ready, checks)
