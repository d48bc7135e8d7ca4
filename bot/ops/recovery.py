"""Restoring a cluster from a verified snapshot, as an operation of the engine
(bot.ops.engine), and proposing it.

Steps (bot.ops.restore.RESTORE_STEPS): verify the snapshot, stop every
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
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from bot.backup.catalog import Expected, FetchFailed, Origin, catalog
from bot.config import ClusterConfig
from bot.etcd.health import ClusterHealth
from bot.etcd.model import EtcdError
from bot.etcd.snapshots import sha256_file
from bot.ops.context import BotContext
from bot.ops.engine import ClusterOperation, FactsChanged, StepFailed, StepRun, note, register
from bot.ops.launcher import LaunchResult, fill_argv, run_argv
from bot.ops.lifecycle import Outcome, _open_plan_refusal, _refused, publish_plan
from bot.ops.replace import Refusal
from bot.ops.restore import (
    BUMP_REVISIONS,
    K8S_AFTER,
    Membership,
    RestoreMember,
    RestorePlan,
    SnapshotRef,
    bump_note,
    choose_snapshot,
    plan_restore,
)
from bot.ops.snapshots import remote_store
from bot.output.blocks import Mrkdwn, Reply, ago, code_block, error_reply, escape, mention
from bot.output.model import RemoteState
from bot.store.records import Confirmation, PlanKind, PlanRecord, PlanState, StageAnswer

POLL = 0.5
STOP_TIMEOUT = 60.0  # members must stop answering within this after their stop action

# ---------------------------------------------------------------- propose

async def propose_restore(ctx: BotContext, cluster: ClusterConfig, wanted: str | None, force: bool, user: str,
                          channel: str, usage: str) -> Outcome:
    store = ctx.store
    open_plan = await store.open_plan(cluster.name)
    if open_plan:
        return _open_plan_refusal(open_plan.id, open_plan.state)
    health: ClusterHealth | None
    try:
        health = await ctx.check(cluster)
    except EtcdError:
        health = None  # nothing answers: the recorded membership says who the members are
    current = None
    if health is not None:
        source = health.snapshot_source()
        if source is not None and health.quorum.ok:
            try:
                current = await ctx.client(cluster).revision(source.member.client_urls[0])
            except EtcdError:
                current = None
        membership = Membership(tuple((h.member.hex_id, h.member.name, h.member.peer_urls, h.member.client_urls)
                                      for h in health.members), "live", health.checked_at)
        quorum = (health.quorum.voting, health.quorum.healthy)
        version = next((h.status.version for h in health.members if h.status), "")
    else:
        last = await store.last_membership(cluster.name)
        members = [(m["id"], m["name"], tuple(m["peer_urls"]), tuple(m["client_urls"])) for m in (last[0] if last
                                                                                                   else [])]
        membership = Membership(tuple(members), "recorded", last[1] if last else 0.0)
        quorum = (len(members), 0)
        version = ""
    try:
        snapshot, newer = choose_snapshot(await restorable(ctx, cluster), wanted, foreign_ok=force,
                                          encrypted_only=cluster.snapshots.encrypted)
        plan = plan_restore(cluster.name, snapshot, newer, membership, quorum=quorum, force=force,
                            current_revision=current, data_dir=cluster.restore.data_dir, etcd_version=version,
                            launcher=cluster.launcher.kind, launcher_has_actions=cluster.launcher.has_actions)
    except Refusal as r:
        await store.audit("restore_refused", user=user, channel=channel, cluster=cluster.name,
                          detail={"reason": r.reason, "snapshot": wanted, "force": force})
        return _refused(f"cannot restore {cluster.name}: {r.reason}", r.hint, usage)
    return await publish_plan(ctx, PlanKind.RESTORE, plan, cluster.name, user, channel,
                              {"plan": plan.id, "snapshot": snapshot.file_name, "revision": snapshot.revision,
                               "foreign": snapshot.foreign or None,
                               "from_store": snapshot.remote_url or None, "force": force,
                               "membership": membership.source, "token": plan.token})


MANUAL_STAGES = ("stop", "restore", "start")  # the steps whose action the manual launcher leaves to a person
SETTLE_SECONDS = 15.0  # an unnamed /etcd continue this soon after the previous stage's is taken for that one


async def continue_plan(ctx: BotContext, plan_id: str, stage: str | None, user: str, channel: str,
                        usage: str) -> Outcome:
    """`/etcd continue`: an approver confirms the manual stage the running plan waits on when it arrives (or the
    stage named, which must be that one); a confirmation before its stage began, or of a stage confirmed
    already, is refused and counts for nothing."""
    record = await ctx.store.plan(plan_id)
    if record is None or record.channel != channel:
        return _refused(f"no plan {plan_id!r} in this channel", "see /etcd plans")
    if record.state != PlanState.RUNNING or not isinstance(record.plan, RestorePlan):
        return _refused(f"plan {plan_id} is {record.state}; only a running restore plan waits for /etcd continue")
    if stage is not None and stage not in MANUAL_STAGES:
        return _refused(f"{stage!r} is not a stage of a restore; its stages are {', '.join(MANUAL_STAGES)}",
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


# ---------------------------------------------------------------- the snapshot, verified and in plaintext

def _decrypt(src: Path, identity: str, directory: Path) -> Path:
    """The plaintext in a new 0600 file beside the snapshots (mkstemp creates it 0600)."""
    import pyrage
    from pyrage import x25519
    fd, name = tempfile.mkstemp(prefix=".restore-", suffix=".db", dir=directory)
    try:
        with open(src, "rb") as s, os.fdopen(fd, "wb") as d:
            pyrage.decrypt_io(s, d, [x25519.Identity.from_str(identity)])
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def origin(ctx: BotContext, cluster: ClusterConfig) -> Origin | None:
    """Where this cluster's remote snapshots come from (None: no store configured)."""
    store = cluster.snapshots.store
    return None if store is None else Origin(store, cluster.name, ctx.config.snapshot_dir, remote_store)


