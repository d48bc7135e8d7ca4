"""Quorum arithmetic and the health model: pure, no servers."""
from __future__ import annotations

import pytest

from bot.domain.cluster import ClusterHealth, Member, MemberHealth, MemberStatus, Quorum, membership_fingerprint
from helpers import cluster_health, member_status


@pytest.mark.parametrize("voting, healthy, needed, tolerates, ok", [
    (1, 1, 1, 0, True), (3, 3, 2, 1, True), (3, 2, 2, 0, True), (3, 1, 2, 0, False),
    (5, 5, 3, 2, True), (5, 3, 3, 0, True), (5, 2, 3, 0, False), (4, 3, 3, 0, True), (4, 2, 3, 0, False),
    (2, 1, 2, 0, False), (7, 6, 4, 2, True),
])
def test_quorum(voting, healthy, needed, tolerates, ok):
    q = Quorum(voting, healthy)
    assert (q.needed, q.tolerates, q.ok) == (needed, tolerates, ok)


def member(i: int, name: str = "", learner: bool = False) -> Member:
    return Member(id=i, name=name or f"m{i}", peer_urls=(f"http://10.0.0.{i}:2380",),
                  client_urls=(f"http://10.0.0.{i}:2379",), is_learner=learner)


def status(i: int, leader: int = 1, term: int = 2, errors: tuple[str, ...] = ()) -> MemberStatus:
    return member_status(endpoint=f"http://10.0.0.{i}:2379", member_id=i, leader=leader, raft_term=term, errors=errors)


def health(*members: MemberHealth) -> ClusterHealth:
    return cluster_health(*members, cluster="c")


def test_learners_do_not_count_toward_quorum():
    h = health(MemberHealth(member(1), status(1)), MemberHealth(member(2), status(2)),
               MemberHealth(member(3, learner=True), None, "connection refused"))
    assert h.quorum == Quorum(2, 2)
    assert [m.member.id for m in h.unhealthy] == [3]


def test_a_member_with_errors_is_not_healthy():
    h = health(MemberHealth(member(1), status(1)), MemberHealth(member(2), status(2, errors=("etcdserver: corrupt",))),
               MemberHealth(member(3), status(3)))
    assert h.quorum == Quorum(3, 2)
    assert h.members[1].problem == "etcdserver: corrupt"
    assert [m.member.id for m in h.unhealthy] == [2]


def test_an_election_is_not_a_lost_quorum():
    """Right after the leader dies the survivors say "no leader": they still vote."""
    electing = ("etcdserver: no leader",)
    h = health(MemberHealth(member(1), None, "connection refused"),
               MemberHealth(member(2), status(2, leader=0, errors=electing)),
               MemberHealth(member(3), status(3, leader=0, errors=electing)))
    assert h.quorum == Quorum(3, 2) and h.quorum.ok
    assert h.leader_id is None and not h.all_healthy
    from bot.output.text import verdict
    assert verdict(h) == "NO LEADER"


def test_leader_is_the_highest_term_view():
    h = health(MemberHealth(member(1), status(1, leader=1, term=2)),
               MemberHealth(member(2), status(2, leader=2, term=3)),
               MemberHealth(member(3), status(3, leader=2, term=3)))
    assert h.leader_id == 2


def test_find_by_name_or_hex_id():
    h = health(MemberHealth(member(0x8211f1d0f64f3269, "member1"), status(1)))
    assert h.find("member1") is h.members[0]
    assert h.find("8211f1d0f64f3269") is h.members[0]
    assert h.find("8211F1D0F64F3269") is h.members[0]
    assert h.find("member9") is None


def test_fingerprint_changes_with_membership_not_order():
    a, b = member(1), member(2)
    assert membership_fingerprint([a, b]) == membership_fingerprint([b, a])
    assert membership_fingerprint([a, b]) != membership_fingerprint([a])
    assert membership_fingerprint([a, b]) != membership_fingerprint([a, member(2, learner=True)])


