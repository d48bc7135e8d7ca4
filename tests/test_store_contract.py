"""One contract, two backends: every test taking `backend` runs against SQLite (a
temporary file) and PostgreSQL (a fresh database on the suite's real server).
Several store instances on one database stand for several bot replicas.

Then what only one backend has: old SQLite files upgraded in place, PostgreSQL
restarted under a store, passwords kept out of every message, the config."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import sqlite3
import sys
import time
import types
import typing
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from conftest import ROOT, TEST_AUDIT_KEY
from test_plans import REQ, cluster, down, up

from bot.config import ConfigError, dsn, parse_config
from bot.domain.cluster import Member
from bot.domain.plan import Confirmation, Fence, Lease, PlanKind, PlanState
from bot.domain.record import AlertRecord, NewAlert, NewPlan, ReceivedAlert
from bot.domain.snapshot import DrillRecord, NewSnapshot, RemoteState, SnapshotRecord
from bot.ops.replace.plan import plan_replacement
from bot.store import postgres as postgres_store
from bot.store.backends import open_store
from bot.store.base import LeaseLost, OpenPlanExists, Store, StoreBusy, StoreError
from bot.store.postgres import PostgresStore
from bot.store.schema import LATEST, statements
from bot.store.sql import AUDIT_LOCK
from bot.store.sqlite import SqliteStore
from bot.testing import postgres as postgres_module
from bot.testing.postgres import LocalPostgres
from bot.testing.workspace import CHANNEL, cluster_table
from helpers import as_released, ephemeral, eventually, must, reply, text_of

SCHEMAS = Path(__file__).parent / "store_schemas"
PLAN = plan_replacement(cluster(down(1), up(2), up(3)), REQ)
PLAN_JSON = json.dumps(PLAN.to_json())


class Backend:
    """One database; `store()` opens another instance on it (another replica)."""

    def __init__(self, kind: str, tmp_path: Path, postgres: LocalPostgres | None, file: str = "state.db"):
        self.kind, self.postgres = kind, postgres
        self.target: str | Path = postgres.create_database() if postgres else tmp_path / file
        self.dialect = (PostgresStore if postgres else SqliteStore).dialect.name
        self.stores: list[Store] = []

    def new(self, audit_key: str | None = None, timeout: float = 5.0) -> Store:
        if isinstance(self.target, str):
            assert self.postgres is not None
            store: Store = PostgresStore(self.target, password=self.postgres.password, audit_key=audit_key,
                                         timeout=timeout)
        else:
            store = SqliteStore(self.target, audit_key=audit_key, busy_timeout=timeout)
        self.stores.append(store)
        return store

    async def store(self, audit_key: str | None = None, timeout: float = 5.0) -> Store:
        return await self.new(audit_key, timeout).open()

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        """Raw SQL straight to the database, committed (what a person with a client does)."""
        if isinstance(self.target, str):
            assert self.postgres is not None
            with psycopg.connect(self.target, password=self.postgres.password) as conn:
                cur = conn.execute(query.encode())
                return cur.fetchall() if cur.description else []
        with closing(sqlite3.connect(self.target)) as db, db:
            return db.execute(query).fetchall()

    def schema(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every table's columns (types, defaults, keys, identity) and every index, as the database describes them."""
        if isinstance(self.target, str):
            return {"columns": self.rows(
                        "SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity, "
                        "identity_generation FROM information_schema.columns WHERE table_schema = 'public' "
                        "ORDER BY table_name, ordinal_position"),
                    "indexes": self.rows("SELECT tablename, indexname, indexdef FROM pg_indexes "
                                         "WHERE schemaname = 'public' ORDER BY indexname")}
        described: dict[str, list[tuple[Any, ...]]] = {}
        for table, sql in self.rows("SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name"):
            indexes = [(name, unique, partial, self.rows(f"SELECT name FROM pragma_index_info('{name}')"),
                        " ".join(where.split()))
                       for name, unique, partial, where in self.rows(
                           "SELECT l.name, l.\"unique\", l.partial, "
                           "CASE WHEN l.partial THEN substr(m.sql, instr(m.sql, 'WHERE')) ELSE '' END "
                           f"FROM pragma_index_list('{table}') l LEFT JOIN sqlite_master m ON m.name = l.name "
                           "ORDER BY l.name")]
            columns = self.rows(f"SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info('{table}')")
            described[table] = [*columns, ("AUTOINCREMENT" in sql.upper(),), *indexes]
        return described

    async def close(self) -> None:
        for store in self.stores:
            await store.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.e2e)])
async def backend(request, tmp_path) -> AsyncIterator[Backend]:
    postgres = request.getfixturevalue("postgres") if request.param == "postgres" else None
    b = Backend(request.param, tmp_path, postgres)
    try:
        yield b
    finally:
        await b.close()


def plan_row(plan_id: str = "abc123", cluster_name: str = "prod", **over: Any) -> NewPlan:
    now = time.time()
    return replace(NewPlan(id=plan_id, kind=PlanKind.REPLACE, cluster=cluster_name, plan=PLAN, channel=CHANNEL,
                           message_ts=f"{now:.6f}", proposer="U0ONCALL01", created_at=now, expires_at=now + 600,
                           fingerprint="f"), **over)


def snapshot_row(cluster_name: str = "prod", created_at: float | None = None, **over: Any) -> NewSnapshot:
    return replace(NewSnapshot(cluster=cluster_name, path="/snapshots/x.db", member="member1", revision=42, hash="1234",
                               total_keys=10, live_keys=9, total_size=2 ** 33, file_size=4096, sha256="ab" * 32,
                               encrypted=False, requested_by="U0ONCALL01", reason="manual", duration=0.25,
                               created_at=created_at or time.time()), **over)


# ---------------------------------------------------------------- plans and approvals

async def test_plans_one_open_per_cluster_and_guarded_transitions(backend):
    a, b = await backend.store(), await backend.store()
    await a.insert_plan(plan_row("p1"))
    with pytest.raises(OpenPlanExists, match="plan p1 is proposed"):  # the other replica proposes too
        await b.insert_plan(plan_row("p2"))
    await b.insert_plan(plan_row("s1", "staging", message_ts="1.5"))
    record = await b.plan("p1")
    assert record is not None and record.state is PlanState.PROPOSED and record.cluster == "prod"
    assert json.dumps(record.plan.to_json()) == PLAN_JSON and record.kind is PlanKind.REPLACE
    assert (await a.plan_by_message(CHANNEL, "1.5")).id == "s1"
    assert (await a.open_plan("prod")).id == "p1" and await a.open_plan("nowhere") is None
    assert await a.plan("nope") is None

    # Racing moves of one plan: exactly one caller made it.
    wins = await asyncio.gather(*((a if i % 2 else b).transition("p1", [PlanState.PROPOSED], PlanState.APPROVED,
                                                                   decided_by=f"U{i}") for i in range(10)))
    assert wins.count(True) == 1
    assert not await a.transition("p1", [PlanState.PROPOSED], PlanState.REJECTED)  # not from the state it is in
    await b.update_plan("p1", new_member_id="abcd", error="none yet")
    with pytest.raises(StoreError, match="no plan p9"):
        await b.update_plan("p9", error="x")
    assert await a.transition("p1", [PlanState.APPROVED], PlanState.DONE, finished_at=time.time())
    record = await a.plan("p1")
    assert record.state is PlanState.DONE and record.new_member_id == "abcd" and record.decided_by.startswith("U")

    # A closed plan may not reopen while the cluster has another open one.
    await a.insert_plan(plan_row("p3"))
    assert not await b.transition("p1", [PlanState.DONE], PlanState.INTERRUPTED)
    assert [p.id for p in await b.plans("prod")] == ["p3", "p1"]
    assert [p.id for p in await b.plans(states=[PlanState.DONE])] == ["p1"]
    assert len(await b.plans(limit=1)) == 1
    assert await a.plan_counts() == {"done": 1, "proposed": 2}


