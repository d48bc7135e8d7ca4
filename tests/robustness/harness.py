"""The world one seed runs in, and the nemesis that breaks it.

Real parts only: etcd members each on a host of their own (NetnsCluster), the bot as one or two
real processes (`etcd-chatops run --http`, SQLite or PostgreSQL), the Slack stand-in in this
process, moto's S3 behind a proxy that can refuse or stall, the snapshot directory on a small
tmpfs that can be filled, and a client writing and reading keys all along.

The harness keeps the ground truth the invariants are judged against: which member it made
unhealthy when (`Truth`), every write the client saw acknowledged with its revision, every read,
and the membership etcd itself reported over time.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc

from bot.config import load_config
from bot.domain.errors import EtcdError
from bot.etcd.client import EtcdClient
from bot.ops.leadership import LEASE
from bot.store.backends import open_store
from bot.store.base import Store, StoreError
from bot.testing.cluster import QUOTA_ARGS, ClusterError, fill_until_nospace
from bot.testing.netbed import Link, NetnsCluster
from bot.testing.postgres import PASSWORD_ENV, LocalPostgres
from bot.testing.proxy import FaultyProxy
from bot.testing.s3 import MotoS3
from bot.testing.slack import Delivery, Message, SlackStandIn
from bot.testing.workspace import (
    CHANNEL,
    LEAD,
    LEAD2,
    LEADS_GROUP,
    ONCALL,
    BotProcess,
    SlackSecrets,
    cluster_table,
    write_config,
)
from helpers import is_plan_message
from robustness.schedule import Fault, Kind, Operation, Schedule

log = logging.getLogger("robustness")

AUDIT_KEY_ENV = "ETCD_CHATOPS_ROBUSTNESS_AUDIT_KEY"
LEASE_SECONDS = 6          # a dead or paused leader is replaced within about 8 s
HEALTH_TIMEOUT = 1.0       # the cluster's timeout_seconds: a black-holed member costs one second
TMPFS_SIZE = "96m"         # the snapshot directory's filesystem: room for a few NOSPACE-sized snapshots
OK = "white_check_mark"
APPROVAL = {"approvers": [LEAD, ONCALL], "approver_groups": [LEADS_GROUP], "ttl_minutes": 30, "reaction": OK,
            "reject_reaction": "x", "restore": {"approvals_needed": 2}}
# The Web API methods the bot calls: a Slack outage fails them all.
SLACK_METHODS = ("chat.postMessage", "chat.update", "chat.postEphemeral", "chat.getPermalink", "chat.delete",
                 "reactions.add", "reactions.remove", "users.info", "usergroups.users.list", "conversations.info",
                 "conversations.open")
NETWORK_FAULTS = (Kind.PARTITION, Kind.PEER_CUT, Kind.LATENCY)


# ---------------------------------------------------------------- ground truth

@dataclass
class Truth:
    """Which members the harness made unhealthy, and when (wall clock, as the bot's store records steps).
    A member is healthy while no fault of the harness holds it: running, not paused, not cut off."""

    down: dict[str, set[str]] = field(default_factory=dict)
    events: list[tuple[float, str, bool]] = field(default_factory=list)

    def set(self, member: str, tag: str, on: bool) -> None:
        tags = self.down.setdefault(member, set())
        before = not tags
        (tags.add if on else tags.discard)(tag)
        if before != (not tags):
            self.events.append((time.time(), member, not tags))

    def merged(self, events: list[tuple[float, str, bool]]) -> Truth:
        """This record with more changes in it (what the bot itself did to the members, say)."""
        return Truth(events=sorted(self.events + events))

    def healthy_at(self, member: str, at: float) -> bool:
        state = True
        for t, m, healthy in self.events:
            if t > at:
                break
            if m == member:
                state = healthy
        return state

    def healthy_throughout(self, member: str, start: float, end: float) -> bool:
        """Healthy at `start` and never made unhealthy until `end`."""
        return self.healthy_at(member, start) and not any(
            m == member and not healthy and start <= t <= end for t, m, healthy in self.events)

    def quorum_throughout(self, voters: list[str], start: float, end: float) -> bool:
        """A majority of `voters` healthy at every moment from `start` to `end`."""
        moments = [start] + [t for t, _, _ in self.events if start <= t <= end]
        need = len(voters) // 2 + 1
        return all(sum(self.healthy_at(v, at) for v in voters) >= need for at in moments)


@dataclass(frozen=True)
class Write:
    key: str
    revision: int
    sent: float
    acked: float


@dataclass(frozen=True)
class Read:
    key: str
    found: bool
    started: float
    ended: float
    revision: int  # the header's: the store's revision the read saw


@dataclass
class Injected:
    """A fault as it ran: when it struck and healed (wall clock), and what it did."""

    fault: Fault
    struck: float = 0.0
    healed: float = 0.0
    note: str = ""
    skipped: bool = False  # nothing to strike (the member was down already, no replica of that role lived)

    def skip(self, why: str) -> None:
        self.note, self.skipped = why, True


# ---------------------------------------------------------------- the client

async def _range(client: EtcdClient, key: bytes, timeout: float) -> tuple[bool, int]:
    """A linearizable read of one key through whichever member answers: (found, header revision)."""
    async def fn(ch: grpc.aio.Channel, md: Any, t: float) -> tuple[bool, int]:
        r = await rpc.KVStub(ch).Range(rpc.RangeRequest(key=key, count_only=True), timeout=t, metadata=md)
        return int(r.count) > 0, int(r.header.revision)
    return await client.failover(fn, timeout)


async def all_keys(client: EtcdClient, prefix: bytes, timeout: float = 5.0) -> tuple[set[str], int]:
    """Every key under `prefix` (a linearizable read) and the revision it was read at."""
    async def fn(ch: grpc.aio.Channel, md: Any, t: float) -> tuple[set[str], int]:
        r = await rpc.KVStub(ch).Range(rpc.RangeRequest(key=prefix, range_end=prefix[:-1] + bytes([prefix[-1] + 1]),
                                                        keys_only=True), timeout=t, metadata=md)
        return {kv.key.decode() for kv in r.kvs}, int(r.header.revision)
    return await client.failover(fn, timeout)


class _Loop(ABC):
    """A task beside the seed's operation, started and stopped with it: `_run` ends once `_stop` is set."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=type(self).__name__.lower())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    @abstractmethod
    async def _run(self) -> None:
        """The loop itself."""


class Workload(_Loop):
    """Writes a new key every few tens of milliseconds and reads back one it saw acknowledged, recording
    each acknowledged write with its revision and each read with what it found."""

    def __init__(self, endpoints: list[str], prefix: str):
        self.endpoints, self.prefix = endpoints, prefix
        self.writes: list[Write] = []
        self.reads: list[Read] = []
        self.errors: Counter[str] = Counter()
        self.writing = True  # off while a restore runs: the runbook stops every kube-apiserver first
        super().__init__()

    async def _run(self) -> None:
        n = 0
        async with EtcdClient(self.endpoints, timeout=1.0) as client:
            while not self._stop.is_set():
                n += 1
                key = f"{self.prefix}{n:06d}"
                sent = time.time()
                try:
                    if self.writing:
                        revision = await client.put(key.encode(), b"v", timeout=1.0)
                        self.writes.append(Write(key, revision, sent, time.time()))
                except (EtcdError, TimeoutError) as e:
                    self.errors[type(e).__name__] += 1
                if n % 3 == 0 and self.writes:
                    target = self.writes[(n * 7919) % len(self.writes)]  # deterministic, spread over the history
                    started = time.time()
                    try:
                        found, revision = await _range(client, target.key.encode(), 1.0)
                        self.reads.append(Read(target.key, found, started, time.time(), revision))
                    except (EtcdError, TimeoutError) as e:
                        self.errors[f"read {type(e).__name__}"] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.03)