def test_a_member_without_a_leader_a_quorum_follows_is_cut_off():
    """Its own Status says only "leader 0"; with a quorum of voters following one leader it is cut off from its
    peers: not healthy, not counted toward quorum, and the cluster is not all healthy."""
    from bot.domain.cluster import judge_leaders
    from bot.output.model import member_state
    members = judge_leaders([MemberHealth(member(1), status(1, leader=1)), MemberHealth(member(2), status(2, leader=1)),
                             MemberHealth(member(3), status(3, leader=0))])
    h = health(*members)
    cut = h.find("m3")
    assert cut is not None and cut.cut_off and not cut.healthy and "cut off from its peers" in (cut.problem or "")
    assert h.quorum == Quorum(3, 2) and not h.all_healthy and member_state(cut, h) == "UNHEALTHY"
    # During an election, or without quorum, nobody follows a leader: no member is marked.
    electing = judge_leaders([MemberHealth(member(i), status(i, leader=0)) for i in (1, 2, 3)])
    assert not any(m.cut_off for m in electing)
    minority = judge_leaders([MemberHealth(member(1), status(1, leader=1)), MemberHealth(member(2), None, "refused"),
                              MemberHealth(member(3), status(3, leader=0))])
    assert not any(m.cut_off for m in minority)


def test_members_that_answer_without_their_status_leave_the_quorum_unknown_never_down():
    """A member that refused the bot's credentials, or defragments with StopGRPCServiceOnDefrag, answered:
    it is not DOWN, and when it could make or break the quorum the verdict is UNKNOWN, not QUORUM LOST."""
    from bot.output.model import member_state, status_view, verdict
    h = health(MemberHealth(member(1), status(1, leader=0)),
               MemberHealth(member(2), None, "etcdserver: user name is empty", refused=True),
               MemberHealth(member(3), None, "connection refused"))
    assert h.quorum == Quorum(3, 1, unknown=1) and not h.quorum.ok and not h.quorum.known
    assert verdict(h) == "UNKNOWN" and member_state(h.members[1], h) == "REFUSED"
    assert status_view(h).down == ["m3"]
    busy = health(MemberHealth(member(1), status(1)), MemberHealth(member(2), None, "busy", defragmenting=True),
                  MemberHealth(member(3), status(3)))
    assert busy.quorum.ok and verdict(busy) == "DEGRADED" and member_state(busy.members[1], busy) == "DEFRAGMENTING"
    lost = health(MemberHealth(member(1), status(1, leader=0)), MemberHealth(member(2), None, "connection refused"),
                  MemberHealth(member(3), None, "connection refused"), MemberHealth(member(4), None, "x", refused=True),
                  MemberHealth(member(5), None, "connection refused"))
    assert lost.quorum.known and verdict(lost) == "QUORUM LOST"  # 1 healthy + 1 unknown < 3: lost whatever it says


def test_a_snapshot_confirms_the_leaders_commits_only_where_a_linearizable_read_can_answer():
    """save_snapshot's wait for the source to catch up is a linearizable read: asked of a member without a
    leader, or one still naming a leader that died (until the survivors elect another; after a quorum loss
    they never do), it fails or waits out its deadline, and with it the snapshot the runbook wants of a
    survivor; a learner refuses it."""
    up = health(MemberHealth(member(1), status(1)), MemberHealth(member(2), status(2)),
                MemberHealth(member(3), status(3)))
    assert all(up.linearizable_through(m) for m in up.members)
    lost = health(MemberHealth(member(1), None, "connection refused"), MemberHealth(member(2), None, "timeout"),
                  MemberHealth(member(3), status(3)))
    assert lost.members[2].healthy and lost.snapshot_source() is lost.members[2]
    assert not lost.linearizable_through(lost.members[2])
    leaderless = health(MemberHealth(member(1), None, "connection refused"), MemberHealth(member(2), status(2)),
                        MemberHealth(member(3), status(3)))  # both still name member 1, dead, until they elect
    assert leaderless.quorum.ok and not any(leaderless.linearizable_through(m) for m in leaderless.members)
    electing = health(MemberHealth(member(1), None, "connection refused"),
                      MemberHealth(member(2), status(2, leader=0, errors=("etcdserver: no leader",))),
                      MemberHealth(member(3), status(3, leader=0, errors=("etcdserver: no leader",))))
    assert not electing.linearizable_through(electing.members[1])
    learning = health(MemberHealth(member(1), status(1)), MemberHealth(member(2), status(2)),
                      MemberHealth(member(3, learner=True), status(3)))
    assert not learning.linearizable_through(learning.members[2])
