"""Runs an approved replacement plan, step by step.

Each step's start and outcome are written to SQLite before the next step
begins, so a restarted bot knows exactly where a plan stopped. Every step is
idempotent (it looks before it changes: a member already removed, a member
already added with our peer URL, a member already started or promoted), so
resuming at the interrupted step is safe. A failed step stops the plan;
nothing is retried blindly.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Awaitable, Callable, TypeVar

from bot.slack import blocks
from bot.ops.access import Role
from bot.config import ClusterConfig
from bot.ops.context import BotContext
from bot.etcd.client import EtcdClient
from bot.etcd.model import EtcdError, EtcdTimeout, LearnerNotReady, Member, NotALearner, UnhealthyCluster
from bot.etcd.health import check_cluster
from bot.ops.launcher import manual_instructions, run_command
from bot.ops.replace import Plan, config_endpoints, etcd_servers
from bot.slack.web import SlackPostError, post, update
from bot.ops.snapshots import take_snapshot
from bot.etcd.snapshots import SnapshotFailed

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL = 1.0  # seconds between looks while waiting on etcd
CHANGE_TIMEOUT = 10.0  # a membership change waits for raft to apply it (etcdctl allows 5 s)


class StepFailed(Exception):
    def __init__(self, reason: str, next_action: str):
        super().__init__(reason)
        self.reason = reason
        self.next_action = next_action


def plan_view(ctx: BotContext, row: dict, step_states: dict[int, str] | None = None) -> blocks.PlanView:
    cluster = ctx.config.cluster(row["cluster"])
    approvers = ctx.access.holders(cluster, Role.APPROVER) if cluster else "nobody (cluster not configured)"
    return blocks.PlanView(state=row["state"], proposer=row["proposer"], approvers=approvers,
                           expires_at=row["expires_at"], reaction=ctx.config.approval.reaction,
                           reject_reaction=ctx.config.approval.reject_reaction, step_states=step_states or {},
                           decided_by=row.get("decided_by"), error=row.get("error"))


async def refresh_message(ctx: BotContext, plan_id: str) -> None:
    """Re-render the plan message from the database (the single source of truth)."""
    row = await ctx.store.plan(plan_id)
    if row is None or not row.get("message_ts"):
        return
    states = {s["idx"]: s["state"] for s in await ctx.store.steps(plan_id)}
    plan = Plan.from_json(json.loads(row["plan"]))
    await update(ctx.web, row["channel"], row["message_ts"], blocks.plan_reply(plan, plan_view(ctx, row, states)))


async def say_in_thread(ctx: BotContext, row: dict, text: str) -> None:
    """A detail in the plan's thread; a Slack failure is logged, never fatal."""
    try:
        await post(ctx.web, row["channel"], blocks.thread_note(text), thread_ts=row.get("message_ts"))
    except SlackPostError as e:
        log.warning("thread reply failed", extra={"ctx_plan": row["id"], "ctx_error": str(e)})