async def restorable(ctx: BotContext, cluster: ClusterConfig) -> list[SnapshotRef]:
    """The snapshots a restore or drill can use, newest first: each local copy retention kept, else its verified
    copy in the store (also objects only the store knows, from their manifests, and foreign ones, which
    choose_snapshot takes only by name)."""
    rows = await ctx.store.snapshots(cluster.name, limit=100000, include_pruned=True)
    view = await catalog(cluster.snapshots.store, cluster.name, rows, limit=1000, open_store=remote_store)
    return [SnapshotRef.of_entry(e, str(ctx.config.snapshot_dir)) for e in view.entries
            if e.local_path or (e.remote_state in (RemoteState.VERIFIED, RemoteState.LISTED)
                                and (e.described or e.foreign))]


async def adopt(ctx: BotContext, cluster: ClusterConfig, snapshot: SnapshotRef) -> int:
    """Catalog an object only the store knows (from its signed manifest), without a local copy, once a drill
    verified it; returns its row id. A foreign object is never catalogued: the catalog is what a restore
    trusts by default."""
    if snapshot.foreign:
        raise ValueError(f"{snapshot.file_name} is foreign ({snapshot.foreign}): it is never catalogued")
    now = time.time()
    snapshot_id = await ctx.store.record_snapshot({
        "cluster": cluster.name, "path": snapshot.path, "member": snapshot.member, "revision": snapshot.revision,
        "hash": snapshot.hash, "total_keys": snapshot.total_keys, "live_keys": snapshot.live_keys,
        "total_size": snapshot.total_size, "file_size": snapshot.file_size, "sha256": snapshot.sha256,
        "encrypted": int(snapshot.encrypted), "requested_by": "", "reason": "found in the store", "duration": 0.0,
        "created_at": snapshot.created_at, "plan_id": None, "pruned_at": now, "remote_url": snapshot.remote_url,
        "remote_state": "verified", "remote_verified_at": now})
    await ctx.store.audit("snapshot_adopted", cluster=cluster.name,
                          detail={"id": snapshot_id, "file": snapshot.file_name, "url": snapshot.remote_url})
    return snapshot_id


@asynccontextmanager
async def stored_copy(snapshot: SnapshotRef, source: Origin | None) -> AsyncIterator[Path]:
    """The snapshot as stored (the ciphertext when encrypted): the local file, or a copy fetched from the
    store into a 0600 file whose size and sha256 were checked against the catalog, removed after."""
    if not snapshot.from_store:
        yield Path(snapshot.path)
        return
    if source is None:
        raise StepFailed(f"{snapshot.file_name} is only in the snapshot store and this cluster has no store "
                         "configured", "configure [snapshots.store] again, restart the bot, then /etcd resume")
    try:
        async with source.fetched(Expected(snapshot.file_name, snapshot.file_size, snapshot.sha256)) as path:
            yield path
    except FetchFailed as e:
        raise StepFailed(str(e), "choose another snapshot") from None


@asynccontextmanager
async def plaintext(snapshot: SnapshotRef, identity: str | None, source: Origin | None = None) -> AsyncIterator[Path]:
    """The snapshot's plaintext path while the block runs: the file itself, or a 0600 temp file removed after."""
    async with stored_copy(snapshot, source) as path:
        if not snapshot.encrypted:
            yield path
            return
        if identity is None:
            raise StepFailed(f"{snapshot.file_name} is age-encrypted and no identity is configured to decrypt it",
                             "set [clusters.restore] age_identity_file or age_identity_env, restart the bot, then "
                             "/etcd resume the plan")
        try:
            plain = await asyncio.to_thread(_decrypt, path, identity, path.parent)
        except Exception as e:
            raise StepFailed(f"cannot decrypt {snapshot.file_name}: {type(e).__name__}: {e}",
                             "check the configured age identity matches the snapshot's recipients") from None
        try:
            yield plain
        finally:
            plain.unlink(missing_ok=True)


