"""One seed, start to end: the world started, the operation run through Slack while the schedule's
faults strike, everything healed, the bot left to settle, every plan taken to an end through Slack
(resumed, else abandoned), and the invariants checked (tests/robustness/invariants.py)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bot.domain.errors import EtcdError
from bot.domain.plan import PlanState
from bot.domain.record import PlanRecord
from bot.domain.replace import ReplacePlan
from bot.etcd.client import EtcdClient
from bot.etcd.health import check_cluster
from bot.store.base import StoreError
from bot.testing.netbed import Link
from bot.testing.postgres import LocalPostgres
from bot.testing.s3 import MotoS3
from bot.testing.slack import Message, SlackStandIn
from bot.testing.workspace import CHANNELS, LEAD, USERGROUPS, USERS, SlackSecrets
from robustness.harness import World, all_keys
from robustness.invariants import Evidence, check_all, check_leftovers
from robustness.schedule import Operation, Schedule

SETTLE_SECONDS = 120.0   # after the heal: a plan still running then has no replica working on it
OPEN = (PlanState.APPROVED, PlanState.RUNNING)
SNAPSHOTS_AT = (0.0, 2.5, 5.0, 7.5)  # the snapshot operation's requests, in seconds


@dataclass
class Outcome:
    schedule: Schedule
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    faults_injected: int = 0
    seconds: float = 0.0
    plans: list[str] = field(default_factory=list)  # "id kind: state (error)" of every plan, at the end

    def report(self) -> str:
        lines = [self.schedule.describe(), f"replay: make robustness SEED={self.schedule.seed}"]
        lines += [f"plan {p}" for p in self.plans]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"VIOLATION {v}" for v in self.violations]
        return "\n".join(lines)


async def run_seed(schedule: Schedule, s3: MotoS3, pg: LocalPostgres | None, bin_dir: Path) -> Outcome:
    began = time.monotonic()
    outcome = Outcome(schedule)
    creds = SlackSecrets()
    slack = SlackStandIn(bot_token=creds.bot_token, signing_secret=creds.signing_secret, users=USERS,
                         usergroups=USERGROUPS, channels=CHANNELS)
    await slack.start()
    world = World(schedule, slack, creds, s3, pg if schedule.database == "postgres" else None, bin_dir)
    prefix = ""
    try:
        await world.start()
        assert world.cluster is not None
        prefix = world.cluster.net.prefix
        operation_started = await operate(world, outcome)
        await world.heal_all()
        evidence = await settle(world, outcome, operation_started)
        outcome.violations += await check_all(world, evidence)
        outcome.notes += world.notes
        w = world.workload
        assert w is not None
        outcome.notes.append(f"client: {len(w.writes)} writes acknowledged, {len(w.reads)} reads, errors "
                             f"{dict(w.errors) or 'none'}")
    finally:
        outcome.faults_injected = sum(1 for i in world.injected if not i.skipped)
        outcome.notes += [f"{i.fault.describe()}: {i.note}" for i in world.injected if i.note]
        keep(world, outcome)
        with contextlib.suppress(Exception):
            await world.close()
        await slack.stop()
    outcome.violations += check_leftovers(world, prefix)
    outcome.seconds = time.monotonic() - began
    return outcome


def keep(world: World, outcome: Outcome) -> None:
    """With ROBUSTNESS_ARTIFACTS=DIR, what a seed that failed or noted something leaves for a person: the bot's
    and the members' logs, and every Slack message (the world's own directory is removed with it)."""
    into = os.environ.get("ROBUSTNESS_ARTIFACTS")
    if not into or not (outcome.violations or world.notes or sys.exc_info()[0]):
        return
    target = Path(into) / f"seed-{world.s.seed}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for log in [*world.root.glob("*.log"), *(world.root / "bed" / "logs").glob("*.log")]:
        shutil.copy(log, target / log.name)
    (target / "slack.json").write_text(json.dumps([dataclasses.asdict(m) for m in world.slack.messages], indent=1))
    (target / "schedule.json").write_text(world.s.to_json())


async def operate(world: World, outcome: Outcome) -> float:
    """The operation through Slack, and the schedule's faults while it runs; returns when it was approved."""
    s, c = world.s, world.cluster
    assert c is not None
    text = ""
    if s.operation is Operation.REPLACE:
        failed = s.failed[0]
        await asyncio.to_thread(c.kill, failed)
        world.truth.set(failed, "failed", True)
        spare = c.host(world.spares[0])
        text = (f"replace {failed} {world.spares[0]} {spare.url(Link.PEER)} --client-url {spare.url(Link.CLIENT)}"
                + ("" if s.learner else " --no-learner"))
    elif s.operation is Operation.RESTORE:
        answer = await world.ask("snapshot", until=_snapshot_answer, wait=60.0)
        outcome.notes.append(f"snapshot before the quorum loss: {answer}")
        await asyncio.sleep(0.5)  # writes acknowledged after the snapshot: a restore loses them by design
        for member in s.failed:
            world.truth.set(member, "failed", True)
        await asyncio.gather(*(asyncio.to_thread(c.kill, m) for m in s.failed))
        text = "restore"
    elif s.operation is Operation.DEFRAG:
        text = "defrag"
    if s.operation is Operation.SNAPSHOT:  # one every few seconds, so that the faults meet some
        started = time.time()

        async def snapshot_at(at: float) -> str:
            await asyncio.sleep(at)
            return await world.ask("snapshot", until=_snapshot_answer, wait=120.0)
        await world.before_approval()
        asked = [asyncio.create_task(snapshot_at(at)) for at in SNAPSHOTS_AT]
        await world.run_schedule()
        outcome.notes += [f"snapshot: {answer}" for answer in await asyncio.gather(*asked)]
        return started
    plan = await world.propose(text)
    await world.before_approval()
    started = time.time()
    if isinstance(plan, Message):
        await world.approve(plan, s.operation.value)
    else:
        outcome.notes.append(f"/etcd {text}: {plan}")
    await world.run_schedule()
    return started


