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
from typing import TYPE_CHECKING

from bot.config import ClusterConfig
from bot.domain.cluster import DEFAULT_QUOTA, ClusterHealth, MemberHealth, MemberMetrics, backend_quota
from bot.domain.defrag import DISARM_BELOW, DefragMember, DefragPlan
from bot.domain.errors import EtcdError, Refusal
from bot.domain.plan import PlanKind, Step
from bot.domain.replace import MemberRef
from bot.etcd.member_metrics import cluster_metrics
from bot.ops.defrag.rule import DEFAULT_RULE, Rule, RuleError, figures, parse_rule
from bot.ops.outcome import Outcome, open_plan_refusal, refused
from bot.ops.proposals import publish_plan
from bot.ops.replace.plan import new_plan_id

if TYPE_CHECKING:  # the context is gRPC's; the planning above it is not
    from bot.ops.context import BotContext


def _quota(metrics: Mapping[int, MemberMetrics | str], h: MemberHealth) -> tuple[int, bool]:
    """The member's quota (Status on etcd 3.6, /metrics before), and whether it was read rather than assumed."""
    quota, assumed = backend_quota(h.status, metrics.get(h.member.id, "not read"))
    return quota or DEFAULT_QUOTA, assumed is None


def _clients(found: MemberMetrics | str | None) -> str:
    """What the member's clients see while it defragments, when its /metrics says (etcd 3.6's feature gate)."""
    if not isinstance(found, MemberMetrics) or found.stops_serving_on_defrag is None:
        return ""
    if found.stops_serving_on_defrag:
        return "; it answers gRPC health checks NOT_SERVING meanwhile (StopGRPCServiceOnDefrag), so clients move away"
    return ("; StopGRPCServiceOnDefrag is off: clients pinned to it wait (turn the feature gate on to let them "
            "move to the other members)")


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
        return rule.matches(figures(h.status.db_size, h.status.db_size_in_use, _quota(metrics, h)[0]))

    ranked = {"follower": 0, "leader": 1, "learner": 2}  # followers, the leader, then the learners
    order = sorted((h for h in health.members if picked(h)), key=lambda h: (ranked[role(h)], h.member.name))
    position = {h.member.id: i + 1 for i, h in enumerate(order)}
    members = []
    for h in health.members:
        assert h.status is not None
        quota, known = _quota(metrics, h)
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
        steps.append(Step(f"defrag-{h.member.hex_id}", f"Defragment {name} ({role(h)}) and wait until it is caught up"
                                                         + _clients(metrics.get(h.member.id))))
    steps += [Step("disarm", f"Disarm NOSPACE if every member is below {disarm_below * 100:g} % of its quota"),
              Step("verify", "Verify a test write succeeds; report the sizes before and after")]
    return DefragPlan(id=new_plan_id(), cluster=health.cluster, rule=rule.text, compact=compact,
                      disarm_below=disarm_below, leader=f"{leader:016x}", members=tuple(members), steps=tuple(steps),
                      fingerprint=health.fingerprint, nospace=any(a.kind == "NOSPACE" for a in health.alarms))


async def propose(ctx: BotContext, cluster: ClusterConfig, rule_text: str | None, compact: bool, user: str,
                  channel: str, usage: str) -> Outcome:
    """`/etcd defrag`: the plan table from the live cluster and its quotas, posted for one approval."""
    try:
        rule = parse_rule(DEFAULT_RULE if rule_text is None else rule_text)   # `--rule ""` is no rule: refused
    except RuleError as e:
        return refused(str(e), f"the default rule is `{DEFAULT_RULE}`", usage)
    open_plan = await ctx.store.open_plan(cluster.name)
    if open_plan:
        return open_plan_refusal(open_plan.id, open_plan.state)
    try:
        health = await ctx.check(cluster)
        metrics = await cluster_metrics(ctx.client(cluster), health)
    except EtcdError as e:
        return refused(f"cannot read cluster {cluster.name}: {e}")
    try:
        plan = plan_defrag(health, metrics, rule, compact=compact, disarm_below=cluster.defrag_disarm_below)
    except Refusal as r:
        await ctx.store.audit("defrag_refused", user=user, channel=channel, cluster=cluster.name,
                              detail={"reason": r.reason, "rule": rule.text})
        return refused(f"cannot defragment {cluster.name}: {r.reason}", r.hint, usage)
    return await publish_plan(ctx, PlanKind.DEFRAG, plan, cluster.name, user, channel,
                              {"plan": plan.id, "rule": rule.text, "compact": compact,
                               "members": [m.ref.id for m in plan.members if m.selected]})