class Executor:
    def __init__(self, ctx: BotContext, row: dict, actor: str):
        self.ctx = ctx
        self.row = row
        self.actor = actor
        self.plan = Plan.from_json(json.loads(row["plan"]))
        cluster = ctx.config.cluster(self.plan.cluster)
        if cluster is None:
            raise StepFailed(f"cluster {self.plan.cluster} is no longer in the configuration", "restore its config")
        self.cluster: ClusterConfig = cluster
        self.client: EtcdClient = ctx.client(cluster)
        self.new_member_id: int | None = int(row["new_member_id"], 16) if row.get("new_member_id") else None

    async def run(self, start: int) -> str:
        """Execute from step `start`; returns the plan's final state."""
        store, plan = self.ctx.store, self.plan
        for idx in range(start, len(plan.steps)):
            step = plan.steps[idx]
            await store.step_started(plan.id, idx, step.key)
            await refresh_message(self.ctx, plan.id)
            began = time.monotonic()
            try:
                detail = await getattr(self, f"step_{step.key}")()
            except (StepFailed, EtcdError, SnapshotFailed, asyncio.TimeoutError) as e:
                failure = e if isinstance(e, StepFailed) else StepFailed(
                    str(e) or type(e).__name__, "check /etcd status, then /etcd resume the plan or finish by hand")
                return await self._fail(idx, failure)
            except asyncio.CancelledError:
                raise  # the bot is stopping: the plan stays "running" and is reported interrupted at start-up
            except Exception as e:
                log.exception("step crashed", extra={"ctx_plan": plan.id, "ctx_step": step.key})
                return await self._fail(idx, StepFailed(f"internal error in step {step.key}: {type(e).__name__}",
                                                        "see the bot's log; then /etcd resume the plan"))
            await store.step_finished(plan.id, idx, "done", detail)
            await store.audit("step_done", user=self.actor, channel=self.row["channel"], cluster=plan.cluster,
                              detail={"plan": plan.id, "step": step.key, "detail": detail,
                                      "seconds": round(time.monotonic() - began, 3)})
            await say_in_thread(self.ctx, self.row, f":white_check_mark: Step {idx} ({step.key}): {detail}")
        await store.transition(plan.id, ["running"], "done", finished_at=time.time())
        await store.audit("plan_done", user=self.actor, channel=self.row["channel"], cluster=plan.cluster,
                          detail={"plan": plan.id})
        await refresh_message(self.ctx, plan.id)
        await say_in_thread(self.ctx, self.row, f":tada: Plan {plan.id} is done: {plan.failed.name or plan.failed.id} "
                                                f"was replaced by {plan.new_name}.")
        return "done"

    async def _fail(self, idx: int, e: StepFailed) -> str:
        plan, store = self.plan, self.ctx.store
        step = plan.steps[idx]
        message = f"step {idx} ({step.key}) failed: {e.reason}"
        await store.step_finished(plan.id, idx, "failed", error=e.reason)
        await store.transition(plan.id, ["running"], "failed", error=message, finished_at=time.time())
        await store.audit("step_failed", user=self.actor, channel=self.row["channel"], cluster=plan.cluster,
                          detail={"plan": plan.id, "step": step.key, "error": e.reason})
        await refresh_message(self.ctx, plan.id)
        await say_in_thread(self.ctx, self.row, f":x: Plan {plan.id} stopped: {message}\nNext: {e.next_action}")
        return "failed"

    # -- helpers --------------------------------------------------------

    async def _members(self) -> list[Member]:
        return await self.client.member_list()

    def _by_peer(self, members: list[Member]) -> Member | None:
        return next((m for m in members if self.plan.new_peer_url in m.peer_urls), None)

    async def _wait(self, what: str, seconds: float, probe: Callable[[], Awaitable[str | None]]) -> str:
        """Poll `probe` until it returns a detail (not None), within `seconds`."""
        deadline = time.monotonic() + seconds
        last_error = ""
        while True:
            try:
                result = await probe()
                if result is not None:
                    return result
            except EtcdError as e:
                last_error = f" (last error: {e})"
            if time.monotonic() >= deadline:
                raise StepFailed(f"{what} did not happen within {seconds:g}s{last_error}",
                                 "look at the new member's logs, then /etcd resume the plan")
            await asyncio.sleep(POLL)

    # -- the steps ------------------------------------------------------

    async def step_recheck(self) -> str:
        health = await self.ctx.check(self.cluster)
        if health.fingerprint != self.plan.fingerprint:
            raise StepFailed("the membership changed since the plan was made; nothing was changed",
                             "check /etcd status and propose the replacement again")
        q = health.quorum
        if not q.ok:
            raise StepFailed(f"quorum does not hold now ({q.healthy} healthy of {q.voting}, {q.needed} needed); "
                             "nothing was changed", "restore from the newest snapshot; see /etcd snapshots")
        target = health.find(self.plan.failed.id)
        if target is not None and target.healthy:
            raise StepFailed(f"{self.plan.failed.name} answers and is healthy again; nothing was changed",
                             "no replacement is needed; propose again if it fails anew")
        return f"membership unchanged, {q.healthy} of {q.voting} voting members healthy (quorum {q.needed})"

    async def step_snapshot(self) -> str:
        saved = await take_snapshot(self.ctx, self.cluster, requested_by=self.actor, channel=self.row["channel"],
                                    reason=f"before plan {self.plan.id}", prefer=self.plan.snapshot_source)
        return (f"saved {saved.path.name} from {saved.member}: revision {saved.status.revision}, "
                f"hash {saved.status.hash_hex}, sha256 {saved.sha256[:16]}…")

    async def _live_leader(self) -> str:
        """Wait (bounded) until a reachable member leads: right after a leader
        dies, the survivors still forward proposals to it until they elect."""
        async def probe() -> str | None:
            health = await check_cluster(self.client, self.plan.cluster)
            leader = next((h for h in health.members if h.member.id == health.leader_id and h.healthy), None)
            return leader.member.name if leader else None
        return await self._wait("a reachable leader", self.cluster.catch_up_seconds, probe)

    async def _change(self, apply: Callable[[], Awaitable[T]], applied: Callable[[], Awaitable[T | None]]) -> T:
        """A membership change, made only under a live leader. etcd's "unhealthy
        cluster" means its leader has not been connected to every voter for 5 s
        yet (a new leader, a young cluster): wait, within the bound. After a
        timeout, look whether the change landed; if not, try once more."""
        deadline = time.monotonic() + self.cluster.catch_up_seconds
        timeouts = 0
        while True:
            await self._live_leader()
            try:
                return await apply()
            except UnhealthyCluster:
                if time.monotonic() >= deadline:
                    raise
            except EtcdTimeout:
                landed = await applied()
                if landed is not None:
                    return landed
                timeouts += 1
                if timeouts == 2:
                    raise
            await asyncio.sleep(POLL)

    async def step_remove(self) -> str:
        """Remove the failed member (and, on etcd < 3.6, the other unreachable
        voters the plan names); a member already gone counts as removed."""
        done = []
        for ref in (self.plan.failed, *self.plan.also_remove):
            member_id = int(ref.id, 16)
            if not any(m.id == member_id for m in await self._members()):
                done.append(f"{ref.name or ref.id} ({ref.id}) was already removed")
                continue

            async def gone(member_id: int = member_id) -> bool | None:
                return True if not any(m.id == member_id for m in await self._members()) else None

            async def remove(member_id: int = member_id) -> bool:
                await self.client.member_remove(member_id, timeout=CHANGE_TIMEOUT)
                return True

            await self._change(remove, gone)
            done.append(f"Removed member {ref.id} ({ref.name}) from cluster")
        return "; ".join(done)

    async def step_add(self) -> str:
        existing = self._by_peer(await self._members())
        if existing is None:
            async def add() -> Member:
                member, _ = await self.client.member_add([self.plan.new_peer_url], learner=self.plan.learner,
                                                         timeout=CHANGE_TIMEOUT)
                return member

            async def landed() -> Member | None:
                return self._by_peer(await self._members())

            added = await self._change(add, landed)
            note = f"Member {added.hex_id} added to cluster as {'a learner' if added.is_learner else 'a voting member'}"
        else:
            added = existing
            note = f"member {added.hex_id} with peer URL {self.plan.new_peer_url} was already added; reusing it"
        self.new_member_id = added.id
        await self.ctx.store.update_plan(self.plan.id, new_member_id=added.hex_id)
        return note

    async def _new_member(self) -> Member | None:
        return next((m for m in await self._members() if m.id == self.new_member_id), None)

    async def _started_and_reachable(self) -> str | None:
        m = await self._new_member()
        if m is None:
            raise StepFailed(f"the new member {self.new_member_id:016x} is no longer in the cluster",
                             "check /etcd members; propose the replacement again")
        if not m.started or not m.client_urls:
            return None
        for url in m.client_urls:
            try:
                await self.client.status(url)
                return f"{m.name} started and answers at {url}"
            except EtcdError:
                continue
        return None

    async def step_start(self) -> str:
        already = await self._started_and_reachable()
        if already:
            return f"{already} (already running)"
        launcher = self.cluster.launcher
        if launcher.kind == "manual":
            await say_in_thread(self.ctx, self.row,
                                f":point_right: Start *{self.plan.new_name}* on its machine now (runbook step 4):\n"
                                f"```{manual_instructions(self.plan)}```\nWaiting up to "
                                f"{launcher.timeout_seconds:g}s for it to join.")
            return await self._wait(f"{self.plan.new_name} starting", launcher.timeout_seconds,
                                    self._started_and_reachable)
        result = await run_command(launcher, self.plan, self.ctx.secrets())
        tail = result.output_tail.strip()[-1500:]
        if not result.ok:
            raise StepFailed(f"{result.summary}" + (f"; output:\n{tail}" if tail else ""),
                             "fix the launcher or start the member by hand, then /etcd resume the plan")
        return result.summary + (f"; output: {tail}" if tail else "")

    async def step_promote(self) -> str:
        started = await self._wait(f"{self.plan.new_name} starting", self.cluster.launcher.timeout_seconds,
                                   self._started_and_reachable)
        if not self.plan.learner:
            return started

        async def promote() -> str | None:
            m = await self._new_member()
            if m is not None and not m.is_learner:
                return f"{self.plan.new_name} is a voting member"
            await self._live_leader()
            try:
                await self.client.member_promote(self.new_member_id, timeout=CHANGE_TIMEOUT)
            except LearnerNotReady:
                return None  # still catching up with the leader: etcd says when
            except NotALearner:
                return f"{self.plan.new_name} was already promoted"
            return f"{self.plan.new_name} promoted to a voting member"

        return f"{started}; " + await self._wait(f"{self.plan.new_name} catching up for promotion",
                                                 self.cluster.catch_up_seconds, promote)

    async def step_followups(self) -> str:
        members = await self._members()
        servers = etcd_servers(members)
        removed = ", ".join(self.plan.failed.client_urls) or "(none)"
        added = next((", ".join(m.client_urls) for m in members if m.id == self.new_member_id), "")
        await say_in_thread(self.ctx, self.row,
                            f":clipboard: *Follow-ups (runbook step 5)*\n"
                            f"1. Update every kube-apiserver and restart it:\n```--etcd-servers={servers}```\n"
                            f"2. If a load balancer fronts etcd, add {added or self.plan.new_name} and remove {removed}.\n"
                            f"3. Update this bot's own configuration: cluster {self.plan.cluster}, "
                            f"```{config_endpoints(members)}```")
        return f"--etcd-servers={servers}"

    async def step_verify(self) -> str:
        expected = self.plan.expected_members

        async def verified() -> str | None:
            health = await self.ctx.check(self.cluster)
            ids = {h.member.id for h in health.members}
            if int(self.plan.failed.id, 16) in ids or len(health.members) != expected:
                return None
            if not health.all_healthy or any(h.member.is_learner for h in health.members):
                return None
            return f"{len(health.members)} members, all healthy; leader {health.leader_id:016x}"

        return await self._wait(f"{expected} healthy members", self.cluster.catch_up_seconds, verified)
