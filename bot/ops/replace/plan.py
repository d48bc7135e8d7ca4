"""The replacement planner: ClusterHealth + request -> Plan, or a Refusal.

Pure: no Slack, no gRPC, no clock. Every refusal says why in one line and,
where there is one, what to do instead. The quorum is checked for the state
after every step of the plan, not only for the state now.
"""
from __future__ import annotations

import ipaddress
import json
import re
import secrets
from collections.abc import Collection
from dataclasses import replace
from typing import TYPE_CHECKING

from bot.config import ClusterConfig
from bot.domain.cluster import ClusterHealth, Member, MemberHealth, Quorum, member_labels
from bot.domain.errors import EtcdError, Refusal
from bot.domain.plan import PlanKind, PlanState, Step
from bot.domain.replace import MemberRef, ReplacePlan, ReplaceRequest
from bot.domain.urls import Endpoint, parse_url, read_url, shown_urls
from bot.ops.outcome import Outcome, open_plan_refusal, refused
from bot.ops.proposals import publish_plan

if TYPE_CHECKING:  # the context is gRPC's; the planning above it is not
    from bot.ops.context import BotContext


def new_plan_id() -> str:
    return secrets.token_hex(3)


def _url(value: str, what: str) -> str:
    try:
        return parse_url(value).url
    except ValueError as e:
        raise Refusal(f"{what}: {e}") from None


def _check_quorum_after(step: str, voting: int, healthy: int) -> None:
    q = Quorum(voting, healthy)
    if not q.ok:
        raise Refusal(f"after the step \u201c{step}\u201d the cluster would have {healthy} healthy of {voting} voting "
                      f"members, below its quorum of {q.needed}",
                      "restore the failed members' health first, or replace them one at a time")


# The releases whose member add asks only that the member asked reaches a quorum of the voters counted with
# the new member (etcd's isConnectedToQuorumAfterAddingNewMemberSince): earlier ones ask that it reaches every
# voter (isConnectedFullySince), learner or not. 3.5.27 and 3.6.10 are the last with the old rule; 3.5.28 to
# 3.5.30 are not on the Go module proxy to check, so they keep it here.
QUORUM_ADD_SINCE = {(3, 5): (3, 5, 31), (3, 6): (3, 6, 11)}


def strict_reconfig(health: ClusterHealth) -> bool:
    """Whether etcd will add a member only when the member asked has been connected to every voting member
    for 5 s: so while another voter is unreachable, it goes first. Any member on a release with the old rule
    (or an unknown version) decides, since the add may reach any of them."""
    versions = [_version(h.status.version) for h in health.members if h.status]
    return not versions or not all(_adds_on_quorum(v) for v in versions)


def _adds_on_quorum(version: tuple[int, int, int]) -> bool:
    since = QUORUM_ADD_SINCE.get(version[:2])
    return version >= (3, 7, 0) or (since is not None and version >= since)


def _version(text: str) -> tuple[int, int, int]:
    try:
        major, minor, patch = (text.split("-")[0].split(".") + ["0", "0"])[:3]
        return int(major), int(minor), int(patch)
    except ValueError:
        return (0, 0, 0)


