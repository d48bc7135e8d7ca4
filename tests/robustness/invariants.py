"""What must hold after any seed, whatever struck: each check returns the violations it found, one line
each, naming the plan, step, member or write and the evidence (the harness's ground truth, the bot's
store and audit chain, etcd's own membership, what was posted and logged)."""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.domain.plan import PlanState
from bot.domain.record import AuditRecord, PlanRecord
from bot.domain.replace import ReplacePlan
from bot.domain.restore import RestorePlan
from bot.domain.snapshot import RemoteState, SnapshotRecord
from bot.testing import netbed
from bot.testing.cluster import processes_naming
from helpers import live_markup, text_of
from robustness.harness import World

CLOSED = (PlanState.DONE, PlanState.ABANDONED, PlanState.CANCELLED, PlanState.REJECTED, PlanState.EXPIRED)


@dataclass
class Evidence:
    """What the run left, gathered once the bot settled."""

    started: float                                      # when the operation was approved (wall clock)
    stuck: list[str] = field(default_factory=list)
    unfinishable: list[str] = field(default_factory=list)
    first_states: dict[str, tuple[PlanState, str | None]] = field(default_factory=dict)  # after settling
    resumed: dict[str, str] = field(default_factory=dict)
    plans: list[PlanRecord] = field(default_factory=list)
    final_keys: set[str] | None = None
    final_revision: int = 0
    last_snapshot: str = ""                             # the answer to the snapshot taken after the heal
    snapshots: list[SnapshotRecord] = field(default_factory=list)  # the catalog then


@dataclass(frozen=True)
class Ran:
    """One plan's step as the store and the audit chain record it."""

    plan: PlanRecord
    key: str
    started_at: float
    finished_at: float
    done: int        # step_done rows in the audit chain
    attempts: int    # runs of its action the chain allows for: done, failed past its precondition, cut short


async def check_all(world: World, ev: Evidence) -> list[str]:
    assert world.store is not None
    audit = await world.store.audit_rows()
    ran = await _steps(world, ev, audit)
    violations = healthy_members_kept(world, ran)
    violations += quorum_kept(world, ran)
    violations += once_per_plan(world, ev, ran)
    violations += await audit_intact(world)
    violations += plans_ended(ev)
    violations += snapshots_kept(ev)
    violations += writes_kept(world, ev, ran)
    violations += nothing_leaked(world)
    return violations


async def _steps(world: World, ev: Evidence, audit: list[AuditRecord]) -> list[Ran]:
    assert world.store is not None
    counts: Counter[tuple[str, str, str]] = Counter()
    for row in audit:
        detail = json.loads(row.detail or "{}")
        if row.action == "step_done":
            counts[(detail.get("plan", ""), detail.get("step", ""), "done")] += 1
        elif row.action == "step_failed" and not detail.get("precondition"):
            counts[(detail.get("plan", ""), detail.get("step", ""), "failed")] += 1
        elif row.action in ("plan_taken_over", "plan_interrupted"):  # the step may have acted, and runs again
            counts[(detail.get("plan", ""), detail.get("step", ""), "failed")] += 1
    out = []
    for p in ev.plans:
        for st in await world.store.steps(p.id):
            done, failed = counts[(p.id, st.key, "done")], counts[(p.id, st.key, "failed")]
            out.append(Ran(p, st.key, st.started_at, st.finished_at or st.started_at,
                           done, done + failed))
    return out


# 1 ---------------------------------------------------------------------------------------------------------

def healthy_members_kept(world: World, ran: list[Ran]) -> list[str]:
    """The bot never removed (or replaced) a member that was healthy while the remove step ran, and no member
    left etcd's membership without a plan removing it."""
    out = []
    removed_ids: set[int] = set()
    for r in ran:
        plan = r.plan.plan
        if not isinstance(plan, ReplacePlan) or r.key != "remove" or not r.attempts:
            continue
        for ref in (plan.failed, *plan.also_remove):
            removed_ids.add(int(ref.id, 16))
            if ref.name and world.truth.healthy_throughout(ref.name, r.started_at, r.finished_at):
                out.append(f"1: plan {r.plan.id} removed {ref.name} ({ref.id}), healthy all through its remove step "
                           f"({r.started_at:.1f} to {r.finished_at:.1f})")
    restored = any(r.plan.kind == "restore" and r.key == "start" and r.attempts for r in ran)
    monitor = world.monitor
    if monitor is None or not monitor.lists or restored:
        return out
    initial, last = monitor.lists[0][1], monitor.lists[-1][1]
    for member_id in sorted(initial - last - removed_ids):
        out.append(f"1: member {monitor.seen[member_id][0]} ({member_id:016x}) left the membership and no plan's "
                   "remove step removed it")
    return out


# 2 ---------------------------------------------------------------------------------------------------------

# The bot decides a moment before it acts: a quorum that came back within this margin of a stop is the
# race every check has, not the bot's doing.
DECIDED_BEFORE = 1.0


