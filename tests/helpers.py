"""Small helpers for end-to-end tests: talk to the bot as people in the channel do."""
from __future__ import annotations

import asyncio
import inspect
import json
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, overload

from bot.domain.cluster import ClusterHealth, MemberHealth, MemberStatus
from bot.domain.errors import EtcdError
from bot.domain.record import PlanRecord
from bot.domain.snapshot import SnapshotRecord
from bot.etcd.client import EtcdClient
from bot.etcd.health import check_cluster
from bot.ops.leadership import LEASE
from bot.store.base import Store, StoreError
from bot.store.schema import ADDED_COLUMNS, expected_columns
from bot.store.sqlite import SqliteStore
from bot.testing.clock import ManualClock
from bot.testing.cluster import QUOTA, QUOTA_ARGS, LocalCluster, fill_until_nospace, free_port
from bot.testing.slack import Delivery, Gate, Message, SlackStandIn
from bot.testing.workspace import CHANNEL, LEAD, LEADS_GROUP, ONCALL, USERGROUPS, USERS
from bot.watch.watcher import Watcher

T = TypeVar("T")
P = TypeVar("P")
__all__ = ["QUOTA", "QUOTA_ARGS", "fill_until_nospace"]  # NOSPACE: a small quota, filled (bot/testing/cluster.py)


@overload
async def eventually(predicate: Callable[[], Awaitable[T | None]], timeout: float, what: str, *,
                     interval: float = 0.05, retry_on: tuple[type[BaseException], ...] = ()) -> T: ...
@overload
async def eventually(predicate: Callable[[], T | None], timeout: float, what: str, *,
                     interval: float = 0.05, retry_on: tuple[type[BaseException], ...] = ()) -> T: ...
async def eventually(predicate: Callable[[], T | None | Awaitable[T | None]], timeout: float, what: str, *,
                     interval: float = 0.05, retry_on: tuple[type[BaseException], ...] = ()) -> T:
    """Poll `predicate` (sync or async) until it returns something truthy, and return that.

    Errors in `retry_on` count as "not yet". At the deadline the failure says what was
    awaited and the last value (or error) seen, so a timeout explains itself."""
    deadline = time.monotonic() + timeout
    while True:
        value: T | None = None
        try:
            result = predicate()
            value = await result if inspect.isawaitable(result) else result
            last: Any = value
        except retry_on as e:
            last = e
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last seen: {last!r}")
        await asyncio.sleep(interval)


async def majority_leads(client: EtcdClient, urls: list[str], timeout: float = 10.0) -> None:
    """Wait until the members at `urls` follow one leader, one of themselves. After a cut, the others may
    still name a cut leader until their own election timeout, or be electing: a write through them is then
    dropped or waits, and the cut member is not yet "cut off" (nobody follows a leader)."""
    ids = {(await client.status(url)).member_id for url in urls}

    async def one_of_them_leads() -> bool:
        leaders = {(await client.status(url)).leader for url in urls}
        return len(leaders) == 1 and leaders <= ids
    await eventually(one_of_them_leads, timeout, f"{len(urls)} members to follow one of themselves",
                     retry_on=(EtcdError,))


# ---------------------------------------------------------------- the watch, on a clock the test moves

async def watching(watcher: Watcher, clock: ManualClock, interval: float = 1.0, timeout: float = 20.0) -> None:
    """Wait until every watched cluster's loop has run a round as the watch (this replica leads) and sleeps
    on `clock`: from then on, each `clock.advance(interval)` is one round of each."""
    names = [c.name for c in watcher.ctx.config.clusters if c.watch.enabled]
    deadline = time.monotonic() + timeout
    while not all(n in watcher.clusters and f"watch {n}" in clock.asleep() for n in names):
        if time.monotonic() >= deadline:
            raise AssertionError(f"the watch of {names} did not start within {timeout:g}s "
                                 f"(watching {sorted(watcher.clusters)}, asleep {clock.asleep()})")
        if all(f"watch {n}" in clock.asleep() for n in names):
            await clock.advance(interval)   # a round before this replica led: watch the next one
        else:
            await asyncio.sleep(0.01)


async def advance_until(clock: ManualClock, found: Callable[[], T | None | Awaitable[T | None]], rounds: int,
                        what: str, interval: float = 1.0) -> tuple[T, int]:
    """Move `clock` one `interval` at a time (each loop's round runs whole: a watch round, an upkeep pass) until
    `found()` (sync or async) returns something, at most `rounds` times: that, and after how many (0: at once)."""
    for n in range(rounds + 1):
        result = found()
        value = await result if inspect.isawaitable(result) else result
        if value:
            return value, n
        if n < rounds:
            await clock.advance(interval)
    raise AssertionError(f"no {what} within {rounds} rounds ({rounds * interval:g}s on the watch's clock)")


# ---------------------------------------------------------------- values for pure tests

def member_status(**overrides: Any) -> MemberStatus:
    """A healthy voter's Status answer; a test names only the fields it is about."""
    fields: dict[str, Any] = dict(endpoint="http://10.0.0.1:2379", member_id=1, version="3.5.1", db_size=20480,
                                  db_size_in_use=16384, leader=1, raft_term=2, raft_index=10, raft_applied_index=10,
                                  is_learner=False, errors=())
    return MemberStatus(**{**fields, **overrides})