def plan_replacement(health: ClusterHealth, req: ReplaceRequest, *, newest_snapshot: str | None = None,
                     plan_id: str | None = None, launcher: str = "manual",
                     removed: tuple[MemberRef, str] | None = None) -> ReplacePlan:
    """Build the runbook's replacement plan, or raise Refusal.

    `removed`: the failed member as an earlier plan recorded it when it
    removed it (with that plan's ID); the new plan then only adds."""
    new_peer = _url(req.new_peer_url, "<new-peer-url>")
    new_client = _url(req.new_client_url, "--client-url") if req.new_client_url else None

    q = health.quorum
    if not q.ok:
        where = (f"restore the cluster from the newest recorded snapshot, {newest_snapshot}" if newest_snapshot
                 else "restore the cluster from your newest snapshot (none is recorded by this bot)")
        raise Refusal(f"quorum is lost: {q.healthy} of {q.voting} voting members are healthy and "
                      f"{q.needed} are needed; no member replacement can fix that",
                      f"{where} (etcdutl snapshot restore on every member)")

    if launcher == "ssh" and new_client is None:
        raise Refusal("the ssh launcher starts the new member with etcd-chatops-node, which needs its client URL",
                      "add --client-url http(s)://<new host>:2379")
    target = health.find(req.failed)
    if target is None and removed is not None:
        return _plan_add_only(health, req, removed, new_peer, new_client, plan_id, launcher)
    if target is None:
        names = ", ".join(m.member.name or m.member.hex_id for m in health.members)
        raise Refusal(f"no member {req.failed!r} in cluster {health.cluster} (members: {names})")
    if target.healthy:
        raise Refusal(f"{target.member.name or target.member.hex_id} still answers and reports healthy: "
                      f"a healthy member is not a failed member",
                      "check /etcd status; replace only a member that is down")

    _check_new_member(health, req, new_peer, new_client)
    others = [h for h in health.members if h is not target]
    pending = [h for h in others if not h.member.started]
    if pending:
        p = pending[0].member
        raise Refusal(f"member {p.hex_id} ({shown_urls(p.peer_urls)}) was added but never started",
                      "start it or remove it before replacing another member")
    learners = [h for h in others if h.member.is_learner]
    if req.learner and learners:
        raise Refusal(f"{learners[0].member.name} is a learner already and etcd allows one learner at a time",
                      "promote or remove it first, or use --no-learner")

    new_name = req.new_name.strip()
    # etcd with the old rule (strict_reconfig) refuses any add while a voting member is unreachable: those go first
    # (removing an unreachable voter never lowers the healthy count, so quorum only gains).
    also = [h for h in others if not h.reachable and not h.member.is_learner] if strict_reconfig(health) else []

    # Quorum after each step that changes the voting set.
    voting, healthy = q.voting, q.healthy
    if not target.member.is_learner:
        voting -= 1
        healthy -= 1 if target.healthy else 0
    _check_quorum_after(f"remove {target.member.name or target.member.hex_id}", voting, healthy)
    voting -= len(also)
    if not req.learner:
        _check_quorum_after(f"add {new_name} as a voting member", voting + 1, healthy)

    label = member_labels((h.member.hex_id, h.member.name) for h in health.members)
    remove = f"Remove {label[target.member.hex_id]}"
    if also:
        names = ", ".join(label[h.member.hex_id] for h in also)
        remove += (f" and the also-unreachable {names}: etcd {health_version(health)} adds no member while a voting "
                   f"member is unreachable; each gets its replacement in its own plan afterwards")
    elif others_down := [h for h in others if not h.healthy and not h.member.is_learner]:
        remove += (f"; {', '.join(h.member.name or h.member.hex_id for h in others_down)} stays as it is: etcd "
                   f"{health_version(health)} adds a member while a quorum of voters answers; replace "
                   f"{'it' if len(others_down) == 1 else 'them'} next")
    survivors = [h for h in others if h not in also]
    return _plan(health, req, MemberRef.of(target.member), survivors, remove, new_peer, new_client, plan_id,
                 launcher, others_failed=tuple(MemberRef.of(h.member) for h in others if not h.healthy),
                 also_remove=tuple(MemberRef.of(h.member) for h in also))


def health_version(health: ClusterHealth) -> str:
    versions = sorted({h.status.version for h in health.members if h.status})
    return "/".join(versions) or "(unknown version)"


_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")


def _check_new_member(health: ClusterHealth, req: ReplaceRequest, new_peer: str, new_client: str | None) -> None:
    """A safe, unique name and URLs nothing else uses: a conflict found after the
    failed member is removed leaves the cluster one voter short."""
    problems = new_member_problems([h.member for h in health.members], req)
    if problems:
        raise next(iter(problems.values()))


NAME_HINT = "pick a name no member has: unique names avoid human error (runbook)"


def new_member_problems(members: Collection[Member], req: ReplaceRequest) -> dict[str, Refusal]:
    """What is wrong with the new member's name and URLs against `members`, by the field that holds it
    (new_name, new_peer_url, client_url), in that order: the proposal refuses the first, a form shows each
    beside its field."""
    found: dict[str, Refusal] = {}
    new_name = req.new_name.strip()
    if not _NAME.fullmatch(new_name):
        found["new_name"] = Refusal(f"<new-name> {req.new_name!r} cannot be an etcd member name: use 1 to 63 "
                                    "letters, digits, '-', '_' or '.'")
    for m in members:
        if "new_name" in found:
            break
        if m.name == new_name:
            found["new_name"] = Refusal(f"the name {new_name!r} is already used by member {m.hex_id}", NAME_HINT)
        elif m.name.lower() == new_name.lower():
            found["new_name"] = Refusal(f"the name {new_name!r} differs from member {m.name!r} ({m.hex_id}) only in "
                                        "case", NAME_HINT)
    own: list[tuple[str, str, str]] = []
    for key, kind, value, what in (("new_peer_url", "peer", req.new_peer_url, "<new-peer-url>"),
                                   ("client_url", "client", req.new_client_url, "--client-url")):
        if not value:
            continue
        try:
            url = parse_url(value).url
        except ValueError as e:
            found[key] = Refusal(f"{what}: {e}")
            continue
        if _unspecified(parse_url(url).host):
            found[key] = Refusal(f"the {kind} URL {url} is an unspecified address: other members and clients "
                                 "cannot reach it; advertise the new machine's own address")
            continue
        own.append((key, kind, url))
    if len(own) == 2 and _address(own[0][2]) == _address(own[1][2]):
        found["client_url"] = Refusal(f"the peer URL and the client URL are the same address ({own[0][2]}): etcd "
                                      "needs two ports")
    for key, kind, url in own:
        for m in members:
            taken = {_address(u): (k, u) for k, urls in (("peer", m.peer_urls), ("client", m.client_urls))
                     for u in urls}
            if key not in found and _address(url) in taken:
                theirs, their_url = taken[_address(url)]
                found[key] = Refusal(f"the {kind} URL {url} is already used by member {m.name or m.hex_id} "
                                     f"({m.hex_id}) as its {theirs} URL {their_url}")
    return found