async def check_stored(snapshot: SnapshotRef) -> None:
    """A local copy is still the file catalogued (a fetched copy is checked as it arrives)."""
    if snapshot.from_store:
        return
    path = Path(snapshot.path)
    if not path.is_file():
        raise StepFailed(f"{snapshot.file_name} is no longer at {snapshot.path}", "choose another snapshot")
    sha = await asyncio.to_thread(sha256_file, path)
    if sha != snapshot.sha256:
        raise StepFailed(f"{snapshot.file_name} has changed since it was recorded: sha256 {sha[:16]}…, the catalog "
                         f"says {snapshot.sha256[:16]}…; nothing was stopped", "choose another snapshot")


async def check_plain(snapshot: SnapshotRef, plain: Path) -> str:
    """The plaintext's trailer, bbolt structure and status against the catalog."""
    from bot.etcd.bbolt import SnapshotError, snapshot_status
    try:
        status = await asyncio.to_thread(snapshot_status, plain, True)
    except SnapshotError as e:
        raise StepFailed(f"{snapshot.file_name} is not a valid snapshot: {e}; nothing was stopped",
                         "choose another snapshot") from None
    if not status.has_trailer:
        raise StepFailed(f"{snapshot.file_name} has no sha256 trailer: etcd's own integrity check cannot run",
                         "choose a snapshot the bot took")
    found = (status.revision, status.hash_hex, status.total_keys)
    if found != (snapshot.revision, snapshot.hash, snapshot.total_keys):
        raise StepFailed(f"{snapshot.file_name} reads as revision {found[0]}, hash {found[1]}, {found[2]} keys; the "
                         f"catalog says revision {snapshot.revision}, hash {snapshot.hash}, {snapshot.total_keys} "
                         "keys; nothing was stopped", "choose another snapshot")
    where = f" (fetched from the store, {snapshot.remote_url})" if snapshot.from_store else ""
    return (f"{snapshot.file_name}{where}: sha256 and trailer verified, bbolt structure sound, revision "
            f"{status.revision}, hash {status.hash_hex}, {status.total_keys} keys")


async def verify_snapshot(snapshot: SnapshotRef, identity: str | None, source: Origin | None = None) -> str:
    """The file as catalogued: sha256 of the stored file, then the plaintext's trailer, bbolt structure and status."""
    await check_stored(snapshot)
    async with plaintext(snapshot, identity, source) as plain:
        return await check_plain(snapshot, plain)


# ---------------------------------------------------------------- the operation

