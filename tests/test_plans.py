"""The replacement planner: pure, no servers."""
from __future__ import annotations

from dataclasses import replace

import pytest

from bot.domain.cluster import ClusterHealth, Member, MemberHealth
from bot.domain.errors import Refusal
from bot.domain.plan import PlanState
from bot.domain.replace import ReplacePlan, ReplaceRequest
from bot.ops.replace.plan import config_endpoints, etcd_servers, facts_changed, plan_replacement
from bot.output.blocks import PlanView, replace_plan_reply
from helpers import cluster_health, member_status

IDS = {1: 0x8211F1D0F64F3269, 2: 0x91BC3C398FB3C146, 3: 0xFD422379FDA50E48, 4: 0x2BE1EB8F84B7F63E,
       5: 0x5A5A5A5A5A5A5A5A, 6: 0x6B6B6B6B6B6B6B6B}


def member(i: int, *, learner: bool = False, started: bool = True) -> Member:
    return Member(id=IDS[i], name=f"member{i}" if started else "", peer_urls=(f"http://10.0.0.{i}:2380",),
                  client_urls=(f"http://10.0.0.{i}:2379",) if started else (), is_learner=learner)


def up(i: int, leader: int = 2, version: str = "3.5.1", **kw) -> MemberHealth:
    m = member(i, **kw)
    return MemberHealth(m, member_status(endpoint=f"http://10.0.0.{i}:2379", member_id=m.id, version=version,
                                         db_size=1, db_size_in_use=1, leader=IDS[leader], raft_index=9,
                                         raft_applied_index=9, is_learner=m.is_learner))


def down(i: int, **kw) -> MemberHealth:
    return MemberHealth(member(i, **kw), None, "connection refused (member down?)")


def cluster(*members: MemberHealth) -> ClusterHealth:
    return cluster_health(*members)


REQ = ReplaceRequest("member1", "member4", "http://10.0.0.4:2380")


def test_the_runbook_plan():
    plan = plan_replacement(cluster(down(1), up(2), up(3)), REQ)
    assert plan.failed.id == "8211f1d0f64f3269" and plan.failed.name == "member1"
    assert plan.environment == {
        "ETCD_NAME": "member4",
        "ETCD_INITIAL_CLUSTER": "member2=http://10.0.0.2:2380,member3=http://10.0.0.3:2380,member4=http://10.0.0.4:2380",
        "ETCD_INITIAL_CLUSTER_STATE": "existing",
        "ETCD_INITIAL_ADVERTISE_PEER_URLS": "http://10.0.0.4:2380",
        "ETCD_LISTEN_PEER_URLS": "http://10.0.0.4:2380",
    }
    assert [s.key for s in plan.steps] == ["recheck", "snapshot", "remove", "add", "start", "promote", "followups",
                                          "verify"]
    assert "learner" in plan.steps[3].title
    assert plan.snapshot_source == "member3"  # a follower, sparing the leader (member2)
    assert plan.expected_members == 3
    assert plan.others_failed == ()
    assert len(plan.id) == 6


def test_by_hex_id_and_round_trip_through_json():
    plan = plan_replacement(cluster(down(1), up(2), up(3)), ReplaceRequest("8211f1d0f64f3269", "member4", "http://10.0.0.4:2380"))
    assert ReplacePlan.from_json(plan.to_json()) == plan


def test_no_learner_mode():
    plan = plan_replacement(cluster(down(1), up(2), up(3)),
                            ReplaceRequest("member1", "member4", "http://10.0.0.4:2380", learner=False))
    assert not plan.learner and "voting member" in plan.steps[3].title