def _plan_add_only(health: ClusterHealth, req: ReplaceRequest, removed: tuple[MemberRef, str], new_peer: str,
                   new_client: str | None, plan_id: str | None, launcher: str) -> ReplacePlan:
    """The failed member is gone already (an earlier plan removed it): only add."""
    ref, by = removed
    if ref.name == req.new_name.strip():
        raise Refusal(f"the name {ref.name!r} belonged to the removed member; pick a new name (runbook)")
    _check_new_member(health, req, new_peer, new_client)
    pending = [h for h in health.members if not h.member.started]
    if pending:
        raise Refusal(f"member {pending[0].member.hex_id} was added but never started",
                      "start it or remove it before adding another member")
    if req.learner and any(h.member.is_learner for h in health.members):
        raise Refusal("a learner is in the cluster already and etcd allows one learner at a time",
                      "promote or remove it first, or use --no-learner")
    if strict_reconfig(health) and any(not h.reachable and not h.member.is_learner for h in health.members):
        down = next(h for h in health.members if not h.reachable and not h.member.is_learner).member
        raise Refusal(f"{down.name or down.hex_id} is unreachable and etcd {health_version(health)} adds no member "
                      f"while a voting member is unreachable", f"replace {down.name or down.hex_id} first")
    if not req.learner:
        q = health.quorum
        _check_quorum_after(f"add {req.new_name} as a voting member", q.voting + 1, q.healthy)
    remove = f"Remove {ref.name or ref.id}: already removed by plan {by}"
    survivors = list(health.members)
    return replace(_plan(health, req, ref, survivors, remove, new_peer, new_client, plan_id, launcher),
                   already_removed_by=by)


def _plan(health: ClusterHealth, req: ReplaceRequest, failed: MemberRef, survivors: list[MemberHealth],
          remove_title: str, new_peer: str, new_client: str | None, plan_id: str | None, launcher: str,
          others_failed: tuple[MemberRef, ...] = (), also_remove: tuple[MemberRef, ...] = ()) -> ReplacePlan:
    new_name = req.new_name.strip()
    pick = health.snapshot_source()
    source = pick.member.name if pick else None
    mode = "as a learner (non-voting) member" if req.learner else "as a voting member (--no-learner)"
    start = {"manual": f"Start {new_name}: an operator runs etcd on the new machine with the environment below",
             "command": f"Start {new_name} with the configured launcher command",
             "ssh": f"Start {new_name} on its host with etcd-chatops-node over SSH (start --join)"}.get(
        launcher, f"Start {new_name}")
    steps = [
        Step("recheck", "Re-check that the membership is unchanged and quorum holds"),
        Step("snapshot", f"Take a verified snapshot of {source}"),
        Step("remove", remove_title),
        Step("add", f"Add {new_name} {mode} with peer URL {new_peer}"),
        Step("start", start),
        Step("promote", f"Wait until {new_name} has started and caught up, then promote it to a voting member"
             if req.learner else f"Wait until {new_name} has started and is reachable"),
        Step("followups", "Post the new kube-apiserver --etcd-servers value and the load-balancer reminder"),
        Step("verify", f"Verify {len(survivors) + 1} members, all healthy"),
    ]
    q = health.quorum
    return ReplacePlan(id=plan_id or new_plan_id(), cluster=health.cluster, failed=failed, new_name=new_name,
                new_peer_url=new_peer, new_client_url=new_client, learner=req.learner,
                survivors=tuple(MemberRef.of(h.member) for h in survivors), steps=tuple(steps),
                fingerprint=health.fingerprint, quorum_now=(q.voting, q.healthy), others_failed=others_failed,
                snapshot_source=source, also_remove=also_remove)


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _address(url: str) -> str:
    """Host and port: two URLs that differ only in scheme still bind the same port (an unusable URL stands
    for itself)."""
    found = read_url(url)
    return found.address if isinstance(found, Endpoint) else url