def _snapshot_answer(m: Message) -> bool:
    """The channel's answer to `/etcd snapshot`: the snapshot, or why it failed."""
    return m.thread_ts is None and m.ephemeral_to is None and m.text.startswith("Snapshot")


async def settle(world: World, outcome: Outcome, started: float) -> Evidence:
    """Let the bot finish what it can; then take every plan to an end through Slack (a stopped plan is
    resumed, and abandoned when it stops again; a proposed one is cancelled), and read the cluster."""
    assert world.store is not None and world.cluster is not None and world.workload is not None
    evidence = Evidence(started=started)
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        plans = await _plans(world)
        if not any(p.state in OPEN for p in plans):
            break
        await asyncio.sleep(0.5)
    for p in await _plans(world):
        if p.state in OPEN:
            evidence.stuck.append(f"plan {p.id} ({p.kind}) still {p.state} {SETTLE_SECONDS:g}s after every fault "
                                  "healed: no replica works on it")
        evidence.first_states[p.id] = (p.state, p.error)
    for p in await _plans(world):
        if p.state in (PlanState.FAILED, PlanState.INTERRUPTED):
            await finish(world, p, evidence)
        elif p.state is PlanState.PROPOSED:
            approvals = ", ".join(p.approvals) or "none"
            world.notes.append(f"plan {p.id} ({p.kind}) was never approved: approvals {approvals}")
            await world.ask(f"cancel {p.id}", LEAD)
            end = await _wait_state(world, p.id, (PlanState.CANCELLED,), 30.0)
            if end is None or end.state is not PlanState.CANCELLED:
                evidence.unfinishable.append(f"proposed plan {p.id} could not be cancelled: "
                                             f"{end.state if end else 'unknown'}")
    evidence.plans = await _plans(world)
    # One more snapshot once all is healed: it retries every kept snapshot's failed or cut-short upload.
    evidence.last_snapshot = await world.ask("snapshot", until=_snapshot_answer, wait=120.0)
    evidence.snapshots = await world.store.snapshots("prod", limit=1000)
    outcome.plans = [f"{p.id} {p.kind}: {p.state}" + (f" ({p.error})" if p.error else "") for p in evidence.plans]
    await world.workload.stop()
    if world.monitor is not None:
        await world.monitor.stop()
    evidence.final_keys, evidence.final_revision = await _final_read(world, evidence)
    return evidence