async def test_racing_approvals_from_two_replicas_move_the_plan_exactly_once(backend):
    """Twelve approvals at once, half through each replica: one "now approved"."""
    first, second = await backend.store(), await backend.store()
    await first.insert_plan(plan_row())
    users = [f"U0APPROVER{i % 6}" for i in range(12)]  # six people, each reacting twice
    results = await asyncio.gather(*((first if i % 2 else second).add_approval("abc123", u, 3)
                                     for i, u in enumerate(users)))
    assert sum(won for _, _, won in results) == 1
    assert sum(new for new, _, _ in results) <= 6
    record = await first.plan("abc123")
    assert record is not None and record.state is PlanState.APPROVED
    assert len(record.approvals) == len(set(record.approvals)) == 3  # the count stops once approved
    assert record.decided_by == record.approvals[-1]
    assert await second.add_approval("abc123", "U0LATE00001", 3) == (False, 0, False)
    assert await second.add_approval("missing", "U0LATE00001", 1) == (False, 0, False)


async def test_steps_are_recorded_and_retried_attempts_counted(backend):
    store = await backend.store()
    await store.insert_plan(plan_row())
    await store.step_started("abc123", 0, "check")
    await store.step_finished("abc123", 0, "done", "all healthy")
    await store.step_started("abc123", 1, "remove")
    await store.step_finished("abc123", 1, "failed", error="timeout")
    await store.step_started("abc123", 1, "remove")  # resumed: the same step again
    steps = await store.steps("abc123")
    assert [(s.idx, s.key, s.state, s.attempts) for s in steps] == [
        (0, "check", "done", 1), (1, "remove", "running", 2)]
    assert steps[0].detail == "all healthy" and steps[1].error is None and steps[1].finished_at is None
    assert (await store.plan("abc123")).current_step == 1


# ---------------------------------------------------------------- leases and fencing

async def test_a_lease_is_renewed_taken_over_after_expiry_and_fences_writes(backend):
    a, b = await backend.store(), await backend.store()
    await a.insert_plan(plan_row())
    first = await a.acquire_lease("leader", "replica-a", 1.0)
    assert first is not None and (first.holder, first.token) == ("replica-a", 1)
    assert await b.acquire_lease("leader", "replica-b", 1.0) is None  # held by a
    renewed = await a.acquire_lease("leader", "replica-a", 1.25)  # (longer: SQLite's clock ticks in milliseconds)
    assert renewed is not None and renewed.token == 1 and renewed.expires_at > first.expires_at
    assert await b.lease("leader") == renewed

    await a.step_started("abc123", 0, "check", fence=renewed.fence)  # the holder writes
    taken = await eventually(lambda: b.acquire_lease("leader", "replica-b", 30.0), timeout=10,
                             what="replica b taking the expired lease")
    assert (taken.holder, taken.token) == ("replica-b", 2)

    # The old holder, unaware, writes nothing any more.
    for write in (a.step_started("abc123", 1, "remove", fence=renewed.fence),
                  a.step_finished("abc123", 0, "done", fence=renewed.fence),
                  a.transition("abc123", [PlanState.PROPOSED], PlanState.RUNNING, fence=renewed.fence),
                  a.update_plan("abc123", error="stale", fence=renewed.fence)):
        with pytest.raises(LeaseLost, match="lease leader is no longer held by replica-a with token 1"):
            await write
    assert [s.state for s in await b.steps("abc123")] == ["running"]
    record = await b.plan("abc123")
    assert record.state is PlanState.PROPOSED and record.error is None and record.current_step == 0
    assert await a.acquire_lease("leader", "replica-a", 1.0) is None

    # The new holder's fence is good; a made-up token is not.
    assert await b.transition("abc123", [PlanState.PROPOSED], PlanState.RUNNING, fence=taken.fence)
    await b.step_finished("abc123", 0, "done", fence=taken.fence)
    with pytest.raises(LeaseLost):
        await b.update_plan("abc123", error="x", fence=Fence("leader", "replica-b", 3))

    await b.release_lease("leader", "replica-a")  # not a's to release: nothing changes
    assert await a.lease("leader") == taken
    await b.release_lease("leader", "replica-b")
    assert await a.lease("leader") is None
    with pytest.raises(LeaseLost):
        await b.step_finished("abc123", 0, "done", fence=taken.fence)
    again = await a.acquire_lease("leader", "replica-a", 30.0)
    assert again == Lease("leader", "replica-a", 3, again.expires_at)  # no wait after a release
    other = await a.acquire_lease("other", "replica-b", 30.0)
    assert other is not None and other.token == 1  # each name has its own lease


async def test_a_lease_runs_on_the_database_clock_not_the_replicas(backend, monkeypatch):
    """Replicas whose clocks are an hour off neither take a lease still held nor stretch their
    own: a lease's expiry is the database's clock, the one clock every replica shares."""
    a, b = await backend.store(), await backend.store()
    await a.insert_plan(plan_row())
    wall = time.time
    held = await a.acquire_lease("leader", "replica-a", 30.0)
    assert held is not None and abs(held.expires_at - (wall() + 30.0)) < 5  # (the database runs on this host)

    monkeypatch.setattr(time, "time", lambda: wall() + 3600)  # an hour fast
    assert await b.acquire_lease("leader", "replica-b", 30.0) is None  # not taken: still held
    assert await b.lease("leader") == held
    renewed = await a.acquire_lease("leader", "replica-a", 0.5)  # for half a second, not an hour and a half
    assert renewed is not None and renewed.token == 1 and renewed.expires_at < wall() + 5

    monkeypatch.setattr(time, "time", lambda: wall() - 3600)  # an hour slow: the lease would look good for an hour
    taken = await eventually(lambda: b.acquire_lease("leader", "replica-b", 30.0), timeout=10,
                             what="the lease lapsing on the database's clock")
    assert (taken.holder, taken.token) == ("replica-b", 2)
    with pytest.raises(LeaseLost):  # the fence is checked on the same clock
        await a.step_started("abc123", 0, "check", fence=renewed.fence)