def etcd_servers(members: list[Member] | tuple[Member, ...]) -> str:
    """kube-apiserver's --etcd-servers value: every client URL, comma-separated."""
    urls: list[str] = []
    for m in sorted(members, key=lambda m: m.name):
        for u in m.client_urls:
            if u not in urls:
                urls.append(u)
    return ",".join(urls)


def facts_changed(plan: ReplacePlan, health: ClusterHealth, started: Collection[str],
                  new_member_id: str | None) -> str | None:
    """What no longer matches the plan, judged against its own progress
    (`started`: keys of the steps already begun, whose effects are expected);
    None when the cluster is as the plan expects it."""
    live = {h.member.hex_id: h for h in health.members}
    removing = plan.also_remove if plan.already_removed_by else (plan.failed, *plan.also_remove)
    known = {m.id for m in plan.survivors} | {m.id for m in removing}
    for s in plan.survivors:
        if s.id not in live:
            return f"{s.name or s.id} ({s.id}) is no longer a member of {plan.cluster}"
    for hex_id, h in live.items():
        ours = plan.new_peer_url in h.member.peer_urls or hex_id == new_member_id
        if hex_id in known or (ours and "add" in started):
            continue
        what = "a learner" if h.member.is_learner else "a member"
        return f"{what} {h.member.name or '(unstarted)'} ({hex_id}) was added to {plan.cluster} since the plan was made"
    for r in removing:
        now = live.get(r.id)
        if now is None:
            if "remove" not in started:
                return f"{r.name or r.id} ({r.id}) is no longer a member: removed by hand or by another plan"
        elif r is plan.failed and now.healthy:
            return f"{r.name or r.id} answers and is healthy again"
        elif r is not plan.failed and now.reachable:
            return f"{r.name or r.id} ({r.id}), which this plan removes too, answers again"
    return None


def quorum_after(health: ClusterHealth, voting: int = 0, healthy: int = 0) -> Quorum:
    """The quorum once a step has changed the voting set by `voting` members, `healthy` of them healthy."""
    q = health.quorum
    return Quorum(q.voting + voting, q.healthy + healthy)
def config_endpoints(members: list[Member] | tuple[Member, ...]) -> str:
    """The bot's own `endpoints` setting for the cluster now: its voters' client URLs
    (after a replacement the configured ones go stale)."""
    voters = [m for m in members if not m.is_learner]
    return "endpoints = " + json.dumps([u for u in etcd_servers(voters).split(",") if u])


async def propose(ctx: BotContext, cluster: ClusterConfig, req: ReplaceRequest, user: str, channel: str,
                  usage: str) -> Outcome:
    store = ctx.store
    open_plan = await store.open_plan(cluster.name)
    if open_plan:
        return open_plan_refusal(open_plan.id, open_plan.state)
    try:
        health = await ctx.check(cluster)
    except EtcdError as e:
        return refused(f"cannot read cluster {cluster.name}: {e}")
    newest = await store.snapshots(cluster.name, limit=1)
    removed = None if health.find(req.failed) else await removed_by_earlier_plan(ctx, cluster.name, req.failed)
    try:
        plan = plan_replacement(health, req, newest_snapshot=newest[0].path if newest else None,
                                launcher=cluster.launcher.kind, removed=removed)
    except Refusal as r:
        await store.audit("replace_refused", user=user, channel=channel, cluster=cluster.name,
                          detail={"reason": r.reason, "request": req.__dict__})
        return refused(f"cannot replace {req.failed} in {cluster.name}: {r.reason}", r.hint, usage)
    return await publish_plan(ctx, PlanKind.REPLACE, plan, cluster.name, user, channel,
                              {"plan": plan.id, "failed": plan.failed.id, "new_name": plan.new_name,
                               "new_peer_url": plan.new_peer_url, "learner": plan.learner})


async def removed_by_earlier_plan(ctx: BotContext, cluster: str, ref: str) -> tuple[MemberRef, str] | None:
    """A failed member an earlier plan removed (etcd < 3.6 requires removing every
    unreachable voter before an add) and nobody has replaced yet."""
    wanted = ref.strip().lower()
    records = await ctx.store.plans(cluster, limit=50, states=(PlanState.DONE,))
    plans = [r.plan for r in records if isinstance(r.plan, ReplacePlan)]
    replaced = {p.failed.id for p in plans}
    for plan in plans:
        for m in plan.also_remove:
            if m.id not in replaced and wanted in (m.name.lower(), m.id):
                return m, plan.id
    return None