class Monitor(_Loop):
    """The membership etcd reports, twice a second: every member ID ever seen, and when."""

    def __init__(self, endpoints: Callable[[], list[str]]):
        self.endpoints = endpoints
        self.seen: dict[int, tuple[str, float, float]] = {}  # id -> (name, first seen, last seen)
        self.lists: list[tuple[float, frozenset[int]]] = []
        self.restoring: Callable[[], Awaitable[None]] | None = None  # called each round too
        super().__init__()

    async def sample(self) -> None:
        async with EtcdClient(self.endpoints(), timeout=1.0) as client:
            with contextlib.suppress(EtcdError, TimeoutError):
                members = await client.member_list(timeout=1.0)
                now = time.time()
                self.lists.append((now, frozenset(m.id for m in members)))
                for m in members:
                    name, first, _ = self.seen.get(m.id, (m.name, now, now))
                    self.seen[m.id] = (m.name or name, first, now)

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.sample()
            if self.restoring is not None:
                await self.restoring()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.5)


# ---------------------------------------------------------------- the world

class World:
    """Everything one seed runs: started by `start()`, broken by `inject()`, mended by `heal_all()`,
    removed by `close()` (also after a failure)."""

    def __init__(self, schedule: Schedule, slack: SlackStandIn, creds: SlackSecrets, s3: MotoS3,
                 pg: LocalPostgres | None, bin_dir: Path):
        self.s, self.slack, self.creds, self.s3, self.pg, self.bin_dir = schedule, slack, creds, s3, pg, bin_dir
        self.root = Path(tempfile.mkdtemp(prefix=f"etcd-chatops-robust-{schedule.seed}-"))
        self.audit_key = "robust-audit-" + os.urandom(16).hex()
        self.truth = Truth()
        self.injected: list[Injected] = []
        self.cluster: NetnsCluster | None = None
        self.proxy: FaultyProxy | None = None
        self.bots: list[BotProcess] = []
        self.paused_bots: set[int] = set()
        self.dead_bots: set[int] = set()
        self.store: Store | None = None
        self.config: Path | None = None
        self.workload: Workload | None = None
        self.monitor: Monitor | None = None
        self.mounted: Path | None = None
        self.filler: Path | None = None
        self.spares: list[str] = []
        self.network: list[Fault] = []      # network faults in force (re-applied after a partial heal)
        self.killed: set[str] = set()       # members killed by a fault (restarted when it heals)
        self.paused: set[str] = set()
        self.event_ids: list[tuple[str, str, str]] = []  # (event_id, user, ts) of every approval sent
        self.approvals: list[tuple[float, str, str]] = []  # (time, plan message ts, user)
        self.proposals: list[tuple[str, str]] = []          # (command text, what came of it)
        self.notes: list[str] = []
        self._round = 0
        self._saved_env: dict[str, str | None] = {}

    # -- lifecycle ------------------------------------------------------

    @property
    def secrets(self) -> list[str]:
        found = [*self.creds.all(), self.audit_key, self.s3.access_key, self.s3.secret_key]
        return found + ([self.pg.password] if self.pg else [])

    def _setenv(self, name: str, value: str) -> None:
        self._saved_env.setdefault(name, os.environ.get(name))
        os.environ[name] = value

    def env(self) -> dict[str, str]:
        env = {AUDIT_KEY_ENV: self.audit_key, "ETCD_BIN_DIR": str(self.bin_dir), **self.s3.env}
        if self.pg:
            env.update(self.pg.env())
        return env

    async def start(self) -> None:
        s = self.s
        for name, value in self.env().items():  # the cluster picks its etcd, the test's store reads its config
            self._setenv(name, value)
        extra = QUOTA_ARGS if s.operation is Operation.DEFRAG else ()
        self.cluster = NetnsCluster(s.size, base_dir=self.root / "bed", extra_args=extra)
        await asyncio.to_thread(self.cluster.start)
        for i in range(s.size + 1, s.size + 4):  # hosts for new members (a replacement, a second one)
            self.spares.append(f"member{i}")
            await asyncio.to_thread(self.cluster.add_host, f"member{i}")
        snapshots = self.root / "snapshots"
        snapshots.mkdir()
        await _run("mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", f"robust{s.seed}", str(snapshots))
        self.mounted = snapshots
        self.proxy = await FaultyProxy("127.0.0.1", self.s3.port).start()
        table = cluster_table("prod", self.cluster, timeout_seconds=HEALTH_TIMEOUT, catch_up_seconds=30.0,
                              snapshots={"store": self.s3.store_table(f"seed{s.seed}", endpoint=self.proxy.url)})
        table["launcher"]["argv"] = [sys.executable, str(Path(__file__).with_name("launcher.py")), str(self.launches),
                                     "--", *table["launcher"]["argv"]]
        database = (self.pg.create_database(f"robust{s.seed}") if self.pg else str(self.root / "etcd-chatops.db"))
        top: dict[str, Any] = {"database": database, "snapshot_dir": str(snapshots), "audit_key_env": AUDIT_KEY_ENV,
                               "approval": APPROVAL, "replicas": {"lease_seconds": LEASE_SECONDS}}
        if self.pg:
            top["database_password_env"] = PASSWORD_ENV
        self.config = write_config(self.root, [table], **top)
        self.bots = [self._bot(i) for i in range(s.replicas)]
        await asyncio.gather(*(asyncio.to_thread(b.start) for b in self.bots))
        self.slack.bot_url = None  # every delivery names its replica
        self.store = await open_store(load_config(self.config))
        endpoints = [m.client_url for m in self.cluster.members.values()]
        endpoints += [self.cluster.host(h).url(Link.CLIENT) for h in self.spares]
        if s.operation is Operation.DEFRAG:
            await fill_until_nospace(self.cluster)
        self.workload = Workload(endpoints, f"/robust/{s.seed}/")
        self.workload.start()
        self.monitor = Monitor(lambda: endpoints)
        self.monitor.restoring = self._writes_while_no_restore
        await self.monitor.sample()
        self.monitor.start()

    async def _writes_while_no_restore(self) -> None:
        """The client stops writing while a restore plan is approved or runs, as kube-apiserver is stopped."""
        assert self.store is not None and self.workload is not None
        with contextlib.suppress(StoreError):
            plans = await self.store.plans("prod", limit=5)
            self.workload.writing = not any(p.kind == "restore" and p.state in ("approved", "running") for p in plans)

    def _bot(self, i: int) -> BotProcess:
        assert self.config is not None
        return BotProcess(self.config, self.slack.api_url, self.creds, self.root / f"bot-{i}.log", env=self.env())

    async def close(self) -> None:
        """Stop and remove everything this world started, whatever state it is in."""
        for task in (self.workload, self.monitor):
            if task is not None:
                with contextlib.suppress(Exception):
                    await task.stop()
        for i in list(self.paused_bots):
            self._signal_bot(i, signal.SIGCONT)
        await asyncio.gather(*(asyncio.to_thread(b.stop) for b in self.bots), return_exceptions=True)
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
        if self.proxy is not None:
            await self.proxy.stop()
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.close)
        if self.mounted is not None:
            await _run("umount", "-l", str(self.mounted), check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    # -- the bot replicas -------------------------------------------------

    def replica_id(self, bot: BotProcess) -> str:
        assert bot.proc is not None
        return f"{socket.gethostname()}-{bot.proc.pid}"

    async def leader_index(self) -> int | None:
        assert self.store is not None
        try:
            lease = await self.store.lease(LEASE)
        except StoreError:
            return None
        if lease is None or lease.expires_at < time.time():
            return None
        return next((i for i, b in enumerate(self.bots) if b.proc and self.replica_id(b) == lease.holder), None)

    def live_bots(self) -> list[int]:
        return [i for i in range(len(self.bots)) if i not in self.dead_bots and i not in self.paused_bots]

    def pick(self) -> BotProcess:
        """The replica the next delivery goes to: the live ones in turn (as a Service spreads requests)."""
        live = self.live_bots() or list(range(len(self.bots)))
        self._round += 1
        return self.bots[live[self._round % len(live)]]

    def _signal_bot(self, i: int, sig: int) -> None:
        proc = self.bots[i].proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)

    # -- talking to the bot, as Slack and its people do --------------------

    async def command(self, text: str, user: str = ONCALL) -> Delivery:
        """`/etcd text` to a live replica; a delivery that fails (a dead or frozen replica) is typed again."""
        delivery: Delivery | None = None
        for _ in range(4):
            delivery = await self.slack.send_command(text, user_id=user, channel_id=CHANNEL, to=self.pick().url,
                                                     timeout=3.0)
            if delivery.status == 200:
                return delivery
            await asyncio.sleep(1.0)
        assert delivery is not None
        return delivery

    async def react(self, ts: str, user: str, reaction: str = OK) -> None:
        """A reaction, delivered as the Events API does: retried (same event_id) up to 3 times."""
        first = await self.slack.react(user=user, channel=CHANNEL, ts=ts, reaction=reaction, to=self.pick().url)
        event_id = first.event_id
        assert event_id is not None
        self.event_ids.append((event_id, user, ts))
        self.approvals.append((time.time(), ts, user))
        delivery, retry = first, 0
        while delivery.status != 200 and retry < 3:
            retry += 1
            await asyncio.sleep(retry)
            delivery = await self.redeliver(event_id, user, ts, retry)

    async def redeliver(self, event_id: str, user: str, ts: str, retry: int = 1) -> Delivery:
        event = {"type": "reaction_added", "user": user, "reaction": OK,
                 "item": {"type": "message", "channel": CHANNEL, "ts": ts}, "item_user": self.slack.bot_user_id,
                 "event_ts": f"{time.time():.6f}"}
        return await self.slack.send_event(event, event_id=event_id, retry_num=retry, retry_reason="http_timeout",
                                           to=self.pick().url, timeout=3.0)

    async def propose(self, text: str, user: str = ONCALL, wait: float = 30.0) -> Message | str:
        """`/etcd text`: the plan message it posts, or the one line the bot answered instead."""
        start = len(self.slack.messages)
        delivery = await self.command(text, user)
        if delivery.status != 200:
            self.proposals.append((text, f"not delivered: {delivery.error}"))
            return f"not delivered: {delivery.error}"

        def answer() -> Message | None:
            for m in self.slack.messages[start:]:
                if is_plan_message(m):
                    return m
                if m.ephemeral_to == user:
                    return m
            return None
        try:
            msg = await self.slack.wait_for(answer, wait, f"an answer to /etcd {text}")
        except TimeoutError:
            self.proposals.append((text, "no answer"))
            return "no answer"
        if msg.ephemeral_to is not None:
            self.proposals.append((text, f"refused: {msg.text}"))
            return msg.text
        self.proposals.append((text, f"proposed: {msg.text.splitlines()[0]}"))
        return msg

    async def ask(self, text: str, user: str = ONCALL, wait: float = 30.0,
                  until: Callable[[Message], bool] | None = None) -> str:
        """`/etcd text`: the first line of the answer (in the channel, or to the person only)."""
        start = len(self.slack.messages)
        delivery = await self.command(text, user)
        if delivery.status != 200:
            return f"not delivered: {delivery.error}"

        def answered(m: Message) -> bool:
            if until is not None:
                return until(m)
            return m.ephemeral_to == user or (m.thread_ts is None and m.ephemeral_to is None
                                              and m.source in ("chat.postMessage", "response_url"))
        try:
            msg = await self.slack.wait_for_message(answered, wait, f"an answer to /etcd {text}", after=start)
        except TimeoutError:
            return "no answer"
        return (msg.text or "").splitlines()[0] if msg.text else "(blocks only)"

    async def approve(self, plan: Message, kind: str) -> None:
        await self.react(plan.ts, LEAD)
        if kind == "restore":
            await self.react(plan.ts, LEAD2)

    # -- the nemesis ------------------------------------------------------

    async def before_approval(self) -> None:
        """The faults that strike while the approvers decide (negative times), and the wait after them."""
        for fault in self.s.faults:
            if fault.at < 0:
                await self._strike(fault)
                await asyncio.sleep(-fault.at)

    async def run_schedule(self) -> None:
        """Strike each fault at its time and heal it after its duration (faults overlap)."""
        started = time.monotonic()
        tasks = []
        for fault in (f for f in self.s.faults if f.at >= 0):
            await asyncio.sleep(max(0.0, started + fault.at - time.monotonic()))
            tasks.append(asyncio.create_task(self._strike(fault)))
        await asyncio.gather(*tasks)

    async def _strike(self, fault: Fault) -> None:
        record = Injected(fault, struck=time.time())
        self.injected.append(record)
        try:
            heal = await self.inject(fault, record)
        except Exception as e:  # the nemesis reports, never masks, what it could not do
            record.skip(f"could not inject: {type(e).__name__}: {e}")
            log.warning("%s: %s", fault.describe(), record.note)
            return
        if heal is not None:
            await asyncio.sleep(fault.duration)
            try:
                await heal()
            except Exception as e:
                record.note += f"; could not heal: {type(e).__name__}: {e}"
        record.healed = time.time()

    async def inject(self, fault: Fault, record: Injected) -> Callable[[], Awaitable[None]] | None:
        c = self.cluster
        assert c is not None and self.proxy is not None
        k = fault.kind
        if k is Kind.MEMBER_KILL:
            member = fault.target
            if not c.running(member):
                record.skip("not running")
                return None
            await asyncio.to_thread(c.kill, member)
            self.killed.add(member)
            self.truth.set(member, "killed", True)
            return lambda: self._restart(member)
        if k is Kind.MEMBER_PAUSE:
            member = fault.target
            if not c.running(member) or member in self.paused:
                record.skip("not running" if not c.running(member) else "paused already")
                return None
            await asyncio.to_thread(c.pause, member)
            self.paused.add(member)
            self.truth.set(member, "paused", True)
            return lambda: self._resume(member)
        if k in NETWORK_FAULTS:
            self.network.append(fault)
            await asyncio.to_thread(self._apply_network, fault)
            return lambda: self._heal_network(fault)
        if k in (Kind.BOT_KILL, Kind.BOT_PAUSE):
            leader = await self.leader_index()
            live = self.live_bots()
            if fault.target == "leader":
                i = leader if leader is not None and leader in live else None
            else:
                i = next((j for j in live if j != leader), None)
            if i is None:
                record.skip(f"no live {fault.target} replica")
                return None
            record.note = f"replica {i}"
            if k is Kind.BOT_KILL:
                await asyncio.to_thread(self.bots[i].kill)
                self.dead_bots.add(i)
                return lambda: self._restart_bot(i)
            self._signal_bot(i, signal.SIGSTOP)
            self.paused_bots.add(i)
            return lambda: self._resume_bot(i)
        if k is Kind.PG_RESTART:
            assert self.pg is not None
            await asyncio.to_thread(self.pg.restart)
            return None
        if k is Kind.SLACK_ERRORS:
            until = time.monotonic() + fault.duration
            for method in SLACK_METHODS:
                self.slack.fail_next(method, status=int(fault.value), count=10**9,
                                     retry_after=1 if fault.value == 429 else None,
                                     match=lambda _args: time.monotonic() < until)
            return None  # ends by itself
        if k is Kind.STORE_REFUSE:
            self.proxy.refuse()
            return self._store_flows
        if k is Kind.STORE_STALL:
            self.proxy.stall()
            return self._store_flows
        if k is Kind.DISK_FULL:
            self._fill_disk()
            return self._empty_disk
        if k is Kind.REDELIVERY:
            if not self.event_ids:
                record.skip("no approval to deliver again")
                return None
            event_id, user, ts = self.event_ids[0]
            delivery = await self.redeliver(event_id, user, ts)
            record.note = f"HTTP {delivery.status}"
            return None
        if k is Kind.SECOND_OP:
            record.note = await self.second_operation(str(fault.value))
            return None
        if k is Kind.REVIVE:
            revived = []
            for member in self.s.failed:
                if not c.running(member):
                    with contextlib.suppress(ClusterError):
                        await asyncio.to_thread(c.restart, member, 10.0)
                        revived.append(member)
                # Healthy again only if it runs: a member that did not come back (a restore's stop step may
                # stop it while it starts) is still down, and the quorum the bot is judged by must say so.
                self.truth.set(member, "failed", not c.running(member))
            down = [m for m in self.s.failed if not c.running(m)]
            record.note = (f"restarted {', '.join(revived) or 'none'} by {time.time():.2f}"
                           + (f"; still down: {', '.join(down)}" if down else ""))
            return None
        raise AssertionError(f"no such fault: {k}")

    async def _restart(self, member: str) -> None:
        assert self.cluster is not None
        self.killed.discard(member)
        if not self.cluster.running(member):
            with contextlib.suppress(ClusterError):  # removed from the cluster meanwhile: it exits at once
                await asyncio.to_thread(self.cluster.restart, member, 10.0)
        self.truth.set(member, "killed", False)

    async def _resume(self, member: str) -> None:
        assert self.cluster is not None
        self.paused.discard(member)
        with contextlib.suppress(ClusterError):
            await asyncio.to_thread(self.cluster.resume, member)
        self.truth.set(member, "paused", False)

    def _apply_network(self, fault: Fault) -> None:
        c = self.cluster
        assert c is not None
        if fault.kind is Kind.PARTITION:
            c.isolate(fault.target)
            self.truth.set(fault.target, f"partition@{id(fault)}", True)
        elif fault.kind is Kind.PEER_CUT:
            c.cut_from_peers(fault.target)
            self.truth.set(fault.target, f"peer-cut@{id(fault)}", True)
        else:
            member, link = fault.target.split(":")
            c.impair(member, Link(link), delay=float(fault.value))

    async def _heal_network(self, fault: Fault) -> None:
        """Heal every network fault, then put back those still in force (a bed's heal is per host)."""
        assert self.cluster is not None
        self.network.remove(fault)
        await asyncio.to_thread(self.cluster.heal)
        for other in self.network:
            await asyncio.to_thread(self._apply_network, other)
        if fault.kind is not Kind.LATENCY:
            self.truth.set(fault.target, f"{fault.kind}@{id(fault)}", False)

    async def _restart_bot(self, i: int) -> None:
        bot = self._bot(i)
        await asyncio.to_thread(bot.start)
        self.bots[i] = bot
        self.dead_bots.discard(i)

    async def _resume_bot(self, i: int) -> None:
        self._signal_bot(i, signal.SIGCONT)
        self.paused_bots.discard(i)

    async def _store_flows(self) -> None:
        assert self.proxy is not None
        self.proxy.flow()

    def _fill_disk(self) -> None:
        assert self.mounted is not None
        self.filler = self.mounted / ".filler"
        fd = os.open(self.filler, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            st = os.statvfs(self.mounted)
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, 0, max(st.f_bavail * st.f_frsize, 1))
        finally:
            os.close(fd)

    async def _empty_disk(self) -> None:
        if self.filler is not None:
            self.filler.unlink(missing_ok=True)
            self.filler = None

    async def second_operation(self, what: str) -> str:
        """Another person proposes an operation while this one runs; approved if the bot proposes it."""
        assert self.cluster is not None
        survivors = [m for m in self.s.members if m not in self.s.failed]
        spare = self.cluster.host(self.spares[1])
        texts = {"defrag": "defrag", "snapshot": "snapshot", "restore": "restore",
                 "replace": f"replace {survivors[0]} {self.spares[1]} {spare.url(Link.PEER)} "
                            f"--client-url {spare.url(Link.CLIENT)}",
                 "hostile": "replace <!channel> <@U0STRANGER> http://<!here>:2380"}
        text = texts[what]
        if what == "snapshot":
            delivery = await self.command(text, LEAD2)
            return f"snapshot asked: HTTP {delivery.status}"
        answer = await self.propose(text, LEAD2)
        if isinstance(answer, str):
            return f"refused: {answer.splitlines()[0] if answer else ''}"
        await self.react(answer.ts, LEAD)
        if what == "restore":
            await self.react(answer.ts, ONCALL)
        return "proposed and approved"

    async def heal_all(self) -> None:
        """Every fault undone: members resumed, reconnected and restarted, replicas back, stores flowing.
        The operation's own failures stay (a replaced member stays dead)."""
        c = self.cluster
        assert c is not None and self.proxy is not None
        self.network.clear()
        await asyncio.to_thread(c.heal)
        for member in list(self.paused):
            await self._resume(member)
        for member in list(self.killed):
            await self._restart(member)
        for i in list(self.paused_bots):
            await self._resume_bot(i)
        for i in list(self.dead_bots):
            await self._restart_bot(i)
        self.proxy.flow()
        await self._empty_disk()
        for member, tags in self.truth.down.items():
            for tag in list(tags):
                if tag != "failed":
                    self.truth.set(member, tag, False)

    @property
    def launches(self) -> Path:
        """The launcher's log: one line as each call starts and one as it ends (launcher.py)."""
        return self.root / "launches.jsonl"

    def launched(self, ended: bool = False) -> list[dict[str, Any]]:
        """Every launcher call as it started (or, `ended`, as it ended, with its exit status), in order:
        the members' own history of stops, restores and starts."""
        if not self.launches.exists():
            return []
        calls = [json.loads(line) for line in self.launches.read_text().splitlines() if line.strip()]
        return [c for c in calls if ("ended" in c) == ended]

    def log_text(self) -> str:
        """What the bot processes logged (their stdout and stderr)."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob("bot-*.log")))


async def _run(*argv: str, check: bool = True) -> None:
    proc = await asyncio.to_thread(subprocess.run, list(argv), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