def quorum_kept(world: World, ran: list[Ran]) -> list[str]:
    """The bot's own actions never took the cluster from quorum to none: it stops members (a restore) only
    while quorum is lost, by the harness's own record of what it broke, at the moment the launcher was called."""
    forced = any(isinstance(r.plan.plan, RestorePlan) and r.plan.plan.force for r in ran)
    stops = [c for c in world.launched() if c["action"] == "stop"]
    if forced or not stops:
        return []
    # What the bot's launcher itself did counts too: a member it stopped is down until it starts it again.
    truth = world.truth.merged([(c["ended"], c["member"], c["action"] == "start") for c in world.launched(ended=True)
                                if c["action"] in ("stop", "start") and c["exit"] == 0])
    first = stops[0]["at"]
    world.notes.append(f"the launcher stopped {', '.join(sorted({c['member'] for c in stops}))} from {first:.2f}; "
                       "healthy then: " + (", ".join(m for m in world.s.members if truth.healthy_at(m, first))
                                           or "none"))
    for call in stops:
        if truth.quorum_throughout(world.s.members, call["at"] - DECIDED_BEFORE, call["at"]):
            return [f"2: the bot stopped {call['member']} at {call['at']:.2f} (fence {call['fence']}) while a quorum "
                    f"of members had been healthy for {DECIDED_BEFORE:g}s and more"]
    return []


# 3 ---------------------------------------------------------------------------------------------------------

def once_per_plan(world: World, ev: Evidence, ran: list[Ran]) -> list[str]:
    """Each step's action ran at most once per plan by the audit chain, and etcd's own history agrees: no
    more members added than add steps done, no member's data restored more often than restore steps ran."""
    out = [f"3: plan {r.plan.id} step {r.key} is done {r.done} times in the audit chain" for r in ran if r.done > 1]
    restored = any(r.plan.kind == "restore" and r.key == "restore" and r.attempts for r in ran)
    monitor = world.monitor
    if monitor is not None and monitor.lists and not restored:
        added = set(monitor.seen) - monitor.lists[0][1]
        adds = sum(r.done for r in ran if r.plan.kind == "replace" and r.key == "add")
        if len(added) > adds:
            names = ", ".join(f"{monitor.seen[i][0] or '(unstarted)'} {i:016x}" for i in sorted(added))
            out.append(f"3: etcd's membership gained {len(added)} members ({names}); the audit chain records {adds} "
                       "add steps done")
    allowed = Counter({action: sum(r.attempts for r in ran if r.key == action and r.plan.kind == "restore")
                       for action in ("stop", "restore", "start")})
    allowed["start"] += sum(r.attempts for r in ran if r.key == "start" and r.plan.kind == "replace")
    calls = Counter((c["member"], c["action"]) for c in world.launched(ended=True)
                    if c["exit"] == 0 and c["action"] in allowed)  # (status changes nothing)
    for (member, action), n in sorted(calls.items()):
        if n > allowed[action]:
            out.append(f"3: the launcher ran {action} on {member} {n} times; the audit chain allows for "
                       f"{allowed[action]} runs of {action} steps")
    attempts = allowed["restore"]
    assert world.cluster is not None
    data = world.cluster.base_dir / "data"
    for member in world.s.members:
        aside = len(list(data.glob(f"{member}.before-restore-*"))) if data.is_dir() else 0
        if aside > attempts:
            out.append(f"3: {member}'s data was restored {aside} times; the audit chain records {attempts} runs of "
                       "the restore step")
    return out


async def audit_intact(world: World) -> list[str]:
    assert world.store is not None
    count, problem = await world.store.verify_audit()
    return [f"3: audit verify: {problem} ({count} rows)"] if problem else []


# 4 ---------------------------------------------------------------------------------------------------------

def plans_ended(ev: Evidence) -> list[str]:
    """Every plan ended done, or stopped saying why in one line, and could be resumed or abandoned from there."""
    out = [f"4: {s}" for s in ev.stuck + ev.unfinishable]
    for plan_id, (state, error) in ev.first_states.items():
        if state in (PlanState.FAILED, PlanState.INTERRUPTED) and (not error or "\n" in error.strip()):
            out.append(f"4: plan {plan_id} is {state} and its error is not one line naming why: {error!r}")
    for p in ev.plans:
        if p.state not in CLOSED:
            out.append(f"4: plan {p.id} ({p.kind}) ended {p.state}, not closed")
    return out


def snapshots_kept(ev: Evidence) -> list[str]:
    """Every snapshot the catalog keeps is on disk and, once a snapshot after the heal retried the uploads
    that failed or were cut short, verified off-site."""
    if not ev.last_snapshot.startswith("Snapshot of prod"):
        return [f"4: the snapshot taken after every fault healed did not succeed: {ev.last_snapshot}"]
    out = []
    for row in ev.snapshots:
        name = Path(row.path).name
        if not Path(row.path).is_file():
            out.append(f"4: the catalog keeps {name} and its file is gone")
        elif row.remote_state is not RemoteState.VERIFIED:
            out.append(f"4: {name} is {row.remote_state or 'not uploaded'} off-site after the heal and a later "
                       f"snapshot's retry: {row.remote_error}")
    return out


