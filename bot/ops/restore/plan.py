"""The restore planner: a snapshot, the membership and the quorum -> RestorePlan, or a Refusal.

Pure: no Slack, no gRPC, no clock (the caller passes `now`). Restoring after a
quorum loss is etcd's recovery guide: the *same* snapshot restored on every
member with `etcdutl snapshot restore`, a NEW cluster token (reusing the old
one is the classic "cluster ID mismatch"), then every member started on its
restored data directory. The plan states all of it, for every member.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bot.config import ClusterConfig
from bot.domain.cluster import Member
from bot.domain.errors import EtcdError, Refusal
from bot.domain.plan import PlanKind, Step
from bot.domain.quorum import QuorumEvidence, QuorumVerdict
from bot.domain.restore import Membership, RestoreMember, RestorePlan
from bot.domain.snapshot import SnapshotRecord, SnapshotRef
from bot.ops.outcome import Outcome, open_plan_refusal, refused
from bot.ops.proposals import publish_plan
from bot.ops.restorable import restorable
from bot.ops.restore.quorum import weigh

if TYPE_CHECKING:  # the context is gRPC's; the planning above it is not
    from bot.ops.context import BotContext


def choose_snapshot(rows: Sequence[SnapshotRecord | SnapshotRef], wanted: str | None, *,
                    foreign_ok: bool = False, encrypted_only: bool = False) -> tuple[SnapshotRef, tuple[str, ...]]:
    """The snapshot asked for (file name or revision), else the newest the catalog knows; and the names of
    the bot's own newer ones. `rows`: the cluster's verified snapshots (catalog rows, or refs from the
    catalog of both places), newest first. The store alone never picks the default: an object only the
    store holds is chosen only by name, and a foreign one (not signed by the bot) only by its exact file
    name and with `foreign_ok` (a restore's --force). `encrypted_only` (the cluster has age_recipients):
    a plaintext object the catalog did not record is refused, whatever its manifest says."""
    refs = [r if isinstance(r, SnapshotRef) else SnapshotRef.of(r) for r in rows]
    own = [r for r in refs if not r.foreign]
    if wanted is None:
        catalogued = [r for r in own if r.id]
        if not catalogued and own:
            raise Refusal(f"the bot's catalog records no snapshot of this cluster; the store holds {len(own)} it "
                          f"wrote, the newest {own[0].file_name}", "name the one you want (see /etcd snapshots)")
        if not catalogued:
            raise Refusal("no verified snapshot of this cluster is recorded", "take one with /etcd snapshot while "
                          "a member answers, or restore by hand from your own backup")
        chosen = catalogued[0]
    else:
        w = wanted.strip()
        chosen = next((r for r in own if r.file_name == w or (w.isdigit() and r.revision == int(w))), None) or \
            _foreign(refs, w, foreign_ok)
    if encrypted_only and not chosen.encrypted and not chosen.id:
        raise Refusal(f"{chosen.file_name} is plaintext, this cluster encrypts its snapshots (age_recipients), "
                      "and the bot's catalog never recorded it", "choose an encrypted snapshot, or one the catalog "
                      "records (see /etcd snapshots)")
    return chosen, tuple(r.file_name for r in refs[:refs.index(chosen)] if not r.foreign)


def _foreign(refs: list[SnapshotRef], name: str, allowed: bool) -> SnapshotRef:
    """The foreign object named exactly `name`, when it may be used; Refusal otherwise."""
    found = next((r for r in refs if r.foreign and r.file_name == name), None)
    if found is None:
        raise Refusal(f"no recorded snapshot named or at revision {name!r}", "see /etcd snapshots")
    if not found.sha256:
        raise Refusal(f"{name} is foreign ({found.foreign}): nothing says what it holds",
                      "fetch it with the store's own tools and restore by hand if you must")
    if not allowed:
        raise Refusal(f"{name} is foreign, not a snapshot this bot took: {found.foreign}",
                      "restore it only on purpose, by name with --force")
    return found


RESTORE_STEPS = (
    ("verify", "Verify the snapshot: sha256 trailer, bbolt structure, status matches the catalog"),
    ("stop", "Stop every member"),
    ("restore", "Restore every member's data from the snapshot (old data directories moved aside)"),
    ("start", "Start every member on its restored data"),
    ("healthy", "Wait for a leader and every member healthy"),
    ("check", "Verify: every member at the snapshot's revision, HashKV equal across members"),
    ("followups", "Post the Kubernetes follow-ups and a summary"),
)


# The ssh launcher's static-pod recipe stops kube-apiserver itself, as a step of its own before any member stops,
# and puts it back only once the restored cluster is healthy and verified.
APISERVER_STOP = ("apiserver-stop", "Stop kube-apiserver on every host (kube-apiserver.yaml into the holding "
                                    "directory), so nothing writes while etcd is restored")
APISERVER_START = ("apiserver", "Put kube-apiserver back on every host, now that the whole cluster is healthy and "
                                "verified")
# Every other launcher: a person stops it and confirms, as a step of its own (`[clusters.restore] apiserver`).
APISERVER_ASK = ("apiserver-stop", "Stop every kube-apiserver (a person does, then confirms with /etcd continue), so "
                                   "nothing writes while etcd is restored")
SSH_VERIFY = ("verify", "Verify the snapshot (sha256 trailer, bbolt structure, status matches the catalog) and every "
                        "host (SSH with its pinned key, etcd-chatops-node's status)")


def restore_steps(launcher: str, recipe: str | None, apiserver: str = "ask") -> tuple[Step, ...]:
    """The steps for the launcher: the ssh launcher checks every host at step 0. kube-apiserver is stopped in a
    step of its own before any member: by the bot with ssh's static-pod recipe (which also puts it back once the
    cluster is verified), by a person otherwise, unless `apiserver` is "none"."""
    steps = list(RESTORE_STEPS)
    if launcher == "ssh":
        steps[0] = SSH_VERIFY
    before_stop = steps.index(next(s for s in steps if s[0] == "stop"))
    if launcher == "ssh" and recipe == "static-pod":
        steps.insert(before_stop, APISERVER_STOP)
        steps.insert(steps.index(next(s for s in steps if s[0] == "check")) + 1, APISERVER_START)
    elif apiserver == "ask":
        steps.insert(before_stop, APISERVER_ASK)
    return tuple(Step(k, t) for k, t in steps)


def plan_restore(cluster: str, snapshot: SnapshotRef, newer: tuple[str, ...], membership: Membership, *,
                 quorum: QuorumEvidence, force: bool, current_revision: int | None, data_dir: str,
                 etcd_version: str, launcher: str, launcher_has_actions: bool, recipe: str | None = None,
                 apiserver: str = "ask", plan_id: str | None = None) -> RestorePlan:
    """Build the restore plan, or raise Refusal. Without --force only on proof that quorum is lost
    (`quorum`, bot.ops.restore.quorum); `data_dir` a template with {name}. Learners that never started are left out:
    they hold no data, and a restore rebuilds the cluster from its voters."""
    verdict = quorum.verdict
    if verdict is QuorumVerdict.HELD and not force:
        raise Refusal(f"cluster {cluster} still has quorum ({quorum.answering} of {quorum.voting} voting members "
                      "healthy): a restore would throw away every write since the snapshot",
                      "use /etcd replace for failed members; to roll back on purpose add --force")
    if verdict is QuorumVerdict.UNPROVEN and not force:
        raise Refusal(quorum.reason, "check the bot's path to the members and its TLS credentials (a rotated CA?); "
                                     "if you know the cluster is down, add --force")
    if launcher == "command" and not launcher_has_actions:
        raise Refusal("the cluster's command launcher has no {action} in its argv, so it can only start members",
                      "add {action} to the launcher argv (start, stop, restore, status), or use the manual launcher")
    if not membership.members:
        raise Refusal(f"no member of {cluster} answers and the bot never recorded its membership",
                      "restore by hand (etcdutl snapshot restore on every member)")
    members, left_out = [], []
    for hex_id, name, peers, clients in membership.members:
        if not name or not peers:
            if hex_id in membership.learners:
                left_out.append(hex_id)
                continue
            raise Refusal(f"member {hex_id} has no name or peer URL (never started)",
                          "remove it, or restore by hand")
        members.append(RestoreMember(name, hex_id, peers[0], clients, data_dir.replace("{name}", name)))
    pid = plan_id or secrets.token_hex(3)
    token = f"{cluster}-restore-{pid}-{secrets.token_hex(4)}"
    return RestorePlan(id=pid, cluster=cluster, snapshot=snapshot, members=tuple(members), token=token, force=force,
                       quorum_now=(quorum.voting, quorum.answering), current_revision=current_revision,
                       membership_source=membership.source, membership_seen_at=membership.seen_at, newer=newer,
                       etcd_version=etcd_version, launcher=launcher, steps=restore_steps(launcher, recipe, apiserver),
                       fingerprint=f"{snapshot.sha256}:{','.join(m.id for m in members)}", verdict=verdict.value,
                       evidence=quorum.describe(), left_out=tuple(left_out))


async def propose_restore(ctx: BotContext, cluster: ClusterConfig, wanted: str | None, force: bool, user: str,
                          channel: str, usage: str) -> Outcome:
    store = ctx.store
    open_plan = await store.open_plan(cluster.name)
    if open_plan:
        return open_plan_refusal(open_plan.id, open_plan.state)
    last = await store.last_membership(cluster.name)
    recorded = list(last.members) if last else []
    # "I cannot reach it" is not "quorum lost": the gate wants evidence (bot.ops.restore.quorum)
    evidence, health = await weigh(ctx, cluster, recorded)
    current = None
    if health is not None:
        source = health.snapshot_source()
        if source is not None and evidence.verdict is QuorumVerdict.HELD:
            try:
                current = await ctx.client(cluster).revision(source.member.client_urls[0])
            except EtcdError:
                current = None
        membership = _membership([h.member for h in health.members], "live", health.checked_at)
        version = next((h.status.version for h in health.members if h.status), "")
    else:  # nothing answers: the recorded membership says who the members are
        membership = _membership(recorded, "recorded", last.seen_at if last else 0.0)
        version = ""
    try:
        snapshot, newer = choose_snapshot(await restorable(ctx, cluster), wanted, foreign_ok=force,
                                          encrypted_only=cluster.snapshots.encrypted)
        plan = plan_restore(cluster.name, snapshot, newer, membership, quorum=evidence, force=force,
                            current_revision=current, data_dir=cluster.restore.data_dir, etcd_version=version,
                            launcher=cluster.launcher.kind, launcher_has_actions=cluster.launcher.has_actions,
                            recipe=cluster.launcher.recipe, apiserver=cluster.restore.apiserver)
    except Refusal as r:
        await store.audit("restore_refused", user=user, channel=channel, cluster=cluster.name,
                          detail={"reason": r.reason, "snapshot": wanted, "force": force})
        return refused(f"cannot restore {cluster.name}: {r.reason}", r.hint, usage)
    return await publish_plan(ctx, PlanKind.RESTORE, plan, cluster.name, user, channel,
                              {"plan": plan.id, "snapshot": snapshot.file_name, "revision": snapshot.revision,
                               "foreign": snapshot.foreign or None,
                               "from_store": snapshot.remote_url or None, "force": force,
                               "membership": membership.source, "token": plan.token,
                               "quorum": plan.verdict, "evidence": plan.evidence, "left_out": list(plan.left_out)})


def _membership(members: Sequence[Member], source: str, seen_at: float) -> Membership:
    return Membership(tuple((m.hex_id, m.name, m.peer_urls, m.client_urls) for m in members), source, seen_at,
                      frozenset(m.hex_id for m in members if m.is_learner))