async def test_racing_replicas_get_one_lease(backend):
    stores = [await backend.store() for _ in range(3)]
    leases = await asyncio.gather(*(s.acquire_lease("leader", f"replica-{i % 3}-{i}", 30.0)
                                    for i, s in enumerate(stores * 4)))
    granted = [lease for lease in leases if lease is not None]
    assert len(granted) == 1 and granted[0].token == 1


# ---------------------------------------------------------------- events, snapshots, drills, memberships

async def test_a_redelivered_event_is_dropped_by_every_replica(backend):
    a, b = await backend.store(), await backend.store()
    results = await asyncio.gather(*((a if i % 2 else b).first_delivery("Ev0001") for i in range(20)))
    assert results.count(True) == 1
    assert await b.first_delivery("Ev0002") and not await a.first_delivery("Ev0002")


async def test_the_snapshots_catalog_and_its_off_site_columns(backend):
    store = await backend.store()
    now = time.time()
    old = await store.record_snapshot(snapshot_row(created_at=now - 100, reason="scheduled"))
    new = await store.record_snapshot(snapshot_row(created_at=now))
    other = await store.record_snapshot(snapshot_row("staging"))
    assert len({old, new, other}) == 3
    assert [s.id for s in await store.snapshots("prod")] == [new, old]
    assert (await store.snapshots("prod"))[0].total_size == 2 ** 33  # sizes beyond 32 bits
    assert await store.last_snapshot_at("prod", "scheduled") == now - 100
    assert await store.last_snapshot_at("prod", "nightly") is None
    await store.snapshot_for_plan(old, "p1")
    await store.snapshot_for_plan(old, "p2")  # already a plan's: kept
    await store.mark_pruned(new)
    assert [s.id for s in await store.snapshots("prod")] == [old]
    rows = await store.snapshots("prod", include_pruned=True)
    assert [(s.id, s.plan_id, s.pruned_at is not None) for s in rows] == [(new, None, True),
                                                                                   (old, "p1", False)]
    assert rows[1].remote_state == "" and rows[1].remote_url is None

    await store.update_snapshot(old, remote_state="uploading", remote_url="s3://bucket/prod/x.db")
    await store.update_snapshot(old, remote_state="verified", remote_verified_at=now)
    await store.update_snapshot(new, remote_state="failed", remote_error="403 Forbidden")
    await store.update_snapshot(old, remote_pruned_at=now + 1)
    rows = {s.id: s for s in await store.snapshots("prod", include_pruned=True)}
    assert (rows[old].remote_state, rows[old].remote_url, rows[old].remote_verified_at,
            rows[old].remote_pruned_at) == ("verified", "s3://bucket/prod/x.db", now, now + 1)
    assert (rows[new].remote_state, rows[new].remote_error) == ("failed", "403 Forbidden")
    with pytest.raises(ValueError, match="unknown column"):
        await store.update_snapshot(old, sha256="forged")
    with pytest.raises(ValueError, match="remote_state 'done' is not one of"):
        await store.update_snapshot(old, remote_state="done")


async def test_drills_the_last_one_per_snapshot(backend):
    store = await backend.store()
    for snapshot_id, ok, at in ((1, False, 10.0), (1, True, 20.0), (2, True, 15.0)):  # ok as a drill gives it
        await store.record_drill(DrillRecord(cluster="prod", snapshot_id=snapshot_id, ok=ok, detail=f"d{at}",
                                             seconds=1.5, at=at, requested_by="schedule"))
    last = await store.last_drills("prod")
    assert {k: (v.ok, v.at) for k, v in last.items()} == {1: (1, 20.0), 2: (1, 15.0)}
    assert await store.last_drill_at("prod", "schedule") == 20.0
    assert await store.last_drill_at("prod", "U0ONCALL01") is None and await store.last_drills("staging") == {}


def _members(*names: str) -> list[Member]:
    return [Member(i + 1, n, (f"http://10.0.0.{i}:2380",), (f"http://10.0.0.{i}:2379",)) for i, n in enumerate(names)]


async def test_memberships_one_row_per_change_and_the_last_one_wins(backend):
    """The memberships the bot records (endpoint-drift fallback; restore's "last membership")."""
    store = await backend.store()
    assert await store.last_membership("prod") is None
    await store.record_membership("prod", _members("member1", "member2"))
    first = await store.last_membership("prod")
    await store.record_membership("prod", list(reversed(_members("member1", "member2"))))  # same membership
    again = await store.last_membership("prod")
    assert first is not None and again is not None
    assert again.members == first.members and again.seen_at >= first.seen_at
    await store.record_membership("prod", _members("member1", "member3"))
    await store.record_membership("staging", _members("s1"))
    members = (await store.last_membership("prod")).members
    assert [m.name for m in members] == ["member1", "member3"]
    assert [r[0] for r in backend.rows("SELECT cluster FROM memberships ORDER BY id")] == ["prod", "prod", "staging"]
    restarted = await backend.store()  # it survives a restart
    members = (await restarted.last_membership("prod")).members
    assert members[1] == Member(2, "member3", ("http://10.0.0.1:2380",), ("http://10.0.0.1:2379",))


async def test_alerts_and_mutes(backend):
    a, b = await backend.store(), await backend.store()
    first = await a.open_alert(NewAlert(cluster="prod", condition="member_down", subject="member1", channel=CHANNEL,
                                        detail="no answer in 2s"))
    second = await b.open_alert(NewAlert(cluster="staging", condition="nospace", subject=""))
    assert first != second
    rows = await b.open_alerts()
    assert [(r.id, r.state, r.flaps) for r in rows] == [(first, "open", 0), (second, "open", 0)]
    assert [r.id for r in await a.open_alerts("prod")] == [first]
    await b.update_alert(first, message_ts="123.456", flaps=2)
    assert (await a.open_alerts("prod"))[0].message_ts == "123.456"
    await a.update_alert(first, state="resolved", resolved_at=time.time())
    assert await b.open_alerts("prod") == [] and len(await b.open_alerts()) == 1
    with pytest.raises(ValueError, match="unknown column"):
        await a.update_alert(first, colour="red")

    until = time.time() + 3600
    await a.set_mute("prod", until, "maintenance", "U0ONCALL01")
    await b.set_mute("prod", until + 60, "longer maintenance", "U0LEAD0001")  # replaces
    await a.set_mute("staging", time.time() - 1, "long over", "U0ONCALL01")  # already expired
    mutes = await b.mutes()
    assert [(m.cluster, m.until, m.reason, m.by) for m in mutes] == [
        ("prod", until + 60, "longer maintenance", "U0LEAD0001")]
    assert not await a.clear_mute("staging") and await a.clear_mute("prod") and not await b.clear_mute("prod")
    assert await b.mutes() == []