def cluster_health(*members: MemberHealth, **overrides: Any) -> ClusterHealth:
    """The result of one health check of `members`: no alarms, checked in 10 ms under a 2 s deadline."""
    fields: dict[str, Any] = dict(cluster="prod", members=members, alarms=(), checked_at=0.0, elapsed=0.01,
                                  deadline=2.0)
    return ClusterHealth(**{**fields, **overrides})


# ---------------------------------------------------------------- talking to the bot

def text_of(msg: Message) -> str:
    """Everything a person reads in a message: its text and every block's text."""
    parts = [msg.text or ""]
    for block in msg.blocks or []:
        if isinstance(block.get("text"), dict):
            parts.append(block["text"].get("text", ""))
        for element in block.get("elements", []) or []:
            if isinstance(element, dict) and "text" in element:
                parts.append(element["text"] if isinstance(element["text"], str) else element["text"].get("text", ""))
    return "\n".join(parts)


_MARKUP = re.compile(r"<[^<>]*>?")
_DELIBERATE = re.compile(r"<@(?P<user>[UW][A-Z0-9]+)>|<!subteam\^(?P<group>S[A-Z0-9]+)>|<!date\^\d+\^[^|<>]*\|[^<>]*>")


def live_markup(msg: Message) -> list[str]:
    """Slack markup in a message (text or blocks) that the bot did not make on purpose:
    every <…> but a mention of a workspace user or group (mention()) or a date (slack_date())."""
    found = []
    for token in _MARKUP.findall(text_of(msg)):
        ok = _DELIBERATE.fullmatch(token)
        if not ok or (ok["user"] and ok["user"] not in USERS) or (ok["group"] and ok["group"] not in USERGROUPS):
            found.append(token)
    return found


async def command(slack: SlackStandIn, text: str, *, user: str = ONCALL, channel: str = CHANNEL,
                  to: str | None = None) -> Delivery:
    """`/etcd text`, delivered to the bot (`to`: one replica's URL when several run)."""
    delivery = await slack.send_command(text, user_id=user, channel_id=channel, to=to)
    assert delivery.status == 200, f"/etcd {text}: HTTP {delivery.status} {delivery.body} {delivery.error}"
    return delivery


async def reply(slack: SlackStandIn, text: str, *, user: str = ONCALL, channel: str = CHANNEL,
                source: str = "chat.postMessage", timeout: float = 20.0, to: str | None = None) -> Message:
    """Run `/etcd text` and return the first message it causes from `source`: a message in the channel itself,
    since a command answers there, never in a thread (a plan's note, posted a moment late, is no reply)."""
    start = len(slack.messages)
    await command(slack, text, user=user, channel=channel, to=to)
    return await slack.wait_for_message(lambda m: m.source == source and m.channel == channel and m.thread_ts is None,
                                        after=start,
                                        timeout=timeout, what=f"a {source} reply to /etcd {text}")


async def ephemeral(slack: SlackStandIn, text: str, *, user: str = ONCALL, channel: str = CHANNEL,
                    timeout: float = 20.0, to: str | None = None) -> Message:
    """Run `/etcd text` and return the first message only `user` sees."""
    start = len(slack.messages)
    await command(slack, text, user=user, channel=channel, to=to)
    return await slack.wait_for_message(lambda m: m.ephemeral_to == user, after=start, timeout=timeout,
                                        what=f"an ephemeral reply to /etcd {text}")


# ---------------------------------------------------------------- replacement plans

def announcing(step: int) -> Callable[[dict[str, Any]], bool]:
    """Matches the chat.update that marks `step` running on the plan message (to hold or fail it there)."""
    return lambda args: f":hourglass_flowing_sand: {step}." in str(args.get("blocks"))


def hold_at(slack: SlackStandIn, step: int) -> Gate:
    """Pause the next plan before `step`: the engine announces a step (its chat.update) before it checks the
    step's precondition and runs it, and the stand-in holds that call until the test releases the gate."""
    return slack.hold("chat.update", match=announcing(step))


async def depose(store: Store, leader: str) -> bool:
    """Another replica takes the executor lease from `leader` (as after a database hiccup longer than its ttl)."""
    await store.release_lease(LEASE, leader)
    return await store.acquire_lease(LEASE, "another-replica", 60) is not None


APPROVAL = {"approvers": [LEAD, ONCALL], "approver_groups": [LEADS_GROUP], "ttl_minutes": 30,
            "reaction": "white_check_mark", "reject_reaction": "x"}
OK = "white_check_mark"


def urls() -> tuple[str, str]:
    return f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"


def is_plan_message(m: Message) -> bool:
    """A new plan's message: posted in the channel, with its Approve and Reject buttons."""
    return (m.source == "chat.postMessage" and m.thread_ts is None
            and any(str(b.get("block_id", "")).startswith("plan:") for b in m.blocks or []))