@pytest.mark.parametrize("req, health, reason", [
    (ReplaceRequest("member9", "member4", "http://10.0.0.4:2380"), cluster(down(1), up(2), up(3)),
     "no member 'member9'"),
    (REQ, cluster(up(1), up(2), up(3)), "a healthy member is not a failed member"),
    (ReplaceRequest("member1", "member2", "http://10.0.0.4:2380"), cluster(down(1), up(2), up(3)),
     "the name 'member2' is already used"),
    (ReplaceRequest("member1", "member1", "http://10.0.0.4:2380"), cluster(down(1), up(2), up(3)),
     "the name 'member1' is already used"),
    (ReplaceRequest("member1", "member4", "http://10.0.0.3:2380"), cluster(down(1), up(2), up(3)),
     "peer URL http://10.0.0.3:2380 is already used"),
    (ReplaceRequest("member1", "member4", "10.0.0.4:2380"), cluster(down(1), up(2), up(3)),
     "not an http(s)://host:port URL"),
    (ReplaceRequest("member1", "member4", "http://10.0.0.4:2380", new_client_url="http://10.0.0.2:2379"),
     cluster(down(1), up(2), up(3)), "client URL http://10.0.0.2:2379 is already used"),
    (ReplaceRequest("member1", "new member", "http://10.0.0.4:2380"), cluster(down(1), up(2), up(3)),
     "cannot be an etcd member name"),
    (REQ, cluster(down(1), up(2), up(3), up(5, learner=True)), "etcd allows one learner at a time"),
    (ReplaceRequest("member1", "member6", "http://10.0.0.6:2380"),
     cluster(down(1), up(2), up(3), up(4), MemberHealth(member(5, started=False), None, "unstarted")),
     "was added but never started"),
])
def test_refusals_say_why(req, health, reason):
    with pytest.raises(Refusal) as e:
        plan_replacement(health, req)
    assert reason in e.value.reason


def test_quorum_lost_points_to_the_newest_snapshot():
    with pytest.raises(Refusal) as e:
        plan_replacement(cluster(down(1), down(2), up(3)), REQ,
                         newest_snapshot="/snaps/prod/prod-20261125T010203Z-rev42.db")
    assert "quorum is lost: 1 of 3 voting members are healthy and 2 are needed" in e.value.reason
    assert "prod-20261125T010203Z-rev42.db" in (e.value.hint or "")
    with pytest.raises(Refusal) as e:
        plan_replacement(cluster(down(1), down(2), up(3)), REQ)
    assert "none is recorded" in (e.value.hint or "")


def test_a_step_that_would_break_quorum_is_refused():
    """etcd 3.6.11+: a failed learner replaced by a voting member: 3 voters, 2 healthy now (quorum
    holds), but adding a voter before it starts makes 2 healthy of 4, below 3."""
    health = cluster(down(1, learner=True), up(2, version="3.6.17"), up(3, version="3.6.17"), down(4))
    assert plan_replacement(health, ReplaceRequest("member1", "member6", "http://10.0.0.6:2380")).learner
    with pytest.raises(Refusal, match="after the step .add member6 as a voting member. the cluster would have 2 "
                                      "healthy of 4 voting members, below its quorum of 3"):
        plan_replacement(health, ReplaceRequest("member1", "member6", "http://10.0.0.6:2380", learner=False))


def test_a_member_answering_with_errors_is_another_failed_member():
    sick = MemberHealth(member(3), member_status(endpoint="x", member_id=IDS[3], db_size=1, db_size_in_use=1,
                                                 leader=IDS[2], raft_index=9, raft_applied_index=9,
                                                 errors=("etcdserver: corrupt",)))
    plan = plan_replacement(cluster(down(1), up(2), sick, up(4), up(5)),
                            ReplaceRequest("member1", "member6", "http://10.0.0.6:2380"))
    assert [m.name for m in plan.others_failed] == ["member3"]


def test_two_failed_of_five_on_etcd_35_removes_both_before_adding():
    """etcd 3.5 adds no member while a voting member is unreachable (strict reconfiguration):
    the first plan removes the other unreachable voter too; the next plan only adds."""
    health = cluster(down(1), down(2), up(3), up(4), up(5))
    plan = plan_replacement(health, ReplaceRequest("member1", "member6", "http://10.0.0.6:2380"))
    assert [m.name for m in plan.others_failed] == ["member2"]
    assert [m.name for m in plan.also_remove] == ["member2"]
    assert "member2=" not in plan.initial_cluster and plan.expected_members == 4
    assert "the also-unreachable member2" in plan.steps[2].title and "etcd 3.5.1 adds no member" in plan.steps[2].title
    # after plan 1: member2 is gone; its replacement only adds
    after = cluster(up(3), up(4), up(5), up(6))
    nxt = plan_replacement(after, ReplaceRequest("member2", "member7", "http://10.0.0.7:2380"),
                           removed=(plan.also_remove[0], plan.id))
    assert nxt.already_removed_by == plan.id and nxt.failed.name == "member2"
    assert f"already removed by plan {plan.id}" in nxt.steps[2].title
    assert nxt.expected_members == 5 and "member6=" in nxt.initial_cluster


