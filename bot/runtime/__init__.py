"""The runtime: the background tasks of one replica — the leadership loop, the upkeep (plan expiry, alert
rows, scheduled snapshots and drills) and the watch — started and stopped here, so the core runs the
same under Slack, from the CLI or in a test, and the Slack edge only wires its transports to it.

Importing this package registers every kind of plan with the engine (bot.ops.kinds).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

import bot.ops.kinds  # noqa: F401  (every kind of plan registered before a plan runs)
from bot.ops.context import BotContext
from bot.runtime.leader import lead
from bot.runtime.upkeep import upkeep_loop
from bot.watch.watcher import Watcher

log = logging.getLogger(__name__)
STOP_SECONDS = 15.0   # longer than any one call of a round (each has its own deadline)


class Runtime:
    """The background tasks of one replica over one context. `watch=False` leaves the watch out (a test, or
    the CLI acting when Slack is down); the context itself is opened and closed by its owner."""

    def __init__(self, ctx: BotContext, *, watch: bool = True, upkeep: bool = True):
        self.ctx = ctx
        self.watcher: Watcher | None = Watcher(ctx) if watch else None
        self._upkeep = upkeep
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> Runtime:
        ctx = self.ctx
        self._spawn(lead(ctx), "leadership")
        if self._upkeep:
            self._spawn(upkeep_loop(ctx), "upkeep")
        if self.watcher is not None:
            ctx.watch = self.watcher
            self._spawn(self.watcher.run(), "watch")
        return self

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=name))

    async def stop(self) -> None:
        """Cancel the background tasks (the newest first): the leadership loop last, so that closing the
        context afterwards steps down from a tenure nobody renews any more. A task that has not ended
        STOP_SECONDS after its cancellation is left behind with a log line: a stop never hangs."""
        for task in reversed(self._tasks):
            task.cancel()
            _, late = await asyncio.wait({task}, timeout=STOP_SECONDS)
            if late:
                log.error("background task did not stop after its cancellation; left behind",
                          extra={"ctx_task": task.get_name(), "ctx_seconds": STOP_SECONDS})
        self._tasks.clear()

    async def __aenter__(self) -> Runtime:
        return await self.start()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