async def propose(slack: SlackStandIn, text: str, user: str = ONCALL, to: str | None = None) -> Message:
    start = len(slack.messages)
    await command(slack, text, user=user, to=to)
    return await slack.wait_for_message(is_plan_message, after=start, timeout=30,
                                        what=f"the plan message for /etcd {text}")


def replies(slack: SlackStandIn, plan: Message) -> list[Message]:
    return [m for m in slack.messages if m.thread_ts == plan.ts]


def thread(slack: SlackStandIn, plan: Message) -> str:
    return "\n".join(text_of(m) for m in replies(slack, plan))


def must(value: T | None) -> T:
    """`value`, which the test expects to be there (mypy narrows Optional results with it)."""
    assert value is not None
    return value


def plan_of(kind: type[P], record: PlanRecord) -> P:
    """The record's plan, which the test expects to be of `kind`."""
    assert isinstance(record.plan, kind), record.plan
    return record.plan


async def plan_row(store: Store, plan: Message, timeout: float = 10.0) -> PlanRecord:
    """The plan behind a message (the bot records the message's ts right after posting it)."""
    return await eventually(lambda: store.plan_by_message(CHANNEL, plan.ts), timeout,
                            f"a plan recorded for message {plan.ts}", interval=0.02)


async def wait_state(store: Store, plan_id: str, states: tuple[str, ...], timeout: float = 120.0) -> PlanRecord:
    """Wait until the plan is in one of `states`. A read the database does not answer counts as "not yet": the
    tests that restart PostgreSQL read through a pool that reconnects after it (beside a busy CPU, the first
    read after a restart once found no connection within the store's 0.5 s)."""
    async def reached() -> PlanRecord | None:
        row = await store.plan(plan_id)
        assert row is not None, f"no plan {plan_id}"
        return row if row["state"] in states else None

    try:
        return await eventually(reached, timeout, f"plan {plan_id} to be {' or '.join(states)}", interval=0.1,
                                retry_on=(StoreError,))
    except AssertionError as e:
        last = await store.plan(plan_id)
        steps = [(st.key, st.state, st.detail or st.error) for st in await store.steps(plan_id)]
        raise AssertionError(f"{e}: plan {plan_id} is {last and last.state} (error: {last and last.error}), "
                             f"not {states}; steps: {steps}") from None


async def wait_done(store: Store, plan_id: str, timeout: float = 120.0) -> PlanRecord:
    """Wait until the plan ends; it must have ended done (its error says why not)."""
    row = await wait_state(store, plan_id, ("done", "failed"), timeout)
    assert row["state"] == "done", row["error"]
    return row


async def audit_actions(store: Store, plan_id: str) -> list[tuple[str, str]]:
    rows = await store.audit_rows()
    out = []
    for r in rows:
        detail = json.loads(r.detail)
        if detail.get("plan") == plan_id:
            out.append((r.action, detail.get("step", "")))
    return out


async def members_of(cluster: LocalCluster) -> tuple[MemberHealth, ...]:
    user, password = cluster.user or (None, None)
    async with EtcdClient(cluster.endpoints, tls=cluster.tls_files(), username=user, password=password) as client:
        return (await check_cluster(client, "check")).members


class open_store:
    """The bot's database opened from the test (the bot process may be dead)."""

    def __init__(self, directory: Path):
        self.store = SqliteStore(directory / "etcd-chatops.db")

    async def __aenter__(self) -> SqliteStore:
        return await self.store.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.store.close()



def as_released(path: Path, added_columns: bool = True) -> None:
    """Turn a SQLite database of this version back into what the releases before versioned
    migrations left (their tables and rows, no schema_migrations); without `added_columns`,
    also without the columns those releases added on open (the first release's file)."""
    old = expected_columns(0)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                           "AND name NOT LIKE 'sqlite_%'")]
        for table in tables:
            if table not in old:
                db.execute(f"DROP TABLE {table}")
                continue
            for (column,) in db.execute(f"SELECT name FROM pragma_table_info('{table}')").fetchall():
                if column not in old[table] and (not added_columns or (table, column) not in ADDED_COLUMNS):
                    db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    finally:
        db.close()


SNAPSHOT_COLUMNS: dict[str, Any] = {
    "id": 1, "cluster": "prod", "path": "/snapshots/prod/prod.db", "member": "member1", "revision": 1, "hash": "1",
    "total_keys": 1, "live_keys": 1, "total_size": 20480, "file_size": 20480, "sha256": "0" * 64, "encrypted": 0,
    "requested_by": "U0ONCALL01", "reason": "", "duration": 0.25, "created_at": 0.0, "plan_id": None,
    "pruned_at": None, "remote_url": None, "remote_state": "", "remote_error": None, "remote_verified_at": None,
    "remote_pruned_at": None}


def snapshot_record(**columns: Any) -> SnapshotRecord:
    """A catalog row with these columns (the others a plain local snapshot's), decoded as the store decodes one:
    for tests of what reads the catalog (retention, the catalog view, the watch) without a database."""
    return SnapshotRecord.of({**SNAPSHOT_COLUMNS, **columns})
