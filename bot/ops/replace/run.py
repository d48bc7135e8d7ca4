"""The replacement as an operation of the engine (bot.ops.engine): its steps,
each with its precondition against the live cluster, action and verification.

Every action is idempotent (it looks before it changes: a member already
removed, a member already added with our peer URL, a member already started
or promoted), so resuming at the interrupted step is safe. The preconditions
judge the live membership against the plan's own progress: a member the
plan removed may be gone, the member it added may be there, nothing else
may have changed.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from bot.domain import shell
from bot.domain.cluster import ClusterHealth, Member
from bot.domain.errors import (
    EtcdError,
    EtcdTimeout,
    FactsChanged,
    LearnerNotReady,
    NotALearner,
    StepFailed,
    UnhealthyCluster,
)
from bot.domain.mrkdwn import code_block, escape
from bot.domain.plan import PlanKind, Stage
from bot.domain.record import PlanRecord
from bot.domain.replace import ReplacePlan
from bot.domain.snapshot import SnapshotFailed
from bot.etcd.health import check_cluster
from bot.ops import nodes, ssh
from bot.ops.context import BotContext
from bot.ops.engine import ClusterOperation, StepRun, note, register
from bot.ops.launcher import manual_instructions, run_command
from bot.ops.replace.plan import config_endpoints, etcd_servers, facts_changed, quorum_after
from bot.ops.snapshots import take_snapshot
from bot.output import blocks

T = TypeVar("T")

POLL = 0.25  # seconds between looks while waiting on etcd (it answers in milliseconds; a wait ends this soon after)
CHANGE_TIMEOUT = 10.0  # a membership change waits for raft to apply it (etcdctl allows 5 s)


async def wait_for(what: str, seconds: float, probe: Callable[[], Awaitable[str | None]], next_action: str) -> str:
    """Poll `probe` until it returns a detail (not None), within `seconds`; etcd errors count as "not yet"."""
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
            raise StepFailed(f"{what} did not happen within {seconds:g}s{last_error}", next_action)
        await asyncio.sleep(POLL)


@register(PlanKind.REPLACE, render=blocks.replace_plan_reply)
class ReplaceOperation(ClusterOperation[ReplacePlan]):
    plan_type, what = ReplacePlan, "a replacement"

    def __init__(self, ctx: BotContext, record: PlanRecord, actor: str, started: set[str]):
        super().__init__(ctx, record, actor, started)
        self.new_member_id: int | None = int(record.new_member_id, 16) if record.new_member_id else None

    def steps(self) -> Sequence[StepRun]:
        runs = {
            "recheck": StepRun("recheck", precondition=self.recheck),
            "snapshot": StepRun("snapshot", action=self.step_snapshot),
            "remove": StepRun("remove", precondition=self.before_remove, action=self.step_remove,
                              verify=self.removed),
            "add": StepRun("add", precondition=self.before_add, action=self.step_add),
            "start": StepRun("start", action=self.step_start),
            "promote": StepRun("promote", precondition=self.before_promote, action=self.step_promote),
            "followups": StepRun("followups", action=self.step_followups),
            "verify": StepRun("verify", action=self.step_verify),
        }
        return [runs[step.key] for step in self.plan.steps]

    def done_note(self) -> str:
        return f"{escape(self.plan.failed.name or self.plan.failed.id)} was replaced by {escape(self.plan.new_name)}."

    # -- preconditions ----------------------------------------------------

    async def _facts(self) -> ClusterHealth:
        """The live cluster, if it is still the one the plan expects at this point of its progress."""
        health = await self.ctx.check(self.cluster)
        new_id = f"{self.new_member_id:016x}" if self.new_member_id is not None else None
        changed = facts_changed(self.plan, health, self.started, new_id)
        untouched = not self.started - {"recheck", "snapshot"}  # nothing changed by the plan yet
        if changed is None and untouched and health.fingerprint != self.plan.fingerprint:
            changed = "a member's name, peer URLs or role changed since the plan was made"
        if changed:
            raise FactsChanged(f"{changed}; nothing was changed", self.plan.id)
        return health

    @staticmethod
    def _quorum(health: ClusterHealth, step: str, voting: int = 0, healthy: int = 0) -> str:
        q = quorum_after(health, voting, healthy)
        if not q.ok:
            raise StepFailed(f"quorum would not hold {step} ({q.healthy} healthy of {q.voting} voting, {q.needed} "
                             "needed); nothing was changed", "restore from the newest snapshot; see /etcd snapshots")
        return f"{q.healthy} of {q.voting} voting members healthy (quorum {q.needed})"

    async def recheck(self) -> str:
        """Step 0, and the first thing a resume does: the plan's facts against the live cluster, and (ssh
        launcher) every host the plan touches reachable with its pinned key, its node program answering."""
        health = await self._facts()
        found = f"membership as planned, {self._quorum(health, 'now')}"
        if self.cluster.launcher.kind != "ssh":
            return found
        return f"{found}; {await nodes.require_hosts(self.cluster.launcher, [self._new_host(), *self._templates()])}"

    def _new_host(self) -> ssh.Host:
        return ssh.host_for(self.cluster.launcher, self.plan.new_name, self.plan.new_peer_url)

    def _templates(self) -> list[ssh.Host]:
        """static-pod: the hosts of the healthy survivors, whose etcd.yaml the new member's is derived from."""
        if self.cluster.launcher.recipe != "static-pod":
            return []
        failed = {m.id for m in self.plan.others_failed}
        return [ssh.host_for(self.cluster.launcher, m.name, m.peer_urls[0]) for m in self.plan.survivors
                if m.id not in failed and m.name and m.peer_urls]

    async def _start_on_host(self) -> str:
        """The ssh launcher: etcd-chatops-node starts the new member on its host (`start --join`), from a
        survivor's manifest (static-pod) or the host's own unit (systemd)."""
        p, launcher = self.plan, self.cluster.launcher
        if not p.new_client_url:
            raise StepFailed("the ssh launcher needs the new member's client URL", "propose the replacement again "
                                                                                  "with --client-url")
        flags = [*nodes.fence_flags(self.fencing), "--join", "--initial-cluster", p.initial_cluster,
                 "--peer-url", p.new_peer_url, "--client-url", p.new_client_url,
                 "--data-dir", self.cluster.restore.data_dir.replace("{name}", p.new_name)]
        work = {self._new_host(): nodes.join_work(launcher, flags, self._templates())}
        return await nodes.each_host(launcher, work, "the start", self.fencing)

    def _removing(self, health: ClusterHealth) -> list[Member]:
        ids = {int(r.id, 16) for r in (self.plan.failed, *self.plan.also_remove)}
        return [h.member for h in health.members if h.member.id in ids]

    async def before_remove(self) -> str:
        health = await self._facts()
        present = self._removing(health)
        voters = [m for m in present if not m.is_learner]
        return self._quorum(health, "after the remove", voting=-len(voters))

    async def before_add(self) -> str:
        health = await self._facts()
        return self._quorum(health, "after the add", voting=0 if self.plan.learner else 1)

    async def before_promote(self) -> str:
        health = await self._facts()
        new = next((h for h in health.members if h.member.id == self.new_member_id), None)
        if new is None:
            raise FactsChanged(f"the new member {self.plan.new_name} is no longer in the cluster; nothing was changed",
                               self.plan.id)
        if not self.plan.learner or not new.member.is_learner:
            return self._quorum(health, "now")
        return self._quorum(health, "after the promotion", voting=1, healthy=1 if new.healthy else 0)

    # -- helpers --------------------------------------------------------

    async def _members(self) -> list[Member]:
        return await self.client.member_list()

    def _by_peer(self, members: list[Member]) -> Member | None:
        return next((m for m in members if self.plan.new_peer_url in m.peer_urls), None)

    async def _wait(self, what: str, seconds: float, probe: Callable[[], Awaitable[str | None]]) -> str:
        return await wait_for(what, seconds, probe, "look at the new member's logs, then /etcd resume the plan")

    # -- the steps ------------------------------------------------------

    async def step_snapshot(self) -> str:
        try:
            saved = await take_snapshot(self.ctx, self.cluster, requested_by=self.actor, channel=self.record.channel,
                                        reason=f"before plan {self.plan.id}", prefer=self.plan.snapshot_source,
                                        plan_id=self.plan.id)
        except SnapshotFailed as e:
            raise StepFailed(str(e), "check /etcd status, then /etcd resume the plan") from None
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

    async def removed(self, detail: str) -> str:
        """Every member the plan removes is gone from the member list (waits, bounded, for raft to apply it)."""
        ids = {int(r.id, 16) for r in (self.plan.failed, *self.plan.also_remove)}

        async def gone() -> str | None:
            return detail if not {m.id for m in await self._members()} & ids else None
        return await self._wait("the removal to show in the member list", CHANGE_TIMEOUT, gone)

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
        await self.ctx.store.update_plan(self.plan.id, new_member_id=added.hex_id, fence=self.fence)
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
            async def joined(_: Stage | None) -> str | None:
                return await self._started_and_reachable()
            return await self.wait_for_person(
                "start", f":point_right: Start *{escape(self.plan.new_name)}* on its machine now (runbook step 4); "
                         f"the bot sees it join:\n{code_block(manual_instructions(self.plan))}", joined,
                StepFailed(f"{self.plan.new_name} did not start and answer within {launcher.timeout_seconds:g}s",
                           "start it with the environment shown, then /etcd resume the plan"))
        if launcher.kind == "ssh":
            return await self._start_on_host()
        result = await run_command(launcher, self.plan, self.ctx.secrets(), self.fencing)
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
            if m is None:
                raise StepFailed(f"the new member {self.plan.new_name} is no longer in the cluster",
                                 "check /etcd members; propose the replacement again")
            if not m.is_learner:
                return f"{self.plan.new_name} is a voting member"
            await self._live_leader()
            try:
                await self.client.member_promote(m.id, timeout=CHANGE_TIMEOUT)
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
        await note(self.ctx, self.record,
                            f":clipboard: *Follow-ups (runbook step 5)*\n"
                            f"1. Update every kube-apiserver and restart it:\n"
                            f"{code_block(shell.command([f'--etcd-servers={servers}']))}\n"
                            f"2. If a load balancer fronts etcd, add {escape(added or self.plan.new_name)} and remove "
                            f"{escape(removed)}.\n"
                            f"3. Update this bot's own configuration: cluster {escape(self.plan.cluster)}, "
                            f"```{escape(config_endpoints(members))}```")
        return f"--etcd-servers={servers}"

    async def step_verify(self) -> str:
        """The new member votes and every member is healthy, but for those the plan found failed already and
        left in place (etcd adds a member while a quorum answers): each gets a replacement of its own."""
        expected = self.plan.expected_members
        removed = {r.id for r in self.plan.also_remove}
        left = {int(r.id, 16): r for r in self.plan.others_failed if r.id not in removed}

        async def verified() -> str | None:
            health = await self.ctx.check(self.cluster)
            ids = {h.member.id for h in health.members}
            if int(self.plan.failed.id, 16) in ids or len(health.members) != expected:
                return None
            if any(not h.healthy and h.member.id not in left for h in health.members) or health.alarms \
                    or health.leader_id is None or any(h.member.is_learner for h in health.members):
                return None
            still = [r.label for mid, r in left.items() if mid in ids and not next(
                h for h in health.members if h.member.id == mid).healthy]
            tail = f"; still failed as planned: {', '.join(still)} (replace it next)" if still else ", all healthy"
            return f"{len(health.members)} members{tail}; leader {health.leader_id:016x}"

        return await self._wait(f"{expected} members, healthy but for those failed already",
                                self.cluster.catch_up_seconds, verified)
