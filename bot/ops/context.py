"""What every handler needs, built whole once at start-up: the configuration,
the store, the notifier and access rules (both backed by the chat platform,
which the core never sees), one etcd client per cluster, the background
tasks (plan executions) the bot is running, this replica's standing as
leader (bot.ops.leadership; the runtime's leadership loop keeps it up to date),
and the clock the background loops keep (bot.domain.clock; a test's moves)."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bot.config import ClusterConfig, Config
from bot.domain.clock import SYSTEM_CLOCK, Clock
from bot.domain.cluster import ClusterHealth
from bot.domain.errors import EtcdError
from bot.etcd.client import EtcdClient, client_for
from bot.etcd.health import check_cluster
from bot.ops.access import Access
from bot.ops.leadership import LEASE, Leadership
from bot.ops.metrics import Metrics
from bot.ops.notify import Directory, Notifier
from bot.store.backends import open_store
from bot.store.base import Store, StoreError

if TYPE_CHECKING:
    from bot.domain.snapshot import RunningSnapshot
    from bot.output.model import AlertView

log = logging.getLogger(__name__)


class WatchState(Protocol):
    """What the watch knows now that the store does not (bot/watch implements it, and the runtime sets
    it as `ctx.watch`: commands reach the watcher without the core importing it or Slack)."""

    def held(self, cluster: str, now: float) -> list[AlertView] | None:
        """The conditions seen but not posted, each with why (`AlertView.held`); None when this
        replica does not watch (another replica leads)."""

    def received(self, cluster: str) -> None:
        """Alertmanager's alerts of `cluster` changed in the store (this replica received them): look now."""


@dataclass
class BotContext:
    config: Config
    store: Store
    notifier: Notifier
    access: Access
    secret_values: tuple[str, ...] = ()     # never to appear in output (tokens, passwords)
    clients: dict[str, EtcdClient] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    metrics: Metrics = field(default_factory=Metrics)
    running_snapshots: dict[str, RunningSnapshot] = field(default_factory=dict)  # by cluster: one at a time
    running: set[str] = field(default_factory=set)  # ids of the plans this replica is executing
    watch: WatchState | None = None  # the watcher (set by the runtime that runs one)
    clock: Clock = SYSTEM_CLOCK      # the watch's, the upkeep's and the Slack retries' time
    leadership: Leadership = field(init=False)

    def __post_init__(self) -> None:
        replicas = self.config.replicas
        self.leadership = Leadership(replicas.replica_id or f"{socket.gethostname()}-{os.getpid()}",
                                     replicas.lease_seconds)

    @classmethod
    async def open(cls, config: Config, notifier: Notifier, directory: Directory,
                   secrets: tuple[str, ...] = (), clock: Clock = SYSTEM_CLOCK) -> BotContext:
        """Open the store and wire everything; the one way a context is made."""
        store = await open_store(config)
        try:
            await store.continue_audit_chain()
        except StoreError:
            await store.close()
            raise
        return cls(config, store, notifier, Access(directory), secrets, clock=clock)

    def is_leader(self) -> bool:
        """Whether this replica holds the executor lease: only the leader runs plans, schedules and watches."""
        return self.leadership.is_leader()

    def client(self, cluster: ClusterConfig) -> EtcdClient:
        """One long-lived client per cluster, so channels are reused."""
        client = self.clients.get(cluster.name)
        if client is None:
            client = self.clients[cluster.name] = client_for(cluster)
            counter = self.metrics.etcd_errors

            def count(err: EtcdError, name: str = cluster.name) -> None:
                counter.labels(cluster=name, kind=type(err).__name__).inc()
            client.on_error = count
        return client

    async def check(self, cluster: ClusterConfig) -> ClusterHealth:
        """check_cluster for a status or plan check. The client falls back to the
        client URLs of the last membership the bot recorded (so a restarted bot
        still reaches a cluster whose configured endpoints all went away), and
        the membership seen is recorded."""
        client, store = self.client(cluster), self.store
        try:
            last = await store.last_membership(cluster.name) if not client.learned else None
        except StoreError as e:  # a read stands without the fallback memory
            log.warning("membership memory unavailable", extra={"ctx_cluster": cluster.name, "ctx_error": str(e)})
            last = None
        if last is not None:
            client.learn(last.members)
        health = await check_cluster(client, cluster.name)
        try:
            await store.record_membership(cluster.name, [h.member for h in health.members])
        except StoreError as e:
            log.warning("membership not recorded", extra={"ctx_cluster": cluster.name, "ctx_error": str(e)})
        return health

    def secrets(self) -> list[str]:
        return list(self.secret_values) + self.config.secrets()

    def track_current_task(self) -> None:
        """Count the running listener as in-flight work that shutdown waits for."""
        task = asyncio.current_task()
        if task is not None and task not in self.tasks:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run work in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception(), extra={"ctx_task": task.get_name()})

    async def close(self, grace: float = 5.0) -> None:
        """Step down as leader, let in-flight work finish for `grace` seconds, then
        cancel it, and release the lease: a plan stopped or cancelled stays
        `running` for the next leader (reported interrupted, or resumed)."""
        stepping_down = self.leadership.lost()  # a running plan starts no further step; the next leader resumes it
        current = asyncio.current_task()
        pending = [t for t in self.tasks if t is not current]
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                _, late = await asyncio.wait(still, timeout=grace)
                for task in late:
                    log.error("in-flight work did not stop after its cancellation; left behind",
                              extra={"ctx_task": task.get_name()})
        if stepping_down:
            await self._release_lease()
        for client in self.clients.values():
            await client.close()
        self.clients.clear()
        await self.store.close()

    async def _release_lease(self) -> None:
        """On a clean stop, once the step in flight has ended: give the lease up so
        another replica takes over at once rather than after the ttl."""
        try:
            await self.store.release_lease(LEASE, self.leadership.replica_id)
        except StoreError as e:
            log.warning("lease not released; it expires by itself", extra={"ctx_error": str(e)})