async def test_old_resolved_alerts_are_pruned_and_alerts_of_gone_clusters_closed(backend):
    a, b = await backend.store(), await backend.store()
    now, day = time.time(), 86400.0
    ids = {}
    for name, cluster_name, resolved_at in [("old", "prod", now - 40 * day), ("recent", "prod", now - day),
                                       ("open", "prod", None), ("gone", "retired", None)]:
        ids[name] = await a.open_alert(NewAlert(cluster=cluster_name, condition="member_down", subject=name))
        if resolved_at is not None:
            await a.update_alert(ids[name], state="resolved", resolved_at=resolved_at)
    assert await b.prune_alerts(now - 30 * day) == 1 and await a.prune_alerts(now - 30 * day) == 0
    assert [r.id for r in await a.open_alerts()] == [ids["open"], ids["gone"]]  # open ones are never pruned

    assert await b.close_alerts(["prod", "staging"], now) == 1 and await a.close_alerts(["prod"], now) == 0
    assert [r.id for r in await a.open_alerts()] == [ids["open"]]
    assert await a.prune_alerts(now + 1) == 2  # "recent" and the closed "gone": resolved now, pruned in time
    assert await b.close_alerts([], now) == 1 and await a.open_alerts() == []


def received(fingerprint: str, status: str, starts_at: float, cluster: str = "prod") -> ReceivedAlert:
    return ReceivedAlert(cluster, fingerprint, "etcdMembersDown", status, starts_at, None, {"cluster": "prod"}, {})


async def test_a_received_alert_changes_state_once_and_redeliveries_or_late_copies_change_nothing(backend):
    """Two replicas receive Alertmanager's deliveries: the first of each state wins, a repeat is no change."""
    a, b = await backend.store(), await backend.store()
    firing = received("f1", "firing", 100.0)
    assert await a.receive_alert(firing) and not await b.receive_alert(firing)   # redelivered to the other replica
    assert await b.receive_alert(received("f2", "firing", 101.0)) and await a.receive_alert(
        received("s1", "firing", 90.0, cluster="staging"))
    assert [r.fingerprint for r in await b.received_alerts("prod")] == ["f1", "f2"]
    assert await b.receive_alert(received("f1", "resolved", 100.0))
    assert not await a.receive_alert(received("f1", "resolved", 100.0))  # the resolution redelivered
    assert not await a.receive_alert(firing)                              # a late copy of the firing state
    assert [r.fingerprint for r in await a.received_alerts("prod")] == ["f2"]
    assert await a.receive_alert(received("f1", "firing", 200.0))         # it fires again: a new episode
    assert not await b.receive_alert(received("f1", "resolved", 100.0))  # the old episode's end, late
    rows = {r.fingerprint: r for r in await b.received_alerts("prod")}
    assert (rows["f1"].starts_at, rows["f1"].status, rows["f1"].labels) == (200.0, "firing", {"cluster": "prod"})
    await a.receive_alert(received("f2", "resolved", 101.0))
    assert await b.prune_received(time.time() + 1) == 1 and await a.prune_received(time.time() + 1) == 0
    assert [r.fingerprint for r in await a.received_alerts("prod")] == ["f1"]


# ---------------------------------------------------------------- manual stages

async def test_a_confirmation_counts_for_the_stage_the_plan_waits_on_when_it_arrives(backend):
    """Two approvers confirm the stop stage 1.5 s apart; meanwhile the plan moved on to its restore stage: the
    second is refused and the restore stage still waits. A stage not begun, or confirmed already, is refused."""
    leader, follower = await backend.store(), await backend.store()  # the replica running the plan, another one
    await leader.insert_plan(plan_row("p1"))
    nothing = await follower.confirm_stage("p1", "U0LEAD0001", None, 15)
    assert (nothing.outcome, nothing.stage) == (Confirmation.NOT_WAITING, None)  # the plan waits on no stage yet

    stop = await leader.open_stage("p1", "stop")
    assert stop.waiting and stop.key == "stop"
    early = await follower.confirm_stage("p1", "U0LEAD0001", "restore", 15)  # before the restore stage begins
    assert early.outcome is Confirmation.NOT_WAITING and early.stage.key == "stop"
    first = await follower.confirm_stage("p1", "U0LEAD0001", None, 15)
    assert first.outcome is Confirmation.CONFIRMED and first.stage.key == "stop"
    assert first.stage.confirmed_by == "U0LEAD0001" and first.stage.confirmed_at == first.at >= stop.opened_at
    assert (await leader.stage("p1", "stop")).confirmed_by == "U0LEAD0001"
    again = await leader.confirm_stage("p1", "U0LEAD0002", None, 15)  # the stage is confirmed: nothing to add
    assert again.outcome is Confirmation.ALREADY and again.stage.confirmed_by == "U0LEAD0001"
    assert (await leader.close_stage("p1", "stop")).confirmed_by == "U0LEAD0001"

    restore = await leader.open_stage("p1", "restore")
    late = await follower.confirm_stage("p1", "U0LEAD0002", None, 15)  # the second approver's, for the stop
    assert late.outcome is Confirmation.TOO_SOON and late.stage.key == "restore"
    named_old = await follower.confirm_stage("p1", "U0LEAD0002", "stop", 15)
    assert named_old.outcome is Confirmation.ALREADY and named_old.stage.key == "stop"
    assert (await leader.stage("p1", "restore")).waiting  # neither counted for the restore
    named = await follower.confirm_stage("p1", "U0LEAD0002", "restore", 15)  # named: it is meant for this stage
    assert named.outcome is Confirmation.CONFIRMED and named.stage.key == "restore"
    assert named.at - restore.opened_at < 15

    # Once `settle` has passed since the stage began, an unnamed confirmation counts for it.
    start = await leader.open_stage("p1", "start")
    assert (await leader.stage("p1", "restore")).closed_at is not None  # opening a stage ends the wait on another
    assert (await follower.confirm_stage("p1", "U0LEAD0001", None, 0)).outcome is Confirmation.CONFIRMED
    assert start.opened_at >= restore.opened_at


async def test_stage_times_are_the_database_clock_and_a_reopened_stage_waits_afresh(backend, monkeypatch):
    """A replica whose clock is an hour off neither shifts a stage's times nor the settle window: the times
    are the database's. A stage whose wait ended refuses confirmations; opened again (a resumed step), it
    needs a confirmation of its own."""
    a, b = await backend.store(), await backend.store()
    await a.insert_plan(plan_row("p1"))
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this process's clock, skewed
    stop = await a.open_stage("p1", "stop")
    assert abs(stop.opened_at - real()) < 5
    confirmed = await b.confirm_stage("p1", "U0LEAD0001", None, 15)
    assert confirmed.outcome is Confirmation.CONFIRMED and abs(confirmed.at - real()) < 5
    await a.close_stage("p1", "stop")
    await a.open_stage("p1", "restore")
    assert (await b.confirm_stage("p1", "U0LEAD0002", None, 15)).outcome is Confirmation.TOO_SOON
    monkeypatch.setattr(time, "time", real)

    ended = await a.close_stage("p1", "restore")  # nobody confirmed in time
    assert ended is not None and ended.closed_at is not None and ended.confirmed_by is None
    assert (await b.confirm_stage("p1", "U0LEAD0001", "restore", 15)).outcome is Confirmation.NOT_WAITING
    reopened = await a.open_stage("p1", "stop")  # resumed: the stop stage runs again
    assert reopened.waiting and reopened.confirmed_by is None
    assert (await b.confirm_stage("p1", "U0LEAD0002", "stop", 15)).outcome is Confirmation.CONFIRMED
    assert await a.close_stage("p9", "stop") is None and await a.stage("p9", "stop") is None


