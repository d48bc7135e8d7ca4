"""The replacement planner: ClusterHealth + request -> Plan, or a Refusal.

Pure: no Slack, no gRPC, no clock. Every refusal says why in one line and,
where there is one, what to do instead. The quorum is checked for the state
after every step of the plan, not only for the state now.
"""
from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any

from bot.etcd import Member
from bot.health import ClusterHealth, Quorum
from bot.urls import parse_url


class Refusal(Exception):
    """The plan cannot be made: `reason` (one line) and an optional `hint`."""

    def __init__(self, reason: str, hint: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


@dataclass(frozen=True)
class ReplaceRequest:
    failed: str                      # name or hex ID
    new_name: str
    new_peer_url: str
    new_client_url: str | None = None
    learner: bool = True


@dataclass(frozen=True)
class Step:
    key: str
    title: str


@dataclass(frozen=True)
class MemberRef:
    """A member as the plan recorded it (plain data, stored as JSON)."""

    id: str                          # 16 hex digits
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool = False

    @classmethod
    def of(cls, m: Member) -> "MemberRef":
        return cls(m.hex_id, m.name, tuple(m.peer_urls), tuple(m.client_urls), m.is_learner)

    @property
    def label(self) -> str:
        return f"{self.name or '(unstarted)'} ({self.id})"


@dataclass(frozen=True)
class Plan:
    id: str
    cluster: str
    failed: MemberRef
    new_name: str
    new_peer_url: str
    new_client_url: str | None
    learner: bool
    survivors: tuple[MemberRef, ...]
    steps: tuple[Step, ...]
    fingerprint: str
    quorum_now: tuple[int, int]              # (voting, healthy)
    others_failed: tuple[MemberRef, ...] = ()
    snapshot_source: str | None = None       # name of the healthy member to snapshot

    @property
    def initial_cluster(self) -> str:
        """ETCD_INITIAL_CLUSTER: the surviving members plus the new one."""
        pairs = [f"{m.name}={u}" for m in self.survivors for u in m.peer_urls]
        return ",".join(pairs + [f"{self.new_name}={self.new_peer_url}"])

    @property
    def environment(self) -> dict[str, str]:
        """The runbook's environment for starting the new member."""
        return {"ETCD_NAME": self.new_name, "ETCD_INITIAL_CLUSTER": self.initial_cluster,
                "ETCD_INITIAL_CLUSTER_STATE": "existing"}

    @property
    def expected_members(self) -> int:
        return len(self.survivors) + 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        ref = lambda d: MemberRef(d["id"], d["name"], tuple(d["peer_urls"]), tuple(d["client_urls"]), d["is_learner"])  # noqa: E731
        return cls(id=data["id"], cluster=data["cluster"], failed=ref(data["failed"]), new_name=data["new_name"],
                   new_peer_url=data["new_peer_url"], new_client_url=data["new_client_url"], learner=data["learner"],
                   survivors=tuple(ref(m) for m in data["survivors"]),
                   steps=tuple(Step(s["key"], s["title"]) for s in data["steps"]), fingerprint=data["fingerprint"],
                   quorum_now=tuple(data["quorum_now"]), others_failed=tuple(ref(m) for m in data["others_failed"]),
                   snapshot_source=data.get("snapshot_source"))


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


def plan_replacement(health: ClusterHealth, req: ReplaceRequest, *, newest_snapshot: str | None = None,
                     plan_id: str | None = None, launcher: str = "manual") -> Plan:
    """Build the runbook's replacement plan, or raise Refusal."""
    new_peer = _url(req.new_peer_url, "<new-peer-url>")
    new_client = _url(req.new_client_url, "--client-url") if req.new_client_url else None

    q = health.quorum
    if not q.ok:
        where = (f"restore the cluster from the newest recorded snapshot, {newest_snapshot}" if newest_snapshot
                 else "restore the cluster from your newest snapshot (none is recorded by this bot)")
        raise Refusal(f"quorum is lost: {q.healthy} of {q.voting} voting members are healthy and {q.needed} are needed; "
                      f"no member replacement can fix that", f"{where} (etcdutl snapshot restore on every member)")

    target = health.find(req.failed)
    if target is None:
        names = ", ".join(m.member.name or m.member.hex_id for m in health.members)
        raise Refusal(f"no member {req.failed!r} in cluster {health.cluster} (members: {names})")
    if target.healthy:
        raise Refusal(f"{target.member.name or target.member.hex_id} still answers and reports healthy: "
                      f"a healthy member is not a failed member", "check /etcd status; replace only a member that is down")

    new_name = req.new_name.strip()
    if not new_name or any(c.isspace() or c in "=," for c in new_name):
        raise Refusal(f"<new-name> {req.new_name!r} cannot be an etcd member name (no spaces, '=' or ',')")
    for h in health.members:
        m = h.member
        if m.name == new_name:
            raise Refusal(f"the name {new_name!r} is already used by member {m.hex_id}",
                          "pick a name no member has: unique names avoid human error (runbook)")
        if new_peer in {_normal(u) for u in m.peer_urls}:
            raise Refusal(f"the peer URL {new_peer} is already used by member {m.name or m.hex_id} ({m.hex_id})")
        if new_client and new_client in {_normal(u) for u in m.client_urls}:
            raise Refusal(f"the client URL {new_client} is already used by member {m.name or m.hex_id} ({m.hex_id})")

    others = [h for h in health.members if h is not target]
    pending = [h for h in others if not h.member.started]
    if pending:
        p = pending[0].member
        raise Refusal(f"member {p.hex_id} ({', '.join(p.peer_urls)}) was added but never started",
                      "start it or remove it before replacing another member")
    learners = [h for h in others if h.member.is_learner]
    if req.learner and learners:
        raise Refusal(f"{learners[0].member.name} is a learner already and etcd allows one learner at a time",
                      "promote or remove it first, or use --no-learner")

    # Quorum after each step that changes the voting set.
    voting, healthy = q.voting, q.healthy
    if not target.member.is_learner:
        voting -= 1
        healthy -= 1 if target.healthy else 0
    _check_quorum_after(f"remove {target.member.name or target.member.hex_id}", voting, healthy)
    if not req.learner:
        _check_quorum_after(f"add {new_name} as a voting member", voting + 1, healthy)

    pick = health.snapshot_source()
    source = pick.member.name if pick else None
    failed_name = target.member.name or target.member.hex_id
    mode = "as a learner (non-voting) member" if req.learner else "as a voting member (--no-learner)"
    start = {"manual": f"Start {new_name}: an operator runs etcd on the new machine with the environment below",
             "command": f"Start {new_name} with the configured launcher command"}.get(launcher, f"Start {new_name}")
    steps = [
        Step("recheck", "Re-check that the membership is unchanged and quorum holds"),
        Step("snapshot", f"Take a verified snapshot of {source}"),
        Step("remove", f"Remove {failed_name} ({target.member.hex_id})"),
        Step("add", f"Add {new_name} {mode} with peer URL {new_peer}"),
        Step("start", start),
        Step("promote", f"Wait until {new_name} has started and caught up, then promote it to a voting member"
             if req.learner else f"Wait until {new_name} has started and is reachable"),
        Step("followups", "Post the new kube-apiserver --etcd-servers value and the load-balancer reminder"),
        Step("verify", f"Verify {len(others) + 1} members, all healthy"),
    ]
    return Plan(id=plan_id or new_plan_id(), cluster=health.cluster, failed=MemberRef.of(target.member),
                new_name=new_name, new_peer_url=new_peer, new_client_url=new_client, learner=req.learner,
                survivors=tuple(MemberRef.of(h.member) for h in others), steps=tuple(steps),
                fingerprint=health.fingerprint, quorum_now=(q.voting, q.healthy),
                others_failed=tuple(MemberRef.of(h.member) for h in others if not h.healthy),
                snapshot_source=source)


def _normal(url: str) -> str:
    try:
        return parse_url(url).url
    except ValueError:
        return url


def etcd_servers(members: list[Member] | tuple[Member, ...]) -> str:
    """kube-apiserver's --etcd-servers value: every client URL, comma-separated."""
    urls: list[str] = []
    for m in sorted(members, key=lambda m: m.name):
        for u in m.client_urls:
            if u not in urls:
                urls.append(u)
    return ",".join(urls)