async def finish(world: World, p: PlanRecord, evidence: Evidence) -> None:
    """A stopped plan, once the faults are healed: resumed; if it stops again, abandoned."""
    answer = await world.ask(f"resume {p.id}", LEAD)
    evidence.resumed[p.id] = answer
    if answer.startswith("Resuming plan"):
        end = await _wait_state(world, p.id, (PlanState.DONE, PlanState.FAILED, PlanState.INTERRUPTED), 150.0)
        if end is None or end.state in OPEN:
            evidence.stuck.append(f"plan {p.id} ({p.kind}) still {end.state if end else 'unknown'} 150s after "
                                  "it was resumed")
            return
        evidence.resumed[p.id] += f" -> {end.state}" + (f" ({end.error})" if end.error else "")
        if end.state is PlanState.DONE:
            return
    answer = await world.ask(f"abandon {p.id} the robustness harness gives up <!channel>", LEAD)
    end = await _wait_state(world, p.id, (PlanState.ABANDONED,), 30.0)
    if end is None or end.state is not PlanState.ABANDONED:
        evidence.unfinishable.append(f"plan {p.id} ({p.kind}) could not be abandoned after it stopped: "
                                     f"{end.state if end else 'unknown'}; the bot answered: {answer}")


async def _wait_state(world: World, plan_id: str, states: tuple[PlanState, ...], timeout: float) -> PlanRecord | None:
    """The plan once in one of `states` (or as it is at the deadline)."""
    assert world.store is not None
    deadline = time.monotonic() + timeout
    row: PlanRecord | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(StoreError):
            row = await world.store.plan(plan_id)
        if row is not None and row.state in states:
            return row
        await asyncio.sleep(0.3)
    return row


async def _plans(world: World) -> list[PlanRecord]:
    assert world.store is not None
    for _ in range(20):
        with contextlib.suppress(StoreError):
            return await world.store.plans("prod", limit=50)
        await asyncio.sleep(0.5)  # PostgreSQL restarting
    return await world.store.plans("prod", limit=50)


async def _final_read(world: World, evidence: Evidence) -> tuple[set[str] | None, int]:
    """Every key the client wrote that the cluster still has. A restore that stopped part-way leaves the
    members it killed dead: they are started again on their own data (as a person would), unless the
    restore had replaced some member's data already (the cluster is then rebuilt by hand: no read)."""
    c = world.cluster
    assert c is not None and world.workload is not None
    restored = any(p.kind == "restore" and p.state is not PlanState.DONE and p.current_step >= 2
                   for p in evidence.plans)
    if restored:
        world.notes.append("a restore stopped after it had replaced data: the cluster is left to a person")
        return None, 0
    for member in world.s.failed:
        if member in c.members and not c.running(member) and not _removed(evidence, member):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(c.restart, member, 15.0)
    endpoints = world.workload.endpoints
    deadline = time.monotonic() + 45.0
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            async with EtcdClient(endpoints, timeout=2.0) as client:
                health = await check_cluster(client, "prod")
                if health.quorum.ok:
                    return await all_keys(client, world.workload.prefix.encode())
        except (EtcdError, TimeoutError) as e:
            last = e
        await asyncio.sleep(0.5)
    world.notes.append(f"the cluster has no quorum at the end ({last}): the writes were not read back")
    return None, 0


def _removed(evidence: Evidence, member: str) -> bool:
    return any(isinstance(p.plan, ReplacePlan) and p.plan.failed.name == member and p.current_step >= 2
               for p in evidence.plans)