async def test_racing_confirmations_from_two_replicas_confirm_a_stage_once(backend):
    a, b = await backend.store(), await backend.store()
    await a.insert_plan(plan_row("p1"))
    await a.open_stage("p1", "stop")
    answers = await asyncio.gather(*((a if i % 2 else b).confirm_stage("p1", f"U0LEAD000{i}", None, 15)
                                     for i in range(8)))
    outcomes = [x.outcome for x in answers]
    assert outcomes.count(Confirmation.CONFIRMED) == 1 and outcomes.count(Confirmation.ALREADY) == 7
    winner = next(x.stage.confirmed_by for x in answers if x.outcome is Confirmation.CONFIRMED)
    assert {x.stage.confirmed_by for x in answers} == {winner}


async def test_the_outbox_keeps_posts_in_order_until_each_is_posted(backend):
    """What was done from a shell, kept until a replica posts it: oldest first, and never handed out again."""
    a, b = await backend.store(), await backend.store()
    await a.queue_post(CHANNEL, "p1", "approved by bob")
    await a.queue_post(CHANNEL, None, "a message in the channel")
    await a.queue_post(CHANNEL, "p1", "step 0 done")
    queued = await b.queued_posts()
    assert [(r.plan_id, r.text, r.channel, r.posted_at) for r in queued] == [
        ("p1", "approved by bob", CHANNEL, None), (None, "a message in the channel", CHANNEL, None),
        ("p1", "step 0 done", CHANNEL, None)]
    await b.mark_posted(queued[0].id)
    assert [r.text for r in await a.queued_posts(limit=1)] == ["a message in the channel"]


async def test_a_cancel_and_a_confirmation_racing_on_a_stage_one_wins(backend):
    """`/etcd cancel` of a plan waiting on a person and `/etcd continue` of that stage, from two replicas at once:
    exactly one counts. A cancel wins only a waiting stage of a running plan, and moves the plan to cancelled
    in the same write (so the plan is closed even when the replica running it is gone)."""
    a, b = await backend.store(), await backend.store()
    await a.insert_plan(plan_row("p1"))
    assert await a.transition("p1", [PlanState.PROPOSED], PlanState.RUNNING)
    assert await b.cancel_stage("p1", "U0LEAD0001", "why") is None  # waits on nobody: nothing changes
    assert (await a.plan("p1")).state == PlanState.RUNNING
    for round_ in range(4):
        await a.open_stage("p1", f"stage{round_}")
        cancel, confirm = await asyncio.gather(b.cancel_stage("p1", "U0LEAD0001", "host unreachable"),
                                               a.confirm_stage("p1", "U0LEAD0002", None, 0))
        if cancel is not None:
            assert confirm.outcome is not Confirmation.CONFIRMED
            plan = await a.plan("p1")
            assert (plan.state, plan.decided_by, plan.error) == (PlanState.CANCELLED, "U0LEAD0001", "host unreachable")
            assert cancel.key == f"stage{round_}" and cancel.closed_at is not None and not cancel.confirmed_by
            stage = await a.stage("p1", cancel.key)
            assert stage is not None and not stage.waiting and stage.confirmed_by is None
            return
        assert confirm.outcome is Confirmation.CONFIRMED and (await a.plan("p1")).state == PlanState.RUNNING
    assert await b.cancel_stage("p1", "U0LEAD0001", "x") is None  # every stage confirmed: none left to cancel
    await a.open_stage("p1", "last")
    assert (await b.cancel_stage("p1", "U0LEAD0001", "x")).key == "last"


async def test_a_stage_opened_by_a_replica_that_lost_its_lease_is_refused(backend):
    a, b = await backend.store(), await backend.store()
    await a.insert_plan(plan_row("p1"))
    lease = await a.acquire_lease("leader", "replica-a", 30)
    await a.open_stage("p1", "stop", fence=lease.fence)
    await a.release_lease("leader", "replica-a")
    await b.acquire_lease("leader", "replica-b", 30)
    with pytest.raises(LeaseLost):
        await a.open_stage("p1", "restore", fence=lease.fence)
    with pytest.raises(LeaseLost):
        await a.close_stage("p1", "stop", fence=lease.fence)
    assert (await b.stage("p1", "stop")).waiting and await b.stage("p1", "restore") is None


# ---------------------------------------------------------------- audit

async def test_one_audit_chain_under_concurrent_writers_from_two_replicas(backend):
    a, b = await backend.store(TEST_AUDIT_KEY), await backend.store(TEST_AUDIT_KEY)
    ids = await asyncio.gather(*((a if i % 2 else b).audit("command", user=f"U{i}", cluster="prod",
                                                           detail={"plan": f"p{i % 3}", "n": i})
                                 for i in range(60)))
    assert sorted(ids) == list(range(1, 61))
    assert await a.verify_audit() == (60, None) and await b.verify_audit() == (60, None)
    assert await a.audit_keyed_from() == 1
    rows = await b.audit_rows()
    assert [r.id for r in rows] == list(range(1, 61))
    assert all(r.prev_hash == p.hash for p, r in zip(rows, rows[1:], strict=False))
    assert await a.acted_before("command", "U4", "p1") and not await a.acted_before("command", "U4", "p2")
    assert await a.audit_rows(since=time.time() + 60) == []


WRITER = """
import asyncio, os, sys
from bot.store.postgres import PostgresStore
from bot.store.sqlite import SqliteStore

async def main(target, name):
    store = (PostgresStore(target, password=os.environ["PGPASSWORD_TEST"]) if "://" in target
             else SqliteStore(target))
    await store.open()
    try:
        await asyncio.gather(*(store.audit("command", user=f"{name}-{i}") for i in range(25)))
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_one_audit_chain_from_two_processes(backend):
    """Two bot processes appending at once (the lock is the database's, not the process's)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PGPASSWORD_TEST": backend.postgres.password if backend.postgres
           else ""}
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, str(backend.target), name, env=env)
             for name in ("replica-a", "replica-b")]
    assert [await asyncio.wait_for(p.wait(), 60) for p in procs] == [0, 0]
    store = await backend.store()
    rows = await store.audit_rows()
    assert [r.id for r in rows] == list(range(1, 51)) and await store.verify_audit() == (50, None)
    assert {r.user.split("-")[1] for r in rows} == {"a", "b"}