@register(PlanKind.RESTORE)
class RestoreOperation(ClusterOperation[RestorePlan]):
    plan_type, what = RestorePlan, "a restore"

    def __init__(self, ctx: BotContext, record: PlanRecord, actor: str, started: set[str]):
        super().__init__(ctx, record, actor, started)
        self.began = time.monotonic()

    def steps(self) -> Sequence[StepRun]:
        runs = {
            "verify": StepRun("verify", precondition=self.step_verify),
            "stop": StepRun("stop", precondition=self.before_stop, action=self.step_stop, verify=self.all_stopped),
            "restore": StepRun("restore", precondition=self.before_restore, action=self.step_restore),
            "start": StepRun("start", precondition=self.before_start, action=self.step_start),
            "healthy": StepRun("healthy", action=self.step_healthy),
            "check": StepRun("check", action=self.step_check),
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

        async def one(m: RestoreMember) -> LaunchResult:
            argv = fill_argv(launcher.argv, {"name": m.name, "peer_url": m.peer_url,
                                             "client_url": ",".join(m.client_urls), "action": action})
            return await run_argv(launcher, argv, self.plan.environment(m, action, snapshot_path), self.ctx.secrets())

        results = await asyncio.gather(*(one(m) for m in self.plan.members))
        failed = [(m, r) for m, r in zip(self.plan.members, results, strict=True) if not r.ok]
        if failed:
            detail = "; ".join(f"{m.name}: {r.summary}" + (f", output: {r.output_tail.strip()[-600:]}"
                                                          if r.output_tail.strip() else "") for m, r in failed)
            raise StepFailed(f"{action} failed on {len(failed)} of {len(results)} members: {detail}",
                             "fix the launcher or the member by hand, then /etcd resume the plan")
        # done: each member's last output line (what the launcher says it did), else its exit status
        return "; ".join(f"{m.name}: {r.output_tail.strip().splitlines()[-1] if r.output_tail.strip() else r.summary}"
                         for m, r in zip(self.plan.members, results, strict=True))

    async def _manual(self, action: str, snapshot_path: str | None) -> str:
        """The manual launcher: the plan waits on stage `action` (stop, restore, start) while a person runs the
        commands shown on each host, until an approver confirms that stage with `/etcd continue`; the step then
        checks the result itself."""
        p, store = self.plan, self.ctx.store
        await store.open_stage(p.id, action, fence=self.fence)  # before the commands: no confirmation is early
        commands = p.manual_commands(action, snapshot_path or "SNAPSHOT.db")
        await note(self.ctx, self.record, f":point_right: *{escape(action)}* on every member now, then confirm with "
                                          f"`/etcd continue {p.id} {action}`:\n{code_block(commands)}")
        deadline = time.monotonic() + self.cluster.launcher.timeout_seconds
        while time.monotonic() < deadline:
            stage = await store.stage(p.id, action)
            if stage is not None and stage.confirmed_by:
                break
            await asyncio.sleep(POLL)
        ended = await store.close_stage(p.id, action, fence=self.fence)  # a confirmation that raced the end counts
        if ended is None or not ended.confirmed_by:
            raise StepFailed(f"nobody confirmed the {action} within {self.cluster.launcher.timeout_seconds:g}s",
                             "do it, then /etcd resume the plan")
        return f"{action} on every member, confirmed with /etcd continue {p.id} {action}"

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
        """Step 0, and the first thing a resume does: the snapshot is still the verified one."""
        return await verify_snapshot(self.plan.snapshot, self.cluster.restore.age_identity,
                                     origin(self.ctx, self.cluster))

    async def before_stop(self) -> str:
        """The quorum gate, against the live cluster: without --force only a cluster that lost quorum."""
        p = self.plan
        try:
            health = await self.ctx.check(self.cluster)
        except EtcdError:
            return "no member answers: quorum is lost"
        if "stop" in self.started:
            return "resuming the stop"
        live = {h.member.hex_id for h in health.members}
        planned = {m.id for m in p.members}
        if live != planned:
            raise FactsChanged(f"the membership changed since the plan was made (now {len(live)} members: "
                               f"{', '.join(sorted(h.member.name or h.member.hex_id for h in health.members))}); "
                               "nothing was stopped", p.id)
        q = health.quorum
        if q.ok and not p.force:
            raise FactsChanged(f"quorum is back ({q.healthy} of {q.voting} voting members healthy): the restore "
                               "would throw away every write since the snapshot; nothing was stopped", p.id)
        return f"{q.healthy} of {q.voting} voting members healthy" + (" (--force)" if p.force else "; quorum lost")

    async def step_stop(self) -> str:
        return await self._launch("stop")

    async def all_stopped(self, detail: str) -> str:
        async def stopped() -> str | None:
            return None if await self._answering() else detail
        return await self._wait("every member to stop answering", STOP_TIMEOUT, stopped)

    async def before_restore(self) -> str:
        up = await self._answering()
        if up:
            raise FactsChanged(f"{', '.join(up)} answer{'s' if len(up) == 1 else ''} again: a member restored while "
                               "another runs on old data would split the cluster; nothing was restored", self.plan.id)
        return "every member is stopped"

    async def step_restore(self) -> str:
        async with plaintext(self.plan.snapshot, self.cluster.restore.age_identity,
                             origin(self.ctx, self.cluster)) as plain:
            return await self._launch("restore", str(plain.resolve()))

    async def before_start(self) -> str:
        steps = {s["key"]: s["state"] for s in await self.ctx.store.steps(self.plan.id)}
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
        expected = p.snapshot.revision + (BUMP_REVISIONS if p.bump_supported else 0)
        health = await self.ctx.check(self.cluster)
        live = {h.member.name: h for h in health.members}
        want = p.restored_ids
        redo = ("restore every member as the plan shows (etcdutl snapshot restore with its token), start them, "
                "then /etcd resume the plan; or /etcd abandon it")
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

    async def step_followups(self) -> str:
        p = self.plan
        steps = await self.ctx.store.steps(p.id)
        took = time.time() - min((s["started_at"] for s in steps), default=time.time())
        await note(self.ctx, self.record,
                   f":clipboard: *Kubernetes follow-ups*\n1. {K8S_AFTER}\n2. {escape(bump_note(p))}\n"
                   f"*Summary:* {escape(p.cluster)} restored to revision {p.snapshot.revision} "
                   f"({p.snapshot.total_keys} keys) from {escape(p.snapshot.file_name)} on {len(p.members)} members, "
                   f"new cluster token `{escape(p.token)}`; took {took:.1f}s from the first step.")
        return f"restored revision {p.snapshot.revision}, {p.snapshot.total_keys} keys"
