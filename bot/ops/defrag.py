"""The defragmentation planner: ClusterHealth + quotas + rule -> DefragPlan, or a Refusal.

Pure: no Slack, no gRPC, no clock. The order is etcd-defrag's, made safer:
the followers one at a time, then leadership moved to a member already
defragmented, then the former leader (defragmenting a leader in place stalls
every write and costs lease holders their leases), the learners after the
voters. Members the rule does not select are left alone. A cluster with one
voter (kubeadm's default is one member) has no leadership to move: its leader
is defragmented in place, and the plan says that writes wait meanwhile.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from bot.etcd.health import ClusterHealth, MemberHealth
from bot.etcd.metrics import DEFAULT_QUOTA, MemberMetrics
from bot.ops.defrag_rule import Rule, figures
from bot.ops.replace import MemberRef, Refusal, Step, new_plan_id

DISARM_BELOW = 0.9  # NOSPACE is disarmed only when every member's DB is below this share of its quota


@dataclass(frozen=True)
class DefragMember:
    """One member as planned: its sizes, whether the rule selects it, and its place in the order."""

    ref: MemberRef
    db_size: int
    db_size_in_use: int
    quota: int
    quota_known: bool          # read from its /metrics (else etcd's default is assumed)
    selected: bool
    order: int | None          # 1-based position among the defragmentations, None when left alone
    role: str                  # leader, follower, learner
    after: int | None = None   # DB size once defragmented: the plan message's progress

    @property
    def free(self) -> int:
        return max(self.db_size - self.db_size_in_use, 0)

    @property
    def usage(self) -> float:
        return self.db_size / self.quota if self.quota else 0.0


@dataclass(frozen=True)
class DefragPlan:
    id: str
    cluster: str
    rule: str
    compact: bool
    disarm_below: float
    leader: str                # the leader's hex ID when planned
    members: tuple[DefragMember, ...]
    steps: tuple[Step, ...]
    fingerprint: str
    nospace: bool              # the alarm was active when planned

    def member(self, hex_id: str) -> DefragMember:
        return next(m for m in self.members if m.ref.id == hex_id)

    def defragmented(self, hex_id: str, size: int) -> DefragPlan:
        """The plan with one member's size after its defragmentation recorded."""
        return replace(self, members=tuple(replace(m, after=size) if m.ref.id == hex_id else m for m in self.members))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DefragPlan:
        def member(d: dict[str, Any]) -> DefragMember:
            r = d["ref"]
            ref = MemberRef(r["id"], r["name"], tuple(r["peer_urls"]), tuple(r["client_urls"]), r["is_learner"])
            return DefragMember(ref, d["db_size"], d["db_size_in_use"], d["quota"], d["quota_known"], d["selected"],
                                d["order"], d["role"], d.get("after"))
        return cls(id=data["id"], cluster=data["cluster"], rule=data["rule"], compact=data["compact"],
                   disarm_below=data["disarm_below"], leader=data["leader"],
                   members=tuple(member(m) for m in data["members"]),
                   steps=tuple(Step(s["key"], s["title"]) for s in data["steps"]), fingerprint=data["fingerprint"],
                   nospace=data["nospace"])


def _quota(metrics: Mapping[int, MemberMetrics | str], member_id: int) -> tuple[int, bool]:
    found = metrics.get(member_id)
    if isinstance(found, MemberMetrics) and found.quota_bytes:
        return found.quota_bytes, True
    return DEFAULT_QUOTA, False


def sole_voter(health: ClusterHealth) -> bool:
    """One voting member: leadership cannot move (a learner cannot lead), so the leader is defragmented in place."""
    return sum(1 for h in health.members if not h.member.is_learner) == 1


def plan_defrag(health: ClusterHealth, metrics: Mapping[int, MemberMetrics | str], rule: Rule, *,
                compact: bool = True, disarm_below: float = DISARM_BELOW) -> DefragPlan:
    """The plan, or a Refusal when the cluster is not healthy enough to defragment
    one member at a time (NOSPACE itself is what the plan is for, so it does not count)."""
    if not health.quorum.ok:
        raise Refusal(f"quorum is lost ({health.quorum.healthy} of {health.quorum.voting} voting members healthy)",
                      "restore quorum first; see /etcd status")
    if health.leader_id is None:
        raise Refusal("the cluster has no leader", "wait for an election; see /etcd status")
    sick = [h for h in health.members if not h.healthy]
    if sick:
        names = ", ".join(f"{h.member.name or h.member.hex_id} ({h.problem})" for h in sick)
        raise Refusal(f"not every member is healthy: {names}; a defragmentation blocks one member at a time and "
                      "needs the others", "replace or restart it first; see /etcd status")
    others = sorted({a.kind for a in health.alarms} - {"NOSPACE"})
    if others:
        raise Refusal(f"alarm {', '.join(others)} is active; defragmenting does not fix it",
                      "see /etcd alarms and /etcd consistency")
    leader = health.leader_id

    def role(h: MemberHealth) -> str:
        return "learner" if h.member.is_learner else ("leader" if h.member.id == leader else "follower")

    def picked(h: MemberHealth) -> bool:
        assert h.status is not None  # every member is healthy
        return rule.matches(figures(h.status.db_size, h.status.db_size_in_use, _quota(metrics, h.member.id)[0]))

    ranked = {"follower": 0, "leader": 1, "learner": 2}  # followers, the leader, then the learners
    order = sorted((h for h in health.members if picked(h)), key=lambda h: (ranked[role(h)], h.member.name))
    position = {h.member.id: i + 1 for i, h in enumerate(order)}
    members = []
    for h in health.members:
        assert h.status is not None
        quota, known = _quota(metrics, h.member.id)
        members.append(DefragMember(MemberRef.of(h.member), h.status.db_size, h.status.db_size_in_use, quota, known,
                                    h.member.id in position, position.get(h.member.id), role(h)))
    if not order:
        raise Refusal(f"no member passes the rule `{rule.text}`: nothing to defragment",
                      "give another rule with --rule, e.g. `dbSizeFree > 10MiB`")
    steps = [Step("recheck", "Re-check: every member healthy (NOSPACE aside), membership and leader as planned"),
             Step("snapshot", "Take a verified snapshot")]
    if compact:
        steps.append(Step("compact", "Compact the key space to the current revision"))
    alone = sole_voter(health)
    for h in order:
        name = h.member.name or h.member.hex_id
        if role(h) == "leader" and alone:
            steps.append(Step(f"defrag-{h.member.hex_id}", f"Defragment {name} (leader, the only voter: no leadership "
                                                             "to move; writes wait until it is done)"))
            continue
        if role(h) == "leader":
            steps.append(Step("move-leader", f"Move leadership from {name} to a member already defragmented"))
        steps.append(Step(f"defrag-{h.member.hex_id}", f"Defragment {name} ({role(h)}) and wait until it is caught up"))
    steps += [Step("disarm", f"Disarm NOSPACE if every member is below {disarm_below * 100:g} % of its quota"),
              Step("verify", "Verify a test write succeeds; report the sizes before and after")]
    return DefragPlan(id=new_plan_id(), cluster=health.cluster, rule=rule.text, compact=compact,
                      disarm_below=disarm_below, leader=f"{leader:016x}", members=tuple(members), steps=tuple(steps),
                      fingerprint=health.fingerprint, nospace=any(a.kind == "NOSPACE" for a in health.alarms))