async def test_a_writer_holding_the_lock_too_long_is_refused_clearly(backend):
    """Waited for (a bounded time), then StoreBusy saying nothing changed; then it works again."""
    store = await backend.store(timeout=0.2)
    await store.audit("command")
    if isinstance(backend.target, str):
        assert backend.postgres is not None
        holder: Any = psycopg.connect(backend.target, password=backend.postgres.password, autocommit=True)
        holder.execute(b"SELECT pg_advisory_lock(%s)", [AUDIT_LOCK])  # another replica mid-append
    else:
        holder = sqlite3.connect(backend.target, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process mid-write
    try:
        with pytest.raises(StoreBusy, match="nothing was changed"):
            await store.audit("command")
    finally:
        holder.close()
    await store.audit("command")
    assert await store.verify_audit() == (2, None)


async def test_an_unkeyed_chain_is_keyed_at_the_first_start_with_a_key(backend):
    plain = await backend.store()
    await plain.audit("command", user="U0ONCALL01")
    keyed = await backend.store(TEST_AUDIT_KEY)
    await keyed.continue_audit_chain()
    assert [r.action for r in await keyed.audit_rows()] == ["command", "audit_keyed"]
    assert await keyed.verify_audit() == (2, None) and await keyed.audit_keyed_from() == 2
    with pytest.raises(StoreError, match="keyed with HMAC up to row 2, but no audit key is configured"):
        await plain.audit("command")
    assert (await plain.verify_audit())[1].startswith("row 2 is keyed with HMAC and no audit key")


# ---------------------------------------------------------------- records, typed

def typed_as(value: Any, declared: Any) -> bool:
    """Whether `value` is of the declared type, strictly: a bool is no int, an int no float, 0 no bool."""
    origin, args = typing.get_origin(declared), typing.get_args(declared)
    if declared is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(typed_as(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(typed_as(v, args[0]) for v in value)
    if origin is not None:
        return isinstance(value, origin)
    if declared is type(None):
        return value is None
    if declared in (int, float, bool):
        return type(value) is declared
    return isinstance(value, declared)


def mistyped(record: Any) -> list[str]:
    """The fields of a record whose value is not of the type its dataclass declares."""
    hints = typing.get_type_hints(type(record))
    return [f"{type(record).__name__}.{f.name} = {getattr(record, f.name)!r}, declared {hints[f.name]}"
            for f in fields(record) if not typed_as(getattr(record, f.name), hints[f.name])]


async def test_every_record_reads_back_as_written_with_each_field_typed_as_declared(backend):
    """What the store returns is what was written, field for field, and of the type each record declares on
    both backends: PostgreSQL hands back its INTEGER flags as ints and SQLite its REAL columns as floats."""
    store = await backend.store(TEST_AUDIT_KEY)
    await store.insert_plan(plan_row())
    assert await store.add_approval("abc123", "U0LEAD0001", 1) == (True, 1, True)
    plan = await store.plan("abc123")

    new = snapshot_row(created_at=1_700_000_000.0, encrypted=True, live_keys=None, duration=2.0, plan_id="abc123",
                       pruned_at=1_700_000_100.0, remote_url="s3://bucket/prod/x.db",
                       remote_state=RemoteState.VERIFIED, remote_verified_at=1_700_000_050.0)
    snapshot_id = await store.record_snapshot(new)
    await store.update_snapshot(snapshot_id, remote_error="403 Forbidden", remote_pruned_at=1_700_000_200.0)
    (snapshot,) = await store.snapshots("prod", include_pruned=True)
    assert snapshot == SnapshotRecord(**{f.name: getattr(new, f.name) for f in fields(new)}, id=snapshot_id,
                                      remote_error="403 Forbidden", remote_pruned_at=1_700_000_200.0)

    drill = DrillRecord(cluster="prod", snapshot_id=snapshot_id, ok=True, detail="42 keys", seconds=3.0, at=5.0,
                        requested_by="schedule")
    await store.record_drill(drill)
    assert await store.last_drills("prod") == {snapshot_id: drill}

    alert = NewAlert(cluster="prod", condition="member_down", subject="member1", channel=CHANNEL, message_ts="1.5",
                     detail="{}", flaps=2, opened_at=10.0, updated_at=11.0)
    alert_id = await store.open_alert(alert)
    (opened,) = await store.open_alerts("prod")
    assert opened == AlertRecord(id=alert_id, state="open", resolved_at=None,
                                 **{f.name: getattr(alert, f.name) for f in fields(alert)})

    until = time.time() + 3600
    await store.set_mute("prod", until, "maintenance", "U0ONCALL01")
    (mute,) = await store.mutes()
    assert (mute.cluster, mute.until, mute.reason, mute.by) == ("prod", until, "maintenance", "U0ONCALL01")

    members = [replace(m, is_learner=i == 1) for i, m in enumerate(_members("member1", "member2"))]
    await store.record_membership("prod", members)
    membership = await store.last_membership("prod")
    assert membership is not None and membership.members == tuple(members)

    await store.step_started("abc123", 0, "check")
    await store.step_finished("abc123", 0, "done", "all healthy")
    (step,) = await store.steps("abc123")
    assert (step.plan_id, step.idx, step.key, step.state, step.detail, step.attempts) == (
        "abc123", 0, "check", "done", "all healthy", 1)

    await store.audit("command", user="U0ONCALL01", channel=CHANNEL, cluster="prod", detail={"n": 1})
    (entry,) = await store.audit_rows()
    assert (entry.id, entry.user, entry.action, json.loads(entry.detail)) == (1, "U0ONCALL01", "command", {"n": 1})

    await store.open_stage("abc123", "stop")
    assert (await store.confirm_stage("abc123", "U0LEAD0001", None, 0.0)).outcome is Confirmation.CONFIRMED
    lease = await store.acquire_lease("leader", "replica-a", 30.0)

    records = [plan, snapshot, *(await store.last_drills("prod")).values(), opened, mute, membership,
               *membership.members, step, entry, await store.stage("abc123", "stop"), lease,
               await store.lease("leader"), *await store.migrations_applied()]
    assert all(dataclasses.is_dataclass(r) for r in records)
    assert [m for r in records for m in mistyped(r)] == []


# ---------------------------------------------------------------- migrations

async def test_replicas_starting_together_migrate_exactly_once(backend):
    stores = [backend.new() for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    for store in stores:
        assert await store.schema_version() == LATEST
    applied = await stores[0].migrations_applied()
    assert [m.version for m in applied] == list(range(1, LATEST + 1))
    assert len(backend.rows("SELECT version FROM schema_migrations")) == LATEST  # one row per migration
    await stores[1].insert_plan(plan_row())  # and the schema is whole
    assert (await stores[2].plan("abc123")) is not None


async def test_a_database_one_migration_behind_is_brought_up_to_date(backend):
    """As a release at version 1 left it: the later migrations run once, rows stay."""
    store = await backend.store()
    await store.insert_plan(plan_row())
    snapshot = await store.record_snapshot(snapshot_row())
    await store.close()
    for statement in ["DELETE FROM schema_migrations WHERE version >= 2", "DROP TABLE stages", "DROP TABLE leases",
                      "DROP TABLE alerts", "DROP TABLE mutes", "DROP TABLE outbox", "DROP TABLE received_alerts",
                      *(f"ALTER TABLE snapshots DROP COLUMN {c}" for c in (
                          "remote_url", "remote_state", "remote_error", "remote_verified_at", "remote_pruned_at"))]:
        backend.rows(statement)
    store = await backend.store()
    assert [m.version for m in await store.migrations_applied()] == list(range(1, LATEST + 1))
    assert (await store.plan("abc123")) is not None
    assert (await store.open_stage("abc123", "stop")).waiting
    await store.update_snapshot(snapshot, remote_state="uploading")
    assert (await store.snapshots("prod"))[0].remote_state == "uploading"
    assert await store.open_alert(NewAlert(cluster="prod", condition="member_down")) == 1


def released_schema(dialect: str) -> tuple[str, dict[int, tuple[str, list[str]]]]:
    """tests/store_schemas/: the migrations table's DDL, and each released version's name and statements."""
    preamble, *sections = re.split(r"^-- version (\d+): (.*)$", (SCHEMAS / f"{dialect}.sql").read_text(), flags=re.M)
    table, = statements(preamble)
    return table, {int(sections[i]): (sections[i + 1], statements(sections[i + 2])) for i in range(0, len(sections), 3)}


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@pytest.mark.parametrize("version", range(1, LATEST + 1))
async def test_a_database_as_a_release_left_it_opens_with_its_rows_and_the_schema_it_would_have(
        request, tmp_path, backend, version):
    """Built with the DDL the releases ran (up to `version`) and a row or two: the store opens it,
    applies what is newer, reads the rows, and the schema is exactly a new database's (which,
    at the latest version, is the released one: the DDL written once renders what each backend had)."""
    table, released = released_schema(backend.dialect)
    assert sorted(released) == list(range(1, LATEST + 1)), "a released migration adds its section to store_schemas/"
    backend.rows(table)
    for number, (name, ddl) in released.items():
        if number <= version:
            for statement in ddl:
                backend.rows(statement)
            backend.rows(f"INSERT INTO schema_migrations VALUES ({number}, {literal(name)}, 0)")
    backend.rows("INSERT INTO plans (id, cluster, state, channel, proposer, created_at, expires_at, fingerprint, plan, "
                 f"updated_at) VALUES ('abc123', 'prod', 'proposed', '{CHANNEL}', 'U0ONCALL01', 1, 2, 'f', "
                 f"{literal(PLAN_JSON)}, 1)")
    backend.rows("INSERT INTO events (event_id, received_at) VALUES ('Ev-released', 1)")

    store = await backend.store()
    assert [m.version for m in await store.migrations_applied()] == list(range(1, LATEST + 1))
    record = await store.plan("abc123")
    assert record is not None and record.kind is PlanKind.REPLACE and record.state is PlanState.PROPOSED
    assert not await store.first_delivery("Ev-released")
    fresh = Backend(backend.kind, tmp_path, backend.postgres, file="fresh.db")
    await fresh.store()
    await fresh.close()
    assert backend.schema() == fresh.schema()


async def test_a_database_of_a_newer_bot_is_refused(backend):
    store = await backend.store()
    await store.close()
    backend.rows("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    with pytest.raises(StoreError, match=f"schema version 99 is newer than this bot's \\({LATEST}\\)"):
        await backend.store()


async def test_a_first_release_sqlite_file_is_upgraded_in_place(tmp_path):
    """A file written before versioned migrations (no schema_migrations, none of the later
    columns and tables) opens, keeps its rows, and gains the new schema."""
    path = tmp_path / "etcd-chatops.db"
    store = await SqliteStore(path).open()
    await store.insert_plan(plan_row())
    snapshot = await store.record_snapshot(snapshot_row())
    await store.audit("command", user="U0ONCALL01")
    await store.close()
    as_released(path, added_columns=False)
    with sqlite3.connect(path) as db:
        assert not db.execute("SELECT 1 FROM sqlite_master WHERE name IN ('schema_migrations', 'leases')").fetchall()
    store = await SqliteStore(path).open()
    try:
        assert await store.schema_version() == LATEST
        assert must(await store.plan("abc123")).kind is PlanKind.REPLACE  # the column's default
        await store.update_snapshot(snapshot, remote_state="verified")
        assert (await store.snapshots("prod"))[0].remote_state == "verified"
        assert await store.acquire_lease("leader", "a", 5) is not None
        assert await store.verify_audit() == (1, None)
    finally:
        await store.close()


async def test_postgres_tables_of_another_program_are_refused_untouched(postgres):
    url = postgres.create_database()
    with psycopg.connect(url, password=postgres.password, autocommit=True) as conn:
        conn.execute(b"CREATE TABLE plans (id TEXT PRIMARY KEY, cluster TEXT NOT NULL, state TEXT NOT NULL)")
    store = PostgresStore(url, password=postgres.password)
    with pytest.raises(StoreError, match=r"^database postgresql://etcd_chatops@127\.0\.0\.1:\d+/t_\w+: table plans "
                                         r"does not match this version of the bot \(no column kind, channel, "):
        await store.open()
    await store.close()
    with psycopg.connect(url, password=postgres.password) as conn:
        tables = [r[0] for r in conn.execute(b"SELECT table_name FROM information_schema.tables "
                                             b"WHERE table_schema = 'public'")]
    assert tables == ["plans"]  # no schema_migrations: the refusal altered nothing


async def test_both_backends_have_the_same_columns(postgres):
    """One name for one thing: the contract's rows carry the same keys on both backends."""
    from bot.store.schema import expected_columns

    url = postgres.create_database()
    store = await PostgresStore(url, password=postgres.password).open()
    await store.close()
    with psycopg.connect(url, password=postgres.password) as conn:
        for table, columns in expected_columns(LATEST).items():
            rows = conn.execute(b"SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                                b"ORDER BY ordinal_position", [table]).fetchall()
            assert [r[0] for r in rows] == columns, table


# ---------------------------------------------------------------- PostgreSQL: restarts and secrets

@pytest.mark.e2e  # (its own PostgreSQL server)
async def test_postgres_down_calls_fail_in_one_line_and_the_store_reconnects_as_soon_as_it_is_back():
    with LocalPostgres() as server:  # its own server: the suite's keeps running
        url = server.create_database()
        store = await PostgresStore(url, password=server.password, timeout=1).open()
        try:
            await store.insert_plan(plan_row())
            server.stop()
            for _ in range(8):  # an outage of ~8 s: longer than the pool's own reconnect backoff
                with pytest.raises(StoreError) as failed:
                    await store.plan("abc123")
                message = str(failed.value)
                assert message == (f"database {dsn.redact(url)}: "
                                   "no connection within 1s (PostgreSQL down or unreachable?)")
            server.start()
            back = time.monotonic()
            record = await eventually(lambda: store.plan("abc123"), timeout=30, what="the store reconnecting",
                                      retry_on=(StoreError,))
            assert record.state is PlanState.PROPOSED
            assert time.monotonic() - back < 3  # at once, not after the pool's backoff (it was 7-8 s)
        finally:
            await store.close()
        # A restart while idle: the pooled connection is dead, the next call still works. With the default
        # deadline: 1 s to notice the dead connection and open a new one failed once beside a busy CPU.
        store = await PostgresStore(url, password=server.password).open()
        try:
            assert await store.first_delivery("Ev-before-restart")
            server.restart()
            assert await store.first_delivery("Ev-after-restart")
        finally:
            await store.close()


async def test_a_store_just_opened_answers_from_a_connection_it_already_holds(postgres):
    """open() returns once the pool holds its first connection. Before, the pool connected in the background,
    and the first call waited for it within its own deadline: with 0.2 s (the lock test below), 'no connection
    within 0.2s' in a full run. Here no new connection can be made once the store is open."""
    url = postgres.create_database()
    store = await PostgresStore(url, password=postgres.password, timeout=0.2).open()
    try:
        with psycopg.connect(postgres.url(), password=postgres.password, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{url.rsplit("/", 1)[1]}" ALLOW_CONNECTIONS false'.encode())
        assert await store.plan("abc123") is None
    finally:
        await store.close()


async def test_a_pool_slower_than_the_warm_up_still_opens_the_store(postgres, monkeypatch, caplog):
    """open() waits for the pool's first connection only so long: past it, the store opens, says so in the log,
    and its calls wait for the connection as before. A store that refused to open then (its first connection
    took over 1 s beside a busy CPU) kept a bot from starting."""
    monkeypatch.setattr(postgres_store, "WARM_UP_SECONDS", 0.0)
    url = postgres.create_database()
    store = await PostgresStore(url, password=postgres.password).open()
    try:
        assert await store.plan("abc123") is None
    finally:
        await store.close()
    assert "the pool holds no connection yet" in caplog.text and postgres.password not in caplog.text


async def test_a_password_never_appears_in_a_store_error(postgres):
    url = postgres.create_database()
    wrong = "wrong-" + postgres.password[::-1]
    postgres_module.ISSUED.append(wrong)  # the suite's secret check looks for it in every log line too
    for store in (PostgresStore(url, password=wrong),
                  PostgresStore(url.replace("etcd_chatops@", f"etcd_chatops:{wrong}@"))):
        with pytest.raises(StoreError) as refused:
            await store.open()
        await store.close()
        text = str(refused.value)
        assert "password authentication failed" in text and wrong not in text and "\n" not in text
        assert text.startswith(f"database {url}: ")


async def _audit_rows_reach(store: Store, n: int) -> bool:
    return len(await store.audit_rows()) >= n


async def test_the_bot_on_postgresql_serves_and_its_audit_verifies(cluster, slack, start_bot, postgres, pg_url,
                                                                     tmp_path, cli):
    """The whole path: config -> open_store -> the bot's commands, readiness and audit; then
    `audit verify` and `audit export` read the same chain from PostgreSQL."""
    password_file = tmp_path / "db-password"
    password_file.write_text(postgres.password + "\n")
    bot = await start_bot([cluster_table("prod", cluster)], database=pg_url,
                          database_password_file=str(password_file))
    assert isinstance(bot.ctx.store, PostgresStore) and postgres.password in bot.ctx.secrets()
    assert "HEALTHY" in text_of(await reply(slack, "status"))
    assert "unknown subcommand" in text_of(await ephemeral(slack, "frobnicate"))
    async with aiohttp.ClientSession() as http, http.get(f"{bot.base_url}/readyz") as r:
        body = await r.json()
    assert r.status == 200 and body["checks"]["database"] == "ok"
    # (a usage error is answered with the ack, its audit row written just after)
    await eventually(lambda: _audit_rows_reach(bot.ctx.store, 2), timeout=10, what="both audit rows")
    config = str(tmp_path / "config.toml")
    ok = cli("audit", "verify", "--config", config)
    assert ok.returncode == 0 and ok.stdout == ("audit log intact: 2 row(s), hash chain verified, unkeyed: anyone "
                                                "who can write the database can rewrite it undetected\n")
    rows = [json.loads(line) for line in cli("audit", "export", "--config", config).stdout.splitlines()]
    assert [r["action"] for r in rows] == ["command", "usage_error"]
    assert postgres.password not in ok.stdout + ok.stderr


# ---------------------------------------------------------------- configuration

def _config(tmp_path: Path, **top: Any):
    return parse_config({"clusters": [{"name": "prod", "endpoints": ["http://127.0.0.1:2379"]}], **top}, tmp_path)


def test_the_database_setting_picks_the_backend(tmp_path, monkeypatch):
    assert _config(tmp_path).database == tmp_path / "etcd-chatops.db"
    monkeypatch.setenv("ETCD_CHATOPS_DB_PASSWORD", "s3cret-db-password")
    config = _config(tmp_path, database="postgresql://etcd-chatops@db:5432/etcd_chatops",
                     database_password_env="ETCD_CHATOPS_DB_PASSWORD")
    assert config.database == "postgresql://etcd-chatops@db:5432/etcd_chatops"
    assert config.database_password == "s3cret-db-password" and "s3cret" not in repr(config)
    assert config.database_secrets() == ["s3cret-db-password"]
    inline = _config(tmp_path, database="postgres://bot:inline-pass-123@db/etcd?sslmode=require")
    assert inline.database_secrets() == ["inline-pass-123"]
    assert inline.database_shown == "postgres://bot@db/etcd"


@pytest.mark.parametrize("top, problem", [
    ({"database": "mysql://bot:pw123456@db/etcd"}, "database: mysql://bot@db/etcd: not a postgresql:// URL"),
    ({"database": "postgresql://bot:pw123456@db:99999/etcd"},
     "database: postgresql://(unparsable URL): the port is not a number from 1 to 65535"),
    ({"database": "postgresql://bot@db/etcd?sslmod=require"},
     "database: postgresql://bot@db/etcd: unknown connection parameter 'sslmod'"),
    ({"database": "postgresql://bot@db/etcd/more"}, "database: postgresql://bot@db/etcd/more: the database name is "
                                                    "one path segment"),
    ({"database_password_env": "HOME"}, "database_password_env: only a postgresql:// database takes a password"),
])
def test_a_bad_database_setting_is_one_line_without_the_password(tmp_path, top, problem):
    with pytest.raises(ConfigError) as bad:
        _config(tmp_path, **top)
    assert str(bad.value).startswith(problem) and "pw123456" not in str(bad.value)


def test_check_config_shows_the_url_without_its_password(tmp_path, cli):
    config = tmp_path / "config.toml"
    config.write_text('database = "postgresql://bot:pw-in-url-123@db.internal:5432/etcd"\n'
                      '[[clusters]]\nname = "prod"\nendpoints = ["http://127.0.0.1:2379"]\n')
    proc = cli("check-config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "database: postgresql://bot@db.internal:5432/etcd" in proc.stdout
    assert "pw-in-url-123" not in proc.stdout + proc.stderr


async def test_open_store_picks_sqlite_for_a_path(tmp_path):
    store = await open_store(_config(tmp_path))
    try:
        assert isinstance(store, SqliteStore) and await store.schema_version() == LATEST
    finally:
        await store.close()
