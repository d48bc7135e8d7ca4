"""Restoring a cluster from a verified snapshot, as an operation of the engine
(bot.ops.engine), and proposing it.

Steps (bot.ops.restore.plan.RESTORE_STEPS): verify the snapshot, stop every
member, restore every member's data, start every member, wait for a leader
and every member healthy, verify revisions and HashKV, post the follow-ups.
Each precondition is checked right before its step; each action looks before
it changes (a stopped member stays stopped, a started one is not started
twice, a repeated restore moves the earlier result aside), so a resume may
repeat the interrupted step. Encrypted snapshots are decrypted only into a
0600 temporary file that is removed as soon as the step that needed it ends.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path

from bot.domain.cluster import Member
from bot.domain.errors import EtcdError, FactsChanged, StepFailed
from bot.domain.mrkdwn import Mrkdwn, code_block, escape, mention
from bot.domain.plan import Confirmation, PlanKind, PlanState, Stage, StageAnswer
from bot.domain.quorum import MemberState, QuorumVerdict
from bot.domain.record import PlanRecord
from bot.domain.restore import BUMP_REVISIONS, RestoreMember, RestorePlan, booted_revision
from bot.ops import nodes, ssh
from bot.ops.context import BotContext
from bot.ops.engine import ClusterOperation, StepRun, note, register
from bot.ops.launcher import LaunchResult, member_argv, member_status, run_argv
from bot.ops.outcome import Outcome, refused
from bot.ops.restorable import origin, plaintext, verify_snapshot
from bot.ops.restore.quorum import weigh
from bot.ops.ssh import Host
from bot.output import blocks
from bot.output.blocks import Reply, ago, error_reply
from bot.output.text import K8S_AFTER, bump_note

POLL = 0.5
STOP_TIMEOUT = 60.0  # members must be stopped (by the launcher's status) within this after their stop action

# ---------------------------------------------------------------- propose


# the steps whose action is left to a person: kube-apiserver's stop (every launcher but ssh's static-pod recipe),
# and the manual launcher's stop, restore and start
MANUAL_STAGES = ("apiserver-stop", "stop", "restore", "start")
SETTLE_SECONDS = 15.0  # an unnamed /etcd continue this soon after the previous stage's is taken for that one


async def continue_plan(ctx: BotContext, plan_id: str, stage: str | None, user: str, channel: str,
                        usage: str) -> Outcome:
    """`/etcd continue`: an approver confirms the manual stage the running plan waits on when it arrives (or the
    stage named, which must be that one); a confirmation before its stage began, or of a stage confirmed
    already, is refused and counts for nothing."""
    record = await ctx.store.plan(plan_id)
    if record is None or record.channel != channel:
        return refused(f"no plan {plan_id!r} in this channel", "see /etcd plans")
    if record.state != PlanState.RUNNING or not isinstance(record.plan, RestorePlan):
        return refused(f"plan {plan_id} is {record.state}; only a running restore plan waits for /etcd continue")
    if stage is not None and stage not in MANUAL_STAGES:
        return refused(f"{stage!r} is not a stage of a restore; its stages are {', '.join(MANUAL_STAGES)}",
                        usage=usage)
    answer = await ctx.store.confirm_stage(plan_id, user, stage, SETTLE_SECONDS)
    if answer.outcome is not Confirmation.CONFIRMED or answer.stage is None:
        return Outcome(ephemeral=error_reply(Mrkdwn(_confirmation_refused(record, stage, answer))))
    key = answer.stage.key
    await ctx.store.audit("plan_continued", user=user, channel=channel, cluster=record.cluster,
                          detail={"plan": plan_id, "stage": key, "at": answer.at})
    idx, title = next(((i, s.title) for i, s in enumerate(record.plan.steps) if s.key == key), (-1, key))
    await note(ctx, record, f":arrow_forward: {mention(user)} confirmed stage *{escape(key)}* (step {idx}: "
                            f"{escape(title)}); the bot checks the result now.")
    return Outcome(ephemeral=Reply(text=f"Confirmed stage {escape(key)} of plan {plan_id}."))


def _confirmation_refused(record: PlanRecord, named: str | None, answer: StageAnswer) -> str:
    """One line (mrkdwn, every value escaped): why this `/etcd continue` counts for nothing."""
    plan_id, stage = record.id, answer.stage
    if answer.outcome is Confirmation.ALREADY and stage is not None:
        return (f"stage *{escape(stage.key)}* of plan {plan_id} was confirmed already, by "
                f"{mention(stage.confirmed_by or '')} {ago(answer.at - (stage.confirmed_at or answer.at))} ago: this "
                "confirmation counts for nothing")
    if answer.outcome is Confirmation.TOO_SOON and stage is not None:
        return (f"stage *{escape(stage.key)}* of plan {plan_id} began only {ago(answer.at - stage.opened_at)} ago, "
                "just after the stage before it was confirmed, so this confirmation is taken for that one and counts "
                f"for nothing; once the {escape(stage.key)} is done on every member, confirm it by name: "
                f"`/etcd continue {plan_id} {escape(stage.key)}`")
    asked = f"stage *{escape(named)}*" if named else "a stage"
    if stage is None or not stage.waiting:
        return (f"plan {plan_id} is not waiting for {asked} now (it is at step {record.current_step}): a "
                "confirmation before its stage begins counts for nothing; confirm once the bot posts that stage's "
                "commands in the thread")
    return (f"plan {plan_id} waits on stage *{escape(stage.key)}*, not {escape(named or '')}: a confirmation before "
            "its stage begins counts for nothing")


# ---------------------------------------------------------------- the operation

def _listed(why: dict[str, str]) -> str:
    """Members with why each, for one line: `member1 answers; member2 running (pid 7)`."""
    return "; ".join(f"{name} {reason}" for name, reason in why.items())


class _StartedAgain(Exception):
    """Raised out of the stop step's wait: a member the launcher had shown stopped runs again (the members,
    `_listed`)."""


@register(PlanKind.RESTORE, render=blocks.restore_plan_reply)
class RestoreOperation(ClusterOperation[RestorePlan]):
    plan_type, what = RestorePlan, "a restore"

    def __init__(self, ctx: BotContext, record: PlanRecord, actor: str, started: set[str]):
        super().__init__(ctx, record, actor, started)
        self.began = time.monotonic()

    def steps(self) -> Sequence[StepRun]:
        runs = {
            "verify": StepRun("verify", precondition=self.step_verify),
            "apiserver-stop": StepRun("apiserver-stop", precondition=self.before_stop,
                                      action=partial(self._launch, "apiserver-stop")
                                      if self.plan.bot_restarts_apiserver else self.step_apiserver_by_person),
            "stop": StepRun("stop", precondition=self.before_stop, action=self.step_stop, verify=self.all_stopped),
            "restore": StepRun("restore", precondition=self.before_restore, action=self.step_restore),
            "start": StepRun("start", precondition=self.before_start, action=self.step_start),
            "healthy": StepRun("healthy", action=self.step_healthy),
            "check": StepRun("check", action=self.step_check),
            "apiserver": StepRun("apiserver", precondition=self.before_apiserver,
                                 action=partial(self._launch, "apiserver")),
            "followups": StepRun("followups", action=self.step_followups),
        }
        return [runs[step.key] for step in self.plan.steps]

    def done_note(self) -> str:
        p = self.plan
        return (f"{escape(p.cluster)} was restored from {escape(p.snapshot.file_name)} (revision "
                f"{p.snapshot.revision}, {p.snapshot.total_keys} keys) on {len(p.members)} members.")

    # -- launcher ---------------------------------------------------------

    async def _launch(self, action: str, snapshot_path: str | None = None) -> str:
        """Run the launcher's `action` for every member at once (a restored member waits for its peers to
        serve, so starting them one by one would stall); every exit status and output tail is reported."""
        launcher = self.cluster.launcher
        if launcher.kind == "manual":
            return await self._manual(action, snapshot_path)
        if launcher.kind == "ssh":
            return await self._on_hosts(action, snapshot_path)

        async def one(m: RestoreMember) -> LaunchResult:
            argv = member_argv(launcher.argv, m.name, m.peer_url, m.client_urls, action)
            return await run_argv(launcher, argv, self.plan.environment(m, action, snapshot_path), self.ctx.secrets(),
                                  fencing=self.fencing)

        # every member's launcher checks the lease itself: raise once all have (none is left running unseen)
        outcomes = await asyncio.gather(*(one(m) for m in self.plan.members), return_exceptions=True)
        if error := next((r for r in outcomes if isinstance(r, BaseException)), None):
            raise error
        results = [r for r in outcomes if isinstance(r, LaunchResult)]
        failed = [(m, r) for m, r in zip(self.plan.members, results, strict=True) if not r.ok]
        if failed:
            detail = "; ".join(f"{m.name}: {r.summary}" + (f", output: {r.output_tail.strip()[-600:]}"
                                                          if r.output_tail.strip() else "") for m, r in failed)
            raise StepFailed(f"{action} failed on {len(failed)} of {len(results)} members: {detail}",
                             "fix the launcher or the member by hand, then /etcd resume the plan")
        # done: each member's last output line (what the launcher says it did), else its exit status
        return "; ".join(f"{m.name}: {r.output_tail.strip().splitlines()[-1] if r.output_tail.strip() else r.summary}"
                         for m, r in zip(self.plan.members, results, strict=True))

    def _hosts(self) -> dict[RestoreMember, Host]:
        launcher = self.cluster.launcher
        return {m: ssh.host_for(launcher, m.name, m.peer_url) for m in self.plan.members}

    async def _on_hosts(self, step: str, snapshot_path: str | None) -> str:
        """The ssh launcher: etcd-chatops-node on every member's host at once, what ran and its answer per host."""
        launcher, p = self.cluster.launcher, self.plan
        fence = nodes.fence_flags(self.fencing)
        static_pod = launcher.recipe == "static-pod"
        hosts = self._hosts()
        if step == "restore":
            assert snapshot_path is not None
            snapshot = await nodes.Snapshot.of(Path(snapshot_path), p.cluster)
            bump = ["--bump-revision", str(BUMP_REVISIONS), "--mark-compacted"] if p.bump_supported else []
            work = {host: nodes.restore_work(launcher, snapshot, [
                "--initial-cluster", p.initial_cluster, "--token", p.token, "--peer-url", m.peer_url,
                *(["--client-url", ",".join(m.client_urls)] if m.client_urls else []), *bump], self.fencing)
                for m, host in hosts.items()}
        else:
            name, flags = {"apiserver-stop": ("stop", ["--apiserver-only"]),
                           "stop": ("stop", ["--with-apiserver"] if static_pod else []),
                           "start": ("start", []), "apiserver": ("start", ["--apiserver"])}[step]
            work = {host: nodes.action(name, [*fence, *flags], launcher.timeout_seconds) for host in hosts.values()}
        return await nodes.each_host(launcher, work, f"the {step}", self.fencing)

    async def step_apiserver_by_person(self) -> str:
        """kube-apiserver stopped by a person on every host that runs it, before any member stops: the bot cannot
        reach those hosts (or, external etcd, know them), so the plan waits until an approver confirms."""
        return await self._manual("apiserver-stop", None, where=": stop every kube-apiserver, so nothing writes "
                                                               "while etcd is restored,", done="every kube-apiserver")

    async def _manual(self, action: str, snapshot_path: str | None, where: str = " on every member",
                      done: str = "every member") -> str:
        """The plan waits on stage `action` (the manual launcher's stop, restore and start; apiserver-stop) while a
        person runs the commands shown on each host, until an approver confirms that stage with `/etcd continue`;
        the step then checks the result itself."""
        p = self.plan
        commands = p.manual_commands(action, snapshot_path or "SNAPSHOT.db")

        async def confirmed(stage: Stage | None) -> str | None:
            if stage is None or not stage.confirmed_by:
                return None
            return f"{action} on {done}, confirmed with /etcd continue {p.id} {action}"
        return await self.wait_for_person(
            action, f":point_right: *{escape(action)}*{escape(where)} now, then confirm with "
                    f"`/etcd continue {p.id} {action}`:\n{code_block(commands)}", confirmed,
            StepFailed(f"nobody confirmed the {action} within {self.cluster.launcher.timeout_seconds:g}s",
                       "do it, then /etcd resume the plan"))

    # -- probes -----------------------------------------------------------

    async def _answering(self) -> list[str]:
        """Members whose client URLs answer Status right now."""
        async def answers(m: RestoreMember) -> bool:
            for url in m.client_urls:
                try:
                    await self.client.status(url, timeout=self.cluster.timeout_seconds)
                    return True
                except EtcdError:
                    continue
            return False
        flags = await asyncio.gather(*(answers(m) for m in self.plan.members))
        return [m.name for m, up in zip(self.plan.members, flags, strict=True) if up]

    async def _wait(self, what: str, seconds: float, probe: Callable[[], Awaitable[str | None]]) -> str:
        deadline = time.monotonic() + seconds
        last = ""
        while True:
            try:
                if (found := await probe()) is not None:
                    return found
            except EtcdError as e:
                last = f" (last error: {e})"
            if time.monotonic() >= deadline:
                raise StepFailed(f"{what} did not happen within {seconds:g}s{last}",
                                 "look at the members' logs, then /etcd resume the plan")
            await asyncio.sleep(POLL)

    # -- steps ------------------------------------------------------------

    async def step_verify(self) -> str:
        """Step 0, and the first thing a resume does: the snapshot is still the verified one, and (ssh launcher)
        every host the plan touches is reachable with its pinned key and its node program answers."""
        verified = await verify_snapshot(self.plan.snapshot, self.cluster.restore.age_identity,
                                         origin(self.ctx, self.cluster))
        if self.cluster.launcher.kind != "ssh":
            return verified
        return f"{verified}; {await nodes.require_hosts(self.cluster.launcher, list(self._hosts().values()))}"

    def _known(self) -> list[Member]:
        """The planned members, for the launcher's status when no member gives a member list."""
        return [Member(int(m.id, 16), m.name, (m.peer_url,), m.client_urls) for m in self.plan.members]

    async def _not_stopped(self) -> dict[str, str]:
        """The members not shown stopped, by name, each with why: it answers Status, or (command launcher) the
        launcher's status does not say stopped. With the manual launcher a person confirmed the stop; a member
        that still answers was not stopped."""
        up = set(await self._answering())
        if self.cluster.launcher.kind == "manual":
            return {name: "answers" for name in sorted(up)}
        states = await asyncio.gather(*(member_status(self.cluster.launcher, m.name, m.peer_url, m.client_urls,
                                                      self.ctx.secrets()) for m in self.plan.members))
        return {m.name: f"{'answers' if m.name in up else s.state.value} ({s.detail})"
                for m, s in zip(self.plan.members, states, strict=True)
                if m.name in up or s.state is not MemberState.STOPPED}

    def _stopped_by(self) -> str:
        return {"command": "the launcher's status reports every member stopped",
                "ssh": "etcd-chatops-node reports every member stopped"}.get(
            self.cluster.launcher.kind, "confirmed in the thread, and no member answers")

    async def before_stop(self) -> str:
        """The quorum gate, on every run of the step (a resume too): the facts of the proposal must hold, the
        planned members and, without --force, evidence that quorum is lost (bot.ops.restore.quorum)."""
        p = self.plan
        evidence, health = await weigh(self.ctx, self.cluster, self._known())
        if health is not None:
            live = {h.member.hex_id for h in health.members}
            planned = {m.id for m in p.members} | set(p.left_out)
            if live != planned:
                raise FactsChanged(f"the membership changed since the plan was made (now {len(live)} members: "
                                   f"{', '.join(sorted(h.member.name or h.member.hex_id for h in health.members))}); "
                                   "nothing was stopped", p.id)
        if p.force:
            return f"{evidence.describe()} (--force)"
        if evidence.verdict is QuorumVerdict.HELD:
            raise FactsChanged(f"quorum is back ({evidence.answering} of {evidence.voting} voting members healthy): "
                               "the restore would throw away every write since the snapshot; nothing was stopped",
                               p.id)
        if evidence.verdict is QuorumVerdict.UNPROVEN:
            raise FactsChanged(f"the loss of quorum is no longer proven ({evidence.reason}); nothing was stopped", p.id)
        return f"quorum lost: {evidence.describe()}"

    async def step_stop(self) -> str:
        return await self._launch("stop")

    async def all_stopped(self, detail: str) -> str:
        """Every member stopped by the launcher's own status (with the manual launcher: by the person's
        confirmation, and none answers), never because it does not answer the bot.

        A member the launcher showed stopped that runs again was started by someone else (a person, a
        supervisor, the machine coming back): waiting out the deadline cannot end well, so the step fails
        at once and says which. The manual launcher's only evidence is an answer, which a slow member can
        withhold once, so there the wait goes on."""
        left: dict[str, str] = {}
        seen_stopped: set[str] = set()

        async def stopped() -> str | None:
            left.clear()
            left.update(await self._not_stopped())
            if again := {name: why for name, why in left.items() if name in seen_stopped}:
                raise _StartedAgain(_listed(again))
            if self.cluster.launcher.kind != "manual":
                seen_stopped.update(m.name for m in self.plan.members if m.name not in left)
            return None if left else f"{detail}; {self._stopped_by()}"
        try:
            return await self._wait("every member stopped", STOP_TIMEOUT, stopped)
        except _StartedAgain as e:
            raise StepFailed(f"started again after it was seen stopped: {e}",
                             "find out who started it; /etcd status shows whether quorum is back, and "
                             "/etcd resume re-checks it before anything is stopped") from None
        except StepFailed:
            raise StepFailed(f"not every member stopped within {STOP_TIMEOUT:g}s: {_listed(left)}",
                             "stop them by hand, then /etcd resume the plan") from None

    async def before_restore(self) -> str:
        left = await self._not_stopped()
        if left:
            raise FactsChanged(f"{_listed(left)}: a member restored while another runs on old data would split "
                               "the cluster; nothing was restored", self.plan.id)
        return f"every member is stopped: {self._stopped_by()}"

    async def step_restore(self) -> str:
        async with plaintext(self.plan.snapshot, self.cluster.restore.age_identity,
                             origin(self.ctx, self.cluster)) as plain:
            return await self._launch("restore", str(plain.resolve()))

    async def before_start(self) -> str:
        steps = {s.key: s.state for s in await self.ctx.store.steps(self.plan.id)}
        if steps.get("restore") != "done":
            raise StepFailed("the restore step has not completed", "/etcd resume the plan from its restore step")
        return "every member's data was restored"

    async def step_start(self) -> str:
        return await self._launch("start")

    async def step_healthy(self) -> str:
        async def healthy() -> str | None:
            health = await self.ctx.check(self.cluster)
            if len(health.members) != len(self.plan.members) or not health.all_healthy:
                return None
            return f"{len(health.members)} members, all healthy; leader {health.leader_id:016x}"
        return await self._wait(f"a leader and {len(self.plan.members)} healthy members",
                                self.cluster.catch_up_seconds, healthy)

    async def step_check(self) -> str:
        """Proof that the members run on the restored snapshot and not on their old data: the member IDs and
        cluster ID that the plan's new token gives (etcd derives them from it), every member at exactly the
        snapshot's revision (plus the bump), and HashKV equal there. HashKV agreement alone cannot tell restored
        data from old data: members restarted on what they had agree too."""
        p = self.plan
        expected = booted_revision(p.snapshot.revision, BUMP_REVISIONS if p.bump_supported else 0)
        health = await self.ctx.check(self.cluster)
        live = {h.member.name: h for h in health.members}
        want = p.restored_ids
        redo = (f"restore every member as the plan shows ({p.restore_tool} snapshot restore with its token), start "
                "them, then /etcd resume the plan; or /etcd abandon it")
        if set(live) != set(want):
            raise StepFailed(f"the members are {', '.join(sorted(live))}, not those this plan restored "
                             f"({', '.join(sorted(want))})", redo)
        old = {m.id for m in p.members}
        stale = sorted(n for n, h in live.items() if h.member.hex_id in old)
        if stale:
            raise StepFailed(f"{', '.join(stale)} still {'runs' if len(stale) == 1 else 'run'} with the member ID"
                             f"{'' if len(stale) == 1 else 's'} of before the restore "
                             f"({', '.join(live[n].member.hex_id for n in stale)}): on old data, not on the restored "
                             "snapshot", redo)
        wrong = sorted(n for n, h in live.items() if h.member.id != want[n])
        if wrong:
            raise StepFailed("member IDs are not those this restore's token gives: " + ", ".join(
                f"{n} {live[n].member.hex_id} (expected {want[n]:016x})" for n in wrong) + "; restored with another "
                "token or member list", redo)
        clusters = {h.status.cluster_id if h.status else None for h in health.members}
        if clusters != {p.restored_cluster_id}:
            shown = ", ".join(f"{c:016x}" if c is not None else "unknown" for c in clusters)
            raise StepFailed(f"cluster ID {shown} is not the one this restore's token gives "
                             f"({p.restored_cluster_id:016x})", redo)
        revisions = {n: await self.client.revision(h.member.client_urls[0]) for n, h in live.items()}
        off = {n: r for n, r in revisions.items() if r != expected}
        if off:
            raise StepFailed(f"not at the snapshot's revision {expected}: "
                             + ", ".join(f"{n} at {r}" for n, r in sorted(off.items()))
                             + " (not restored from this snapshot, or written to since it started)",
                             "keep every kube-apiserver stopped until the plan is done; check /etcd status, then "
                             "/etcd resume the plan")
        hashes = {n: (await self.client.hash_kv(h.member.client_urls[0], expected)).hash for n, h in live.items()}
        if len(set(hashes.values())) != 1:
            raise StepFailed(f"HashKV at revision {expected} differs across members: "
                             + ", ".join(f"{n} {v:08x}" for n, v in hashes.items()),
                             "a member's data differs: stop and restore it again")
        return (f"{len(hashes)} members at revision {expected}, with the member IDs and cluster ID of the new token "
                f"(cluster {p.restored_cluster_id:016x}); HashKV at revision {expected} equal on all: "
                f"{next(iter(hashes.values())):08x}")

    async def before_apiserver(self) -> str:
        """kube-apiserver goes back only to a cluster that is whole and healthy now."""
        health = await self.ctx.check(self.cluster)
        if len(health.members) != len(self.plan.members) or not health.all_healthy:
            raise StepFailed(f"{sum(h.healthy for h in health.members)} of {len(self.plan.members)} members healthy: "
                             "kube-apiserver stays stopped until every member is", "/etcd resume the plan once "
                                                                                   "/etcd status shows all healthy")
        return f"{len(health.members)} members, all healthy"

    def _apiserver_back(self) -> str:
        """How to put kube-apiserver back, when a person stopped it in this plan (the ssh launcher's static-pod
        recipe put it back itself, at its own step)."""
        if self.plan.bot_restarts_apiserver or not self.plan.stops_apiserver:
            return ""
        return f" Where you moved kube-apiserver.yaml aside:\n{code_block(self.plan.apiserver_back())}"

    async def step_followups(self) -> str:
        p = self.plan
        steps = await self.ctx.store.steps(p.id)
        took = time.time() - min((s.started_at for s in steps), default=time.time())
        await note(self.ctx, self.record,
                   f":clipboard: *Kubernetes follow-ups*\n1. {K8S_AFTER}{self._apiserver_back()}\n"
                   f"2. {escape(bump_note(p))}\n"
                   f"*Summary:* {escape(p.cluster)} restored to revision {p.snapshot.revision} "
                   f"({p.snapshot.total_keys} keys) from {escape(p.snapshot.file_name)} on {len(p.members)} members, "
                   f"new cluster token `{escape(p.token)}`; took {took:.1f}s from the first step.")
        return f"restored revision {p.snapshot.revision}, {p.snapshot.total_keys} keys"