@pytest.mark.parametrize("version,strict", [("3.5.27", True), ("3.5.31", False), ("3.5.36", False),
                                            ("3.6.1", True), ("3.6.10", True), ("3.6.11", False), ("3.6.17", False)])
def test_which_releases_add_a_member_while_another_voter_is_down(version, strict):
    """etcd asked every voter to be connected for an add, learner or not, until 3.6.11 and 3.5.31 (the releases
    checked; 3.5.28 to 3.5.30 are not to be had): they ask for a quorum counted with the new member, so a 5-member
    cluster with 2 down adds once the named one is removed, and the other stays for its own replacement."""
    health = cluster(down(1), down(2), up(3, version=version), up(4, version=version), up(5, version=version))
    plan = plan_replacement(health, ReplaceRequest("member1", "member6", "http://10.0.0.6:2380"))
    assert [m.name for m in plan.others_failed] == ["member2"]
    if strict:
        assert [m.name for m in plan.also_remove] == ["member2"] and "member2=" not in plan.initial_cluster
    else:
        assert plan.also_remove == () and "member2=" in plan.initial_cluster and plan.expected_members == 5
        assert f"member2 stays as it is: etcd {version} adds a member while a quorum" in plan.steps[2].title


def test_an_add_only_plan_refuses_while_another_voter_is_down_on_35():
    removed = (member_ref := plan_replacement(cluster(down(1), up(2), up(3)), REQ).failed, "abc123")
    assert member_ref.name == "member1"
    with pytest.raises(Refusal, match="member2 is unreachable and etcd 3.5.1 adds no member"):
        plan_replacement(cluster(down(2), up(3), up(4), up(5)), ReplaceRequest("member1", "member6", "http://10.0.0.6:2380"),
                         removed=removed)


def test_etcd_servers_lists_every_client_url():
    members = [member(3), member(2), member(4)]
    assert etcd_servers(members) == "http://10.0.0.2:2379,http://10.0.0.3:2379,http://10.0.0.4:2379"


def test_facts_changed_is_judged_against_the_plans_progress():
    """The re-check before each step: what the plan did itself is expected, nothing else."""
    plan = plan_replacement(cluster(down(1), up(2), up(3)), REQ)
    assert facts_changed(plan, cluster(down(1), up(2), up(3)), set(), None) is None
    assert facts_changed(plan, cluster(up(1), up(2), up(3)), set(), None) == "member1 answers and is healthy again"
    changed: str | None = facts_changed(plan, cluster(up(2), up(3)), {"recheck"}, None)
    assert "member1 (8211f1d0f64f3269) is no longer a member" in (changed or "")
    assert facts_changed(plan, cluster(up(2), up(3)), {"recheck", "snapshot", "remove"}, None) is None
    ours = MemberHealth(Member(IDS[4], "", ("http://10.0.0.4:2380",), (), True), None, "not started")
    assert facts_changed(plan, cluster(up(2), up(3), ours), {"remove", "add"}, None) is None
    learner = facts_changed(plan, cluster(up(2), up(3), ours), {"remove"}, None) or ""
    assert "a learner (unstarted) (2be1eb8f84b7f63e) was added" in learner
    assert "member3 (fd422379fda50e48) is no longer a member" in (facts_changed(plan, cluster(up(2)), {"remove"}, None)
                                                                  or "")
    five = plan_replacement(cluster(down(1), down(2), up(3), up(4), up(5)), ReplaceRequest("member1", "member6",
                                                                                         "http://10.0.0.6:2380"))
    back = cluster(down(1), up(2), up(3), up(4), up(5))
    changed = facts_changed(five, back, set(), None)
    assert changed == "member2 (91bc3c398fb3c146), which this plan removes too, answers again"