# 5 ---------------------------------------------------------------------------------------------------------

def writes_kept(world: World, ev: Evidence, ran: list[Ran]) -> list[str]:
    """No acknowledged write lost, but for those a restore rolls back by design (newer than its snapshot),
    no acknowledged key read back missing, and after a restore with the bump the revision never went back."""
    w = world.workload
    assert w is not None
    if ev.final_keys is None:
        return []
    final = ev.final_keys
    restores = [p for p in ev.plans if p.kind == "restore" and p.state is PlanState.DONE]
    out = []
    if not restores:
        lost = [x for x in w.writes if x.key not in final]
        if lost:
            out.append(f"5: {len(lost)} of {len(w.writes)} acknowledged writes are gone and no restore ran: "
                       f"first {lost[0].key} at revision {lost[0].revision}")
        missing = [r for r in w.reads if not r.found]
        if missing:
            out.append(f"5: {len(missing)} reads did not find an acknowledged key: first {missing[0].key} at "
                       f"{missing[0].started:.1f}")
        return out
    p = restores[-1]
    restore = p.plan
    assert isinstance(restore, RestorePlan)
    snapshot, finished = restore.snapshot.revision, float(p["finished_at"])
    stop = next((r for r in ran if r.plan.id == p.id and r.key == "stop"), None)
    stopped = stop.started_at if stop else finished
    lost = [x for x in w.writes if x.revision <= snapshot and x.key not in final]
    if lost:
        out.append(f"5: {len(lost)} writes acknowledged before snapshot revision {snapshot} are gone after plan {p.id} "
                   f"restored it: first {lost[0].key} at revision {lost[0].revision}")
    later = [x for x in w.writes if x.sent > finished]
    gone = [x for x in later if x.key not in final]
    if gone:
        out.append(f"5: {len(gone)} writes acknowledged after the restore are gone: first {gone[0].key}")
    kept = {x.key for x in w.writes if x.revision <= snapshot or x.sent > finished}
    missing = [r for r in w.reads if not r.found and r.key in kept]
    if missing:
        first = missing[0]
        out.append(f"5: {len(missing)} reads did not find a key the restore keeps: first {first.key} (revision "
                   f"{_revision(w, first.key)}, snapshot {snapshot}) read at {first.started:.1f}, header revision "
                   f"{first.revision}; the restore finished at {finished:.1f}")
    before = [x.revision for x in w.writes if x.acked <= stopped]
    if restore.bump_supported and later and before and min(x.revision for x in later) <= max(before):
        out.append(f"5: the revision went back after plan {p.id}'s restore with the bump: a write at "
                   f"{min(x.revision for x in later)} after it, {max(before)} before it")
    if not restore.bump_supported:
        world.notes.append(f"etcd {restore.etcd_version} has no --bump-revision: the revision check is skipped")
    return out


def _revision(w: Any, key: str) -> int:
    return next((x.revision for x in w.writes if x.key == key), 0)


# 6 ---------------------------------------------------------------------------------------------------------

def nothing_leaked(world: World) -> list[str]:
    """No secret in anything posted, called or logged; no live mention or markup the bot did not make on purpose;
    no traceback in front of a person."""
    out = []
    places = [(f"message {m.ts}", json.dumps(m.__dict__, default=str)) for m in world.slack.messages]
    places += [(f"{c.method} call", json.dumps(c.args, default=str)) for c in world.slack.calls]
    places += [(p.name, p.read_text(errors="replace")) for p in sorted(world.root.glob("*.log"))]
    places += [(p.name, p.read_text(errors="replace")) for p in sorted((world.root / "bed" / "logs").glob("*.log"))]
    for secret in world.secrets:
        where = sorted({name for name, text in places if secret in text})
        if where:
            out.append(f"6: a secret ({secret[:4]}…) is in {', '.join(where[:5])}")
    for m in world.slack.messages:
        if m.user != world.slack.bot_user_id:
            continue
        if markup := live_markup(m):
            out.append(f"6: message {m.ts} ({m.source}) holds live markup {markup[:3]}: {text_of(m)[:120]!r}")
        if "Traceback (most recent call last)" in text_of(m):
            out.append(f"6: message {m.ts} shows a traceback")
    return out


# 7 ---------------------------------------------------------------------------------------------------------

def check_leftovers(world: World, prefix: str) -> list[str]:
    """Nothing of the seed is left: no process started under its directory, no namespace or link of its bed,
    no directory, no mount."""
    root = str(world.root)
    out = [f"7: process {pid} left running: {cmd[:160]}" for pid, cmd in processes_naming([root])]
    if prefix:
        out += [f"7: {what} left by the bed" for what in netbed.leftovers([prefix])]
    if world.root.exists():
        out.append(f"7: directory {root} left behind")
    mounts = Path("/proc/mounts").read_text()
    if re.search(rf" {re.escape(root)}\S* ", mounts):
        out.append(f"7: a filesystem is still mounted under {root}")
    return out
