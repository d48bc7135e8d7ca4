"""The rolling defragmentation as an operation of the engine (bot.ops.engine), and its proposal.

Every step first re-checks the live cluster: every member healthy (NOSPACE
aside: that is what the plan fixes), the membership as planned, and the
leader where the plan expects it (the planned one until leadership is moved,
then anyone but the former leader). A member that went down stops the plan;
`/etcd resume` continues once it is back. A leader or membership change
stops it for good: the order was made for the old one.

Every action is idempotent: defragmenting, compacting an already compacted
revision, moving leadership that already moved, disarming an alarm that is
gone all change nothing the second time.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from functools import partial

from bot.domain.cluster import NOT_SERVING, SERVING, ClusterHealth, MemberHealth, backend_quota
from bot.domain.defrag import DefragPlan
from bot.domain.errors import EtcdError, EtcdRequestError, FactsChanged, StepFailed
from bot.domain.plan import PlanKind
from bot.domain.record import PlanRecord
from bot.domain.snapshot import SnapshotFailed
from bot.etcd.member_metrics import cluster_metrics
from bot.ops.context import BotContext
from bot.ops.defrag.plan import sole_voter
from bot.ops.engine import ClusterOperation, StepRun, register
from bot.ops.replace.run import CHANGE_TIMEOUT, wait_for
from bot.ops.snapshots import take_snapshot
from bot.output import blocks
from bot.output.units import humanize_bytes, humanize_duration

WRITE_CHECK_KEY = b"etcd-chatops/write-check"
RESUME = "bring it back (see /etcd status), then /etcd resume the plan"
SERVING_POLL = 0.05  # how often a defragmenting member's gRPC health is asked


def _members(n: int) -> str:
    return f"{n} member{'s' if n != 1 else ''}"


def _label(h: MemberHealth) -> str:
    return h.member.name or h.member.hex_id


@register(PlanKind.DEFRAG, render=blocks.defrag_plan_reply)
class DefragOperation(ClusterOperation[DefragPlan]):
    plan_type, what = DefragPlan, "a defragmentation"

    def __init__(self, ctx: BotContext, record: PlanRecord, actor: str, started: set[str]):
        super().__init__(ctx, record, actor, started)
        self.after: dict[str, int] = {}  # hex ID -> DB size after the plan, for the closing note

    def steps(self) -> Sequence[StepRun]:
        def run(key: str) -> StepRun:
            if key.startswith("defrag-"):
                member = key.removeprefix("defrag-")
                return StepRun(key, precondition=partial(self.before_defrag, member),
                               action=partial(self.step_defrag, member))
            actions = {"snapshot": self.step_snapshot, "compact": self.step_compact,
                       "move-leader": self.step_move_leader, "disarm": self.step_disarm, "verify": self.step_verify}
            return StepRun(key, precondition=self.recheck, action=actions.get(key))
        return [run(step.key) for step in self.plan.steps]

    def done_note(self) -> str:
        lines = []
        for m in self.plan.members:
            after = self.after.get(m.ref.id)
            if after is None:
                continue
            lines.append(f"{m.ref.name or m.ref.id} {humanize_bytes(m.db_size)} → {humanize_bytes(after)}"
                         + ("" if m.selected else " (left alone)"))
        before, now = sum(m.db_size for m in self.plan.members), sum(self.after.values())
        return (f"{self.plan.cluster} defragmented: {humanize_bytes(before)} → {humanize_bytes(now)} in all, "
                f"{humanize_bytes(max(before - now, 0))} reclaimed ({'; '.join(lines)}).")

    # -- the re-check before every step -----------------------------------

    async def _facts(self) -> ClusterHealth:
        health = await self.ctx.check(self.cluster)
        if health.fingerprint != self.plan.fingerprint:
            raise FactsChanged("the membership changed since the plan was made; nothing more was changed",
                               self.plan.id)
        sick = [h for h in health.members if not h.healthy]
        if sick or not health.quorum.ok or health.leader_id is None:
            what = ", ".join(f"{_label(h)} ({h.problem})" for h in sick) or "no leader"
            raise StepFailed(f"not every member is healthy: {what}; stopped before touching another member", RESUME)
        others = sorted({a.kind for a in health.alarms} - {"NOSPACE"})
        if others:
            raise StepFailed(f"alarm {', '.join(others)} was raised", "see /etcd alarms and /etcd consistency")
        leader = f"{health.leader_id:016x}"
        if "move-leader" not in self.started and leader != self.plan.leader:  # after the move, before_defrag guards
            raise FactsChanged(f"the leader changed from {self.plan.leader} to {leader} unexpectedly; the order was "
                               "made for the old leader", self.plan.id)
        return health

    async def recheck(self) -> str:
        health = await self._facts()
        alarm = "; NOSPACE active" if any(a.kind == "NOSPACE" for a in health.alarms) else ""
        return f"{len(health.members)} members healthy, leader {health.leader_id:016x}{alarm}"

    def _member(self, health: ClusterHealth, hex_id: str) -> MemberHealth:
        found = next((h for h in health.members if h.member.hex_id == hex_id), None)
        if found is None or found.status is None:
            raise FactsChanged(f"member {hex_id} is no longer in the cluster", self.plan.id)
        return found

    async def before_defrag(self, hex_id: str) -> str:
        health = await self._facts()
        member = self._member(health, hex_id)
        if member.member.id == health.leader_id:
            if sole_voter(health):
                return f"{_label(member)} healthy, the only voter: defragmented in place"
            raise FactsChanged(f"{_label(member)} leads the cluster: it is defragmented only after leadership moved",
                               self.plan.id)
        return f"{_label(member)} healthy and not the leader"

    # -- the steps ----------------------------------------------------------

    async def step_snapshot(self) -> str:
        try:
            saved = await take_snapshot(self.ctx, self.cluster, requested_by=self.actor, channel=self.record.channel,
                                        reason=f"before plan {self.plan.id}", plan_id=self.plan.id)
        except SnapshotFailed as e:
            raise StepFailed(str(e), "check /etcd status, then /etcd resume the plan") from None
        return (f"saved {saved.path.name} from {saved.member}: revision {saved.status.revision}, "
                f"hash {saved.status.hash_hex}, sha256 {saved.sha256[:16]}…")

    async def step_compact(self) -> str:
        health = await self.ctx.check(self.cluster)
        leader = self._member(health, f"{health.leader_id or 0:016x}")
        assert leader.status is not None
        revision = await self.client.revision(leader.status.endpoint)
        try:
            await self.client.compact(revision, timeout=CHANGE_TIMEOUT)
        except EtcdRequestError as e:
            if "compacted" not in e.message:
                raise
            return f"already compacted at revision {revision}"
        return f"compacted to revision {revision}"

    async def step_defrag(self, hex_id: str) -> str:
        """Defragment one member, then wait until it serves again, is healthy and has applied what the leader had.
        With StopGRPCServiceOnDefrag the member tells gRPC health checks NOT_SERVING meanwhile, which is what
        moves clients that check (kube-apiserver's among them) to the others: the step says whether it did, and
        the next member starts only once this one serves again, so those clients always have somewhere to go."""
        health = await self.ctx.check(self.cluster)
        member = self._member(health, hex_id)
        assert member.status is not None
        before, endpoint = member.status.db_size, member.status.endpoint
        began = time.monotonic()
        defrag = asyncio.ensure_future(self.client.defragment(endpoint))
        stopped = await self._stopped_serving(endpoint, defrag)
        await defrag
        took = time.monotonic() - began
        target = max(h.status.raft_index for h in health.members if h.status)
        clients = ("it stopped serving clients meanwhile (StopGRPCServiceOnDefrag): those that check its health "
                   "used the other members" if stopped else "clients pinned to it waited until it was done")

        async def caught_up() -> str | None:
            status = await self.client.status(endpoint)
            if status.errors or status.raft_applied_index < target:
                return None
            if stopped and await self.client.serving(endpoint) != SERVING:
                return None
            self.after[hex_id] = status.db_size
            self.plan = self.plan.defragmented(hex_id, status.db_size)  # the plan message shows it from now on
            await self.ctx.store.update_plan(self.plan.id, plan=json.dumps(self.plan.to_json()), fence=self.fence)
            return (f"{_label(member)}: {humanize_bytes(before)} → {humanize_bytes(status.db_size)}, "
                    f"{humanize_bytes(max(before - status.db_size, 0))} reclaimed in {humanize_duration(took)}; "
                    f"{clients}; caught up at index {status.raft_applied_index}")
        return await wait_for(f"{_label(member)} catching up after its defragmentation",
                              self.cluster.catch_up_seconds, caught_up, RESUME)

    async def _stopped_serving(self, endpoint: str, defrag: asyncio.Future[None]) -> bool:
        """Whether the member told gRPC health checks NOT_SERVING while `defrag` ran (asked every SERVING_POLL)."""
        while not defrag.done():
            try:
                if await self.client.serving(endpoint, timeout=self.cluster.timeout_seconds) == NOT_SERVING:
                    return True
            except EtcdError:
                pass  # a member without the health service, or a slow answer: nothing learned
            await asyncio.wait({defrag}, timeout=SERVING_POLL)
        return False

    async def step_move_leader(self) -> str:
        health = await self.ctx.check(self.cluster)
        former = int(self.plan.leader, 16)
        if health.leader_id != former:
            return f"leadership is already with {health.leader_id or 0:016x}"
        if sole_voter(health):   # a plan made before single-voter clusters skipped this step
            return f"{self.plan.leader} is the only voter: no leadership to move; it is defragmented in place"
        done = {k.removeprefix("defrag-") for k in self.started if k.startswith("defrag-")}
        compact = {m.ref.id for m in self.plan.members if not m.selected}  # the rule found nothing to reclaim
        candidates = [h for h in health.members if h.healthy and h.status and not h.member.is_learner
                      and h.member.id != former and (h.member.hex_id in done or h.member.hex_id in compact)]
        if not candidates:
            raise StepFailed("no healthy voter is defragmented yet to take the leadership", RESUME)
        target = max(candidates, key=lambda h: h.status.raft_applied_index if h.status else 0)
        await self.client.move_leader(target.member.id, timeout=CHANGE_TIMEOUT)

        async def moved() -> str | None:
            now = await self.ctx.check(self.cluster)
            return (f"leadership moved from {self.plan.leader} to {_label(target)} ({target.member.hex_id})"
                    if now.leader_id == target.member.id else None)
        return await wait_for("the leadership move", self.cluster.catch_up_seconds, moved, RESUME)

    async def _quotas(self, health: ClusterHealth) -> dict[int, int]:
        read = await cluster_metrics(self.client, health, for_quota=True)
        planned = {int(m.ref.id, 16): m.quota for m in self.plan.members}
        quotas = {h.member.id: backend_quota(h.status, read.get(h.member.id)) for h in health.members if h.status}
        return {mid: quota if quota and why is None else planned.get(mid, 0) for mid, (quota, why) in quotas.items()}

    async def _disarm(self, health: ClusterHealth) -> tuple[int, str]:
        """Disarm every NOSPACE alarm when each member is below the plan's share of its quota: (how many, note)."""
        nospace = [a for a in health.alarms if a.kind == "NOSPACE"]
        if not nospace:
            return 0, "no NOSPACE alarm to disarm"
        quotas = await self._quotas(health)
        over = [f"{_label(h)} at {h.status.db_size / quotas[h.member.id] * 100:.0f} %" for h in health.members
                if h.status and quotas.get(h.member.id)
                and h.status.db_size >= self.plan.disarm_below * quotas[h.member.id]]
        if over:
            return 0, (f"NOSPACE stays: {', '.join(over)} of its quota, not below "
                       f"{self.plan.disarm_below * 100:g} %; delete data or raise --quota-backend-bytes, "
                       "then defragment again")
        for alarm in nospace:
            await self.client.alarm_disarm(alarm.member_id, "NOSPACE")
        return len(nospace), f"NOSPACE disarmed on {_members(len(nospace))}"

    async def step_disarm(self) -> str:
        return (await self._disarm(await self.ctx.check(self.cluster)))[1]

    async def step_verify(self) -> str:
        health = await self.ctx.check(self.cluster)
        late = ""
        if any(a.kind == "NOSPACE" for a in health.alarms):
            # A member that applied the last over-quota writes late raises its own alarm late, after the disarm
            # step looked: with every member below the threshold it is disarmed here too, as the plan approved.
            disarmed, _ = await self._disarm(health)
            if disarmed:
                late = f"NOSPACE raised again after the disarm step, and disarmed on {_members(disarmed)}; "
                health = await self.ctx.check(self.cluster)
        if any(a.kind == "NOSPACE" for a in health.alarms):
            raise StepFailed("NOSPACE is still active, so writes still fail (see the disarm step for why)",
                             "free space (delete data, raise the quota), then /etcd resume the plan")
        try:
            revision = await self.client.put(WRITE_CHECK_KEY, self.plan.id.encode())
        except EtcdError as e:
            raise StepFailed(f"the test write failed: {e}", "check /etcd status, then /etcd resume the plan") from None
        self.after = {h.member.hex_id: h.status.db_size for h in health.members if h.status}
        return late + f"test write succeeded at revision {revision}; " + "; ".join(
            f"{_label(h)} {humanize_bytes(h.status.db_size)}" for h in health.members if h.status)