def test_a_long_value_never_pushes_a_step_or_the_environment_out_of_the_plan_message():
    """A long value: every section stays within Slack's limit and nothing is cut."""
    plan = replace(plan_replacement(cluster(down(1), up(2), up(3)), REQ), new_name="n" * 1400)
    plan = replace(plan, steps=tuple(replace(s, title=s.title.replace("member4", plan.new_name)) for s in plan.steps))
    view = PlanView(state=PlanState.PROPOSED, proposer="U0ONCALL01", approvers="x", expires_at=0, reaction="ok",
                    reject_reaction="x")
    reply = replace_plan_reply(plan, view)
    assert reply.details is not None   # the environment: in the plan's thread
    texts = [b["text"]["text"] for b in reply.blocks + reply.details.blocks if b["type"] == "section"]
    assert all(len(t) <= 3000 for t in texts)
    joined = "\n".join(texts)
    for i, step in enumerate(plan.steps):
        assert f"{i}. {step.title}" in joined
    assert all(f"{k}={v}" in joined for k, v in plan.environment.items())  # plain words: no quotes needed
    assert "…" not in joined
# Each of these, approved, would remove member1 and then fail to start the new member
# ("bind: address already in use", or unreachable): they are refused at proposal.
THREE = cluster(down(1), up(2), up(3))


@pytest.mark.parametrize("peer, client, reason", [
    ("http://10.0.0.4:2380", "http://10.0.0.4:2380", "the peer URL and the client URL are the same address"),
    ("http://10.0.0.4:2380", "https://10.0.0.4:2380", "the peer URL and the client URL are the same address"),
    ("http://10.0.0.2:2379", None, ("the peer URL http://10.0.0.2:2379 is already used by member member2 "
                                    "(91bc3c398fb3c146) as its client URL http://10.0.0.2:2379")),
    ("http://10.0.0.4:2380", "http://10.0.0.3:2380", ("the client URL http://10.0.0.3:2380 is already used by member "
                                                      "member3 (fd422379fda50e48) as its peer URL")),
    ("http://10.0.0.4:2380", "https://10.0.0.2:2379",
     "client URL https://10.0.0.2:2379 is already used by member member2"),
    ("http://10.0.0.1:2380", None, "peer URL http://10.0.0.1:2380 is already used by member member1"),
    ("http://0.0.0.0:2380", None, "the peer URL http://0.0.0.0:2380 is an unspecified address"),
    ("http://10.0.0.4:2380", "http://0.0.0.0:2379", "the client URL http://0.0.0.0:2379 is an unspecified address"),
    ("http://[::]:2380", None, "the peer URL http://[::]:2380 is an unspecified address"),
])
def test_url_conflicts_are_refused_at_proposal(peer, client, reason):
    with pytest.raises(Refusal) as e:
        plan_replacement(THREE, ReplaceRequest("member1", "member4", peer, new_client_url=client))
    assert reason in e.value.reason and "\n" not in e.value.reason


def test_url_conflicts_are_refused_for_an_add_only_plan_too():
    removed = (plan_replacement(THREE, REQ).failed, "abc123")
    with pytest.raises(Refusal, match="client URL http://10.0.0.3:2379 is already used by member member3"):
        plan_replacement(cluster(up(2), up(3), up(4)), ReplaceRequest("member1", "member6", "http://10.0.0.6:2380",
                                                                      new_client_url="http://10.0.0.3:2379"),
                         removed=removed)


@pytest.mark.parametrize("name, reason", [
    ("<!channel>", "cannot be an etcd member name"),
    ("a*b", "cannot be an etcd member name"),
    ("member-\u00e9", "cannot be an etcd member name"),
    ("m" * 64, "cannot be an etcd member name"),
    ("MEMBER2", "the name 'MEMBER2' differs from member 'member2' (91bc3c398fb3c146) only in case"),
])
def test_new_names_are_limited_to_a_safe_set(name, reason):
    with pytest.raises(Refusal) as e:
        plan_replacement(THREE, ReplaceRequest("member1", name, "http://10.0.0.4:2380"))
    assert reason in e.value.reason and "\n" not in e.value.reason


@pytest.mark.parametrize("name", ["m" * 63, "etcd-4.prod_b", "Member4", "9"])
def test_safe_names_are_accepted(name):
    assert plan_replacement(THREE, ReplaceRequest("member1", name, "http://10.0.0.4:2380")).new_name == name


def test_config_endpoints_lists_the_voters_client_urls():
    assert config_endpoints([member(3), member(2), member(5, learner=True)]) == \
        'endpoints = ["http://10.0.0.2:2379", "http://10.0.0.3:2379"]'
